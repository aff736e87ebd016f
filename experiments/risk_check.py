"""Does the calibrated point keep its promise on images it was not picked on? A re-split check.

    python experiments/risk_check.py --ckpt runs/exits/ckpt.pt [--splits 200] [--max-drop 1] [--delta 0.1]

The calib and test images (the two splits that chose nothing) are pooled and split at random, --splits
times, into a calibration half and a held-out half *of images*: every question of an image goes to the
same half, as the guarantee's unit is the image (infer.calibrate). On each calibration half both rules of infer.calibrate pick a threshold and the exits to
evaluate: `guaranteed` (Learn-then-Test: the held-out drop is <= --max-drop with probability >= 1 - --delta)
and `empirical` (the fastest point within --max-drop on the calibration half, no guarantee). The check
prints, per rule, the share of splits whose held-out accuracy drop exceeds --max-drop (the guaranteed rule
promises at most --delta), the mean held-out drop, and the mean speedup (predicted by the costs measured
once at batch 1 on this machine, as the report calibrates, and the layer view).
"""
import argparse
import os
import statistics
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import load_data                                          # noqa: E402
import free_min                                                     # noqa: E402
import infer                                                        # noqa: E402
from util import checkpoints, config, report, runtime               # noqa: E402


POOLED = ("calib", "test")


class Pool:
    """Questions pooled from several splits, scored as a split is: score(ids, pred) (official VQA credit), and
    the image of each question (image_index, numbered across the splits)."""

    def __init__(self, scores: torch.Tensor, image_index: torch.Tensor):
        self.scores = scores                                        # (n, A): the credit of every answer
        self.image_index = image_index                              # (n,): the image each question is about

    def __len__(self) -> int:
        return len(self.scores)

    def score(self, ids: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return self.scores[ids, pred]

    def subset(self, ids: torch.Tensor) -> "Pool":
        return Pool(self.scores[ids], self.image_index[ids])


def pooled(free, splits: dict, batch_size: int) -> tuple[Pool, dict]:
    """The calib and test questions as one Pool, and their collected probabilities (infer.collect)."""
    probs = [infer.collect(free, splits[name], batch_size) for name in POOLED]
    A = probs[0]["final"].shape[1]
    scores = torch.cat([splits[name].soft_targets(torch.arange(len(splits[name])), A) for name in POOLED])
    first = splits[POOLED[0]].images.shape[0]                       # the test images are numbered after calib's
    images = torch.cat([splits[POOLED[0]].image_index, splits[POOLED[1]].image_index + first])
    return Pool(scores, images), {"final": torch.cat([p["final"] for p in probs]),
                                  "exits": torch.cat([p["exits"] for p in probs], dim=1), "seq_len": probs[0]["seq_len"]}


def split_by_image(pool: Pool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The question ids of a random half of the images, and of the other half: no image on both sides."""
    n_images = int(pool.image_index.max()) + 1
    calibration = torch.zeros(n_images, dtype=torch.bool)
    calibration[torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:n_images // 2]] = True
    side = calibration[pool.image_index]                            # (n,): the half each question's image is in
    return side.nonzero().flatten(), (~side).nonzero().flatten()


def held_out(free, pool: Pool, probs: dict, cal: dict, costs: dict) -> dict:
    """A calibrated point's accuracy drop (points) and speedups on held-out questions (no point: no exit)."""
    if cal["threshold"] is None:
        return {"drop": 0.0, "speedup": 1.0, "layer_speedup": 1.0}
    sim = infer.simulate(probs, cal["rule"], cal["threshold"], infer.exit_indices(free, cal))
    drop = infer.accuracy(pool, probs["final"].argmax(1)) - infer.accuracy(pool, sim["pred"])
    return {"drop": drop, "speedup": infer.predicted_speedup(free, sim, costs),
            "layer_speedup": infer.layer_speedup(free, sim, probs["seq_len"])[1]}


def print_table(results: dict, max_drop: float) -> None:
    """Per rule: how often the held-out drop broke the limit, the mean drop, and the mean speedups."""
    print("| calibration | held-out drop > max drop | mean held-out drop (pts) | predicted speedup | layer speedup |")
    print("|---|---|---|---|---|")
    for mode, rows in results.items():
        drops = [x["drop"] for x in rows]
        share = sum(d > max_drop for d in drops) / len(drops)
        print(f"| {mode} | {100 * share:.1f} % | {statistics.mean(drops):+.2f} ± {statistics.pstdev(drops):.2f} | "
              f"{statistics.mean(x['speedup'] for x in rows):.2f}x | {statistics.mean(x['layer_speedup'] for x in rows):.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint with exits (train.py)")
    p.add_argument("--splits", type=int, default=200, help="random calibration / held-out splits")
    p.add_argument("--max-drop", type=float, default=1.0, help="the promised accuracy drop, in points")
    p.add_argument("--delta", type=float, default=0.1, help="the guaranteed rule's failure probability")
    p.add_argument("--risk", default="auto", choices=["auto", *infer.RISKS], help="the loss bounded (auto: as the "
                   "report picks)")
    p.add_argument("--rule", default="maxprob", choices=list(free_min.RULES), help="exit rule")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where the model runs and the costs are measured (auto: cuda, then mps, then cpu)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = runtime.pick_device(args.device)
        free, tokenizer, answers, dcfg, _ = checkpoints.load_free(infer.InferConfig(ckpt=args.ckpt))
        splits, _, _ = load_data(dcfg, tokenizer, answers, only=POOLED)
    except config.UsageError as e:
        raise SystemExit(f"error: {e}")
    print(f"on {device}")
    free = runtime.inference_copy(free.to(device))
    pool, probs = pooled(free, splits, 256)
    costs = report.unit_costs(free, splits["calib"], torch.arange(32), repeats=5)
    risk = args.risk if args.risk != "auto" else ("harm" if free.cfg.label_fraction > 0 else "disagree")
    subset = lambda ids: {"final": probs["final"][ids], "exits": probs["exits"][:, ids], "seq_len": probs["seq_len"]}
    results = {"guaranteed": [], "empirical": []}
    for r in tqdm(range(args.splits), desc="re-splits", disable=None):
        cal_ids, held_ids = split_by_image(pool, r)
        for mode, rows in results.items():
            promise = infer.InferConfig(rule=args.rule, max_drop=args.max_drop, calibration=mode, delta=args.delta, risk=risk)
            cal = infer.calibrate(free, pool.subset(cal_ids), subset(cal_ids), costs, promise)
            rows.append(held_out(free, pool.subset(held_ids), subset(held_ids), cal, costs))
    print(f"{args.splits} random halves of the {int(pool.image_index.max()) + 1} calib + test images "
          f"({len(pool)} questions); rule {args.rule}, risk {risk}, "
          f"max drop {args.max_drop:g} points, delta {args.delta:g}; costs measured at batch 1: " +
          ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in costs.items() if k != "unit"))
    print_table(results, args.max_drop)


if __name__ == "__main__":
    main()
