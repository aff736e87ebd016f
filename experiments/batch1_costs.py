"""Where the time of early exit goes at batch 1: the calibrated point against what it could cost at best.

    python experiments/batch1_costs.py [--ckpt backbones/shapes-default-free.pt] [--questions 256] [--rounds 6]

The same test questions, one at a time, through five forwards, interleaved round by round so that all five
see the same machine load (medians over rounds, the first round a warm-up):
  full         the full model (what the report's wall-clock speedup divides by)
  early exit   free_min.early_exit_predict at the checkpoint's calibrated point (rule, threshold, exits)
  known exits  each question's own layers and exits, told beforehand where it leaves (the exits it evaluates,
               then nothing else: no rule, no bookkeeping): the best the calibrated point could cost
  layers only  each question's own layers, no exit evaluated: what the point would cost were exits free
  embedding    the image encoder and the text embedding alone, which every forward runs first
So (early exit - known exits) is the early-exit loop's own cost, and (known exits - layers only) what the
exits cost the questions that evaluate them.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import load_data                                          # noqa: E402
import free_min                                                     # noqa: E402
import infer                                                        # noqa: E402
from util import checkpoints, config, runtime                       # noqa: E402


def known_exits(free, x: dict, exits: list[int], leaves_at: int) -> None:
    """The layers to the exit the question leaves at (K: the final layer), with the exits `exits` on the way."""
    bb, stop = free.backbone, free.exits_after(exits)
    h, mask = bb.embed(**x)
    for layer in range(1, bb.depth + 1):
        h = bb.layer(layer - 1, h, mask)
        if layer in stop:
            free.exit_logits(stop[layer], h, mask).softmax(dim=1).max(dim=1)
            if stop[layer] == leaves_at:
                return
    bb.head(h[:, 0]).softmax(dim=1).max(dim=1)


def layers_only(free, x: dict, layers: int) -> None:
    """The question's layers, and no exit."""
    bb = free.backbone
    h, mask = bb.embed(**x)
    for i in range(layers):
        h = bb.layer(i, h, mask)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=checkpoints.SHIPPED_EXITS,
                   help="exits with a calibrated point (default: the shipped ones)")
    p.add_argument("--questions", type=int, default=256, help="test questions, drawn at random (seed 0)")
    p.add_argument("--rounds", type=int, default=6,
                   help="rounds of every forward over every question (the first warms up)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.questions < 1 or args.rounds < 2 or args.threads < 1:
        raise SystemExit(f"error: --questions and --threads must be at least 1, --rounds at least 2 (one warms "
                         f"up); got {args.questions}, {args.threads}, {args.rounds}")
    torch.set_num_threads(args.threads)
    try:
        free, tokenizer, answers, dcfg, state = checkpoints.load_free(infer.InferConfig(ckpt=args.ckpt))
    except config.UsageError as e:
        raise SystemExit(f"error: {e}")
    cal = state.get("calibrated") or {}
    if cal.get("threshold") is None:
        raise SystemExit(f"error: --ckpt {args.ckpt}: no calibrated point stored (train it to its end, or export it)")
    free = runtime.inference_copy(free)
    test = load_data(dcfg, tokenizer, answers, only=("test",))[0]["test"]
    ids = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.questions]
    inputs = infer.timing_batches(free, test, ids, 1)
    exits = infer.exit_indices(free, cal)
    early = lambda x: free_min.early_exit_predict(free, x, cal["rule"], cal["threshold"], exits)
    with torch.inference_mode():
        where = [early(x) for x in inputs]
        runs = {"full": lambda x, o: free.backbone(**x).argmax(1),
                "early exit": lambda x, o: early(x),
                "known exits": lambda x, o: known_exits(free, x, exits, int(o["exit"])),
                "layers only": lambda x, o: layers_only(free, x, int(o["layers"])),
                "embedding": lambda x, o: free.backbone.embed(**x)}
        spent = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in list(runs)[::(-1) ** r]:                       # the order alternates round by round
                start = time.perf_counter()
                for x, o in zip(inputs, where):
                    runs[name](x, o)
                spent[name].append((time.perf_counter() - start) / len(inputs))
    ms = {name: 1e3 * statistics.median(s[1:]) for name, s in spent.items()}
    print(f"{len(inputs)} test questions at batch 1, {torch.get_num_threads()} threads, {args.rounds - 1} rounds; "
          f"point: {cal['rule']} {cal['threshold']:g}, exits after layers {cal['exit_layers']}; "
          f"{sum(float(o['layers']) for o in where) / len(where):.2f} layers on average")
    for name, t in ms.items():
        print(f"  {name:<12} {t:6.3f} ms a question   speedup {ms['full'] / t:5.2f}x")


if __name__ == "__main__":
    main()
