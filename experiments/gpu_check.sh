#!/usr/bin/env bash
# The first run on a GPU, as one command that answers whether free-min works there. Each step runs alone
# on the machine (its timings are its own), under a cap of its own, its output unbuffered into OUTDIR:
#   nccl      a direct all-reduce over the machine's GPUs, one process each (NCCL; a one-GPU machine
#             runs it with one process, which still goes through NCCL)
#   torchrun  both stages of the tiny preset under torchrun, one process per GPU
#   fp16_resume  both stages with fp16 autocast and the grad scaler forced, even on a bf16 GPU (the path of
#             a T4, V100 or RTX 20xx), stopped after the first checkpoint as an interrupted run, then
#             continued with --resume (the grad scaler's state with it)
#   report    the shipped exits' report on the device; its accuracies checked against the CPU's
#             (RESULTS.md, 2026-12-07: the same test split, so they should agree to a few questions)
#   main      `python train.py` timed end to end with what is left of the limit (if it does not finish,
#             its log still says what stage 1 costs there), with peak GPU and host memory
#
#   bash experiments/gpu_check.sh OUTDIR [SECONDS]       # on a machine with a CUDA GPU (default limit 560 s)
#   DRY_RUN=1 bash experiments/gpu_check.sh OUTDIR       # the same steps on the CPU with tiny settings:
#        gloo with two processes for NCCL, fp16 autocast on the CPU, the report of the torchrun step's exits
#
# OUTDIR/summary.txt: one line per step (exit status, 124 = stopped at its cap; wall time; last lines),
# then the machine (GPU, utilisation) and the checks. The script's own exit status is 0 when every step
# and check passed.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_check.sh OUTDIR [SECONDS]}")
limit=${2:-560}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=cpu; procs=2; threads=1
    # 160 questions in global batches of 53 leave a last one of 1, which one of two processes would get
    # nothing of: torchrun's steps show it left out in both stages
    tiny=(--preset tiny --train-images 40 --val-images 8 --test-images 8 --calib-images 8 --epochs 1
          --exit-epochs 1 --scene-workers 0 --no-final-eval --batch-size 53)
    main=("${tiny[@]}"); report=(--timing-samples 4 --repeats 1 --split val); exits=$out/torchrun/ckpt.pt
    resume=(--epochs 2 --train-images 12 --batch-size 16); plot=()   # a run to stop after its first epoch
    caps=(nccl=60 torchrun=120 fp16_resume=90 report=60)
else
    device=cuda; threads=2; tiny=(--preset tiny); main=(); report=(); exits=backbones/shapes-default-free.pt
    resume=(); plot=(--plot "$out/report.png")
    procs=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
    caps=(nccl=60 torchrun=150 fp16_resume=150 report=90)
fi
cap() { local kv; for kv in "${caps[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
start=$SECONDS
: > "$out/summary.txt"

step() {   # step NAME COMMAND...: run it within its cap and what is left of the limit; log and status into OUTDIR
    local name=$1; shift
    local left=$((limit - (SECONDS - start))) began=$SECONDS c
    c=$(cap "$name"); c=${c:-$left}; [ "$c" -gt "$left" ] && c=$left
    timeout "$((c > 1 ? c : 1))" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%s: exit %s, %s s; %s\n' "$name" "$rc" "$((SECONDS - began))" \
        "$(tr '\r' '\n' < "$out/$name.log" | grep -v '^\s*$' | tail -3 | tr '\n' '|')" >> "$out/summary.txt"
    return $rc
}

# the helpers the steps run, written next to the logs
cat > "$out/allreduce.py" <<'EOF'
import os, torch, torch.distributed as dist
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, size = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
x = torch.full((1 << 20,), float(rank + 1), device=device)
dist.all_reduce(x)
assert torch.all(x == size * (size + 1) / 2), x[:4]
print(f"rank {rank} of {size}: all_reduce over {dist.get_backend()} on {device} gave {x[0].item():g}, as it should")
dist.destroy_process_group()
EOF
cat > "$out/launch.py" <<'EOF'
# launch.py MODE train.py-ARGS: train.main with fp16 forced (MODE fp16), the same stopped after its first
# checkpoint (fp16-stop), or as it is, then its peak GPU and host memory (measure). The main guard: the
# drawing processes import it.
import resource, sys, torch, train
from util import checkpoints, runtime
if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode.startswith("fp16"):
        runtime.pick_dtype = lambda device: (torch.float16, "fp16 autocast and grad scaler, forced by gpu_check.sh")
    if mode == "fp16-stop":
        save = checkpoints.save_atomic
        def save_then_stop(path, state):
            save(path, state)
            raise SystemExit("stopped after the first checkpoint, as an interrupted run")
        checkpoints.save_atomic = save_then_stop
    try:
        train.main(args)
    finally:
        if mode == "measure":
            host = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
            gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            print(f"peak memory: GPU {gpu:.2f} GiB allocated by torch; host {host / 2**20:.2f} GiB (largest process)")
EOF

python - "$device" > "$out/machine.txt" 2>&1 <<'EOF'
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device asked:", sys.argv[1])
for i in range(torch.cuda.device_count()):
    print(f"GPU {i}:", torch.cuda.get_device_name(i),
          "bf16 without emulation:", torch.cuda.is_bf16_supported(including_emulation=False))
EOF
if command -v nvidia-smi > /dev/null; then      # utilisation and memory every second, through every step
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$out/gpu_use.csv" 2>&1 &
    smi=$!
fi

failed=0
torchrun=(python -m torch.distributed.run --standalone --nproc_per_node="$procs")
step nccl "${torchrun[@]}" "$out/allreduce.py" || failed=1
step torchrun "${torchrun[@]}" train.py "${tiny[@]}" --device "$device" --threads "$threads" \
    --out "$out/torchrun" || failed=1
step fp16_resume bash -c 'python "$0/launch.py" fp16-stop "${@}"; [ $? = 1 ] &&
                          python "$0/launch.py" fp16 "${@}" --resume' "$out" "${tiny[@]}" --device "$device" \
    "${resume[@]}" --threads "$threads" --out "$out/fp16" || failed=1
step report python infer.py --ckpt "$exits" --eval "${report[@]}" --device "$device" \
    --threads "$threads" --json "$out/report.json" "${plot[@]}" || failed=1
step main python "$out/launch.py" measure "${main[@]}" --device "$device" --threads "$threads" \
    --out "$out/main" || failed=1
[ -n "${smi:-}" ] && kill "$smi" 2> /dev/null

# the checks: what each step should have left behind
python - "$out" "${DRY_RUN:-0}" >> "$out/summary.txt" 2>&1 <<'EOF' || failed=1
import json, os, sys
import torch
out, dry = sys.argv[1], sys.argv[2] == "1"
ok = True
def check(name, passed, detail):
    global ok
    ok &= bool(passed)
    print(f"check {name}: {'ok' if passed else 'FAILED'} ({detail})")
def log(run, key):
    path = os.path.join(out, run, "log.jsonl")
    return [r for r in map(json.loads, open(path)) if key in r] if os.path.isfile(path) else []
for run in ("torchrun", "fp16"):
    state = torch.load(os.path.join(out, run, "ckpt.pt"), weights_only=False) if os.path.isfile(
        os.path.join(out, run, "ckpt.pt")) else {}
    check(run, "exits" in state, "both stages ran to a checkpoint with exits" if state else "no checkpoint")
fp16 = open(os.path.join(out, "fp16_resume.log")).read() if os.path.isfile(os.path.join(out, "fp16_resume.log")) else ""
check("fp16 path", fp16.count("forced by gpu_check.sh") == 2, "both runs said they computed in fp16 with the grad scaler")
epochs = [r["epoch"] for r in log("fp16", "train_loss")]
check("resume", epochs and epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2 and "stopped after" in fp16,
      f"stage 1's epochs logged {epochs}: stopped after the first, continued to the end")
report = json.load(open(os.path.join(out, "report.json"))) if os.path.isfile(os.path.join(out, "report.json")) else None
if report is None:
    check("report", False, "no report.json")
elif dry:
    print("check report accuracy: skipped (a dry run reports tiny exits, which have no CPU figure)")
else:   # the shipped exits on the CPU, test split (RESULTS.md, 2026-12-07): final layer, then exits 1, 2, 4, 6
    cpu = [99.92, 80.54, 86.71, 98.83, 99.87]
    here = [report["full"]["accuracy"]] + [e["accuracy"] for e in report["exits"]]
    gap = max(abs(a - b) for a, b in zip(cpu, here))
    check("report accuracy", gap <= 0.5, f"{', '.join(f'{a:.2f}' for a in here)} here against the CPU's "
          f"{', '.join(map(str, cpu))}: largest gap {gap:.2f} points")
sys.exit(0 if ok else 1)
EOF
cat "$out/machine.txt" >> "$out/summary.txt"
cat "$out/summary.txt"
exit $failed
