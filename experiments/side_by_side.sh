#!/usr/bin/env bash
# Several stage-1 configurations at once on one machine (e.g. one GPU), each in the background with its own
# output folder and 2 CPU threads, then one line per run with its final test accuracy by family (e.g. the
# default against --aux-weight 0, on one GPU).
#
#   bash experiments/side_by_side.sh OUTDIR "NAME: train.py flags" ["NAME: flags" ...]
#   e.g. bash experiments/side_by_side.sh runs/aux "aux1:" "aux0: --aux-weight 0"
# Bound the whole by `timeout`; a run that did not finish shows its last log line instead.
set -uo pipefail
out=${1:?usage: side_by_side.sh OUTDIR "NAME: flags" ...}
shift
mkdir -p "$out"
names=()
for spec in "$@"; do
    name=${spec%%:*}; flags=${spec#*:}
    names+=("$name")
    # shellcheck disable=SC2086
    python train.py --stage backbone --out "$out/$name" --threads 2 $flags > "$out/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
    line=$(grep -h '"split": "test"' "$out/$name/log.jsonl" 2>/dev/null | tail -1)
    if [ -n "$line" ]; then echo "$name: $line"; else echo "$name: not finished: $(tail -c 300 "$out/$name.log" | tr '\r' '\n' | tail -1)"; fi
done
