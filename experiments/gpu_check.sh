#!/usr/bin/env bash
# The first run on a GPU, as one command, each step alone on the machine so that its timings are its own:
# both stages under torchrun with one process on NCCL (which all-reduces CUDA tensors), the report of the
# shipped exits timed on the device, then the main command, `python train.py`, timed end to end with what
# is left of the limit (if it does not finish, its log still says what stage 1 will cost there). Every log
# lands in one folder.
#
#   bash experiments/gpu_check.sh OUTDIR [SECONDS]       # on a machine with a CUDA GPU (default limit 540 s)
#   DRY_RUN=1 bash experiments/gpu_check.sh OUTDIR       # the same steps on the CPU with tiny settings (gloo;
#                                                          # the report reads the torchrun step's exits)
#
# OUTDIR/summary.txt holds one line per step: its exit status (124: stopped at the limit), its wall time and
# its last lines.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_check.sh OUTDIR [SECONDS]}")
limit=${2:-540}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=cpu; tiny=(--preset tiny --train-images 40 --val-images 8 --test-images 8 --epochs 1 --exit-epochs 1)
    main=("${tiny[@]}" --no-final-eval); report=(--timing-samples 4 --repeats 1 --split val)
    exits=$out/torchrun/ckpt.pt
    threads=1      # tiny steps on a CPU that may be shared: a second thread would only wait on the first
else
    device=cuda; tiny=(--preset tiny); main=(); report=(); threads=2; exits=backbones/shapes-default-free.pt
fi
python - "$device" > "$out/machine.txt" 2>&1 <<'EOF'
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device asked:", sys.argv[1])
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "bf16 without emulation:", torch.cuda.is_bf16_supported(including_emulation=False))
EOF
start=$SECONDS

step() {   # step NAME COMMAND...: run it within what is left of the limit; its output and status into OUTDIR
    local name=$1; shift
    local left=$((limit - (SECONDS - start))) began=$SECONDS
    timeout "$((left > 1 ? left : 1))" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%s: exit %s, %s s; %s\n' "$name" "$rc" "$((SECONDS - began))" \
        "$(tr '\r' '\n' < "$out/$name.log" | grep -v '^\s*$' | tail -3 | tr '\n' '|')" >> "$out/summary.txt"
}
: > "$out/summary.txt"
step torchrun python -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${tiny[@]}" \
    --no-final-eval --device "$device" --threads "$threads" --out "$out/torchrun"
step report python infer.py --ckpt "$exits" --eval "${report[@]}" --device "$device" \
    --threads "$threads" --json "$out/report.json" --plot "$out/report.png"
step main python train.py "${main[@]}" --device "$device" --threads "$threads" --out "$out/main"
cat "$out/summary.txt"
