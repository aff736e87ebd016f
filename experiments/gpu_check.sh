#!/usr/bin/env bash
# The first run on a GPU, as one command: the main job timed end to end, both stages under torchrun with one
# process on NCCL (which all-reduces CUDA tensors), and the report of the shipped exits on the device. The
# three run side by side (2 CPU threads each), each bounded by `timeout`; every log lands in one folder.
#
#   bash experiments/gpu_check.sh OUTDIR [SECONDS]       # on a machine with a CUDA GPU (default limit 540 s)
#   DRY_RUN=1 bash experiments/gpu_check.sh OUTDIR       # the same steps on the CPU with tiny settings (gloo)
#
# OUTDIR/summary.txt ends with one line per step: its exit status, its wall time and its last lines.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [SECONDS]}
limit=${2:-540}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=cpu; tiny=(--preset tiny --train-images 40 --val-images 8 --test-images 8 --epochs 1 --exit-epochs 1)
    main=("${tiny[@]}"); report=(--timing-samples 4 --repeats 1 --split val)
else
    device=cuda; main=(); tiny=(--preset tiny); report=()
fi
python - "$device" > "$out/machine.txt" 2>&1 <<'EOF'
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device asked:", sys.argv[1])
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16 without emulation:", torch.cuda.is_bf16_supported(including_emulation=False))
EOF

step() {   # step NAME COMMAND...: run in the background, its output and wall time into OUTDIR/NAME.*
    local name=$1; shift
    ( SECONDS=0
      timeout "$limit" "$@" > "$out/$name.log" 2>&1; rc=$?
      echo "$rc $SECONDS" > "$out/$name.status" ) &
}
step main python train.py "${main[@]}" --device "$device" --threads 2 --out "$out/main"
step torchrun python -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${tiny[@]}" \
    --no-final-eval --device "$device" --threads 2 --out "$out/torchrun"
step report python infer.py --ckpt backbones/shapes-default-free.pt --eval "${report[@]}" --device "$device" \
    --threads 2 --json "$out/report.json" --plot "$out/report.png"
wait

for name in main torchrun report; do
    read -r rc seconds < "$out/$name.status"
    printf '%s: exit %s, %s s; %s\n' "$name" "$rc" "$seconds" \
        "$(tr '\r' '\n' < "$out/$name.log" | grep -v '^\s*$' | tail -3 | tr '\n' '|')"
done | tee "$out/summary.txt"
