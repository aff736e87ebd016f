#!/usr/bin/env bash
# The stage-2 comparison in the README: exits trained on one frozen backbone with
#   free (paper) - FREE's objective as the paper states it: GAN (unconditional D) + distillation (+ CE on labels)
#   free (best)  - the variant the results picked: feature matching (--adv-loss fm, free_min's default; see README)
#   kd           - self-distillation only (FastBERT-style; it never reads a label, so one row for every F)
#   ce           - labels only (DeeBERT-style; needs F > 0)
# at label fractions F = 0, 0.01, 0.1 and 1, three seeds each, all with the same exits (after layers 2, 4, 6,
# for 2 stage-2 epochs: the defaults when the README's table was made, kept here so that the script
# reproduces it) and steps; then one
# table, mean +- std over the seeds (python infer.py --compare). Each run ends with the early-exit report
# without wall-clock timing (accuracy and the layer view; timing is measured separately, in one process).
# Finished runs are skipped, so the script can be stopped and started again.
#
#   bash scripts/compare_exits.sh BACKBONE OUTDIR [SEEDS] [extra train.py flags...]
#   e.g. bash scripts/compare_exits.sh backbones/shapes-default.pt runs/compare "0 1 2"
#   FRACTIONS="0 0.1" bash scripts/compare_exits.sh ...     # only these label fractions
set -euo pipefail
backbone=${1:?usage: compare_exits.sh BACKBONE OUTDIR [SEEDS] [train.py flags]}
out=${2:?usage: compare_exits.sh BACKBONE OUTDIR [SEEDS] [train.py flags]}
seeds=${3:-0 1 2}
shift $(( $# < 3 ? $# : 3 ))
paper=(--exit-method free --disc-input feature --adv-loss gan --disc-reg none --adv-warmup 0 --lambda-adv 1)
best=(--exit-method free)                                  # free_min's defaults: the variant the results picked
runs=()
run() {                                                    # run NAME FLAGS...: one stage-2 run unless it is done
    local name=$1; shift
    runs+=("$out/$name")
    if [ -f "$out/$name/report.json" ]; then return; fi
    python train.py --stage exits --backbone "$backbone" --out "$out/$name" --state-cache "$out/states" \
        --exit-layers 2,4,6 --exit-epochs 2 --no-report-timing "$@" > "$out/$name.log" 2>&1 || { echo "failed: $out/$name (see $out/$name.log)"; exit 1; }
    echo "done: $out/$name"
}
mkdir -p "$out"
for seed in $seeds; do
    for f in ${FRACTIONS:-0 0.01 0.1 1}; do
        run "free_paper_F${f}_s${seed}" "${paper[@]}" --label-fraction "$f" --seed "$seed" "$@"
        run "free_best_F${f}_s${seed}" "${best[@]}" --label-fraction "$f" --seed "$seed" "$@"
        if [ "$f" != 0 ]; then run "ce_F${f}_s${seed}" --exit-method ce --label-fraction "$f" --seed "$seed" "$@"; fi
    done
    run "kd_s${seed}" --exit-method kd --label-fraction 0 --seed "$seed" "$@"
done
python infer.py --compare "$(IFS=,; echo "${runs[*]}")"
