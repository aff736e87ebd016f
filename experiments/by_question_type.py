"""Accuracy per question type of a model trained on VQA-format files, the families of shapes read back.

    python data.py --write runs/shapes-vqa --train-images 6000 --val-images 750 --test-images 750
    python train.py --data vqa2 --vqa-questions runs/shapes-vqa/questions.json \
        --vqa-annotations runs/shapes-vqa/annotations.json --vqa-images runs/shapes-vqa/images --out runs/fixedset
    python experiments/by_question_type.py runs/fixedset/ckpt.pt [--split test]

With `--data vqa2` a question's family is its answer type (yes/no, number, other), as VQA v2 groups them, and
so is every table that train.py and infer.py print. The shapes set written by `data.py --write` keeps each
question's family as its `question_type` in the annotations file; this reads it back and prints the
split's accuracy per question type: the final layer's, and every exit's where the checkpoint has exits (its
depth profile, as the report's "per family" table has it), with two baselines for the exits over the whole
split: the exits as initialised (before stage 2: each G_k a copy of the next backbone layer) and a raw
readout of the exit's layer through the frozen head.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import load_data                                          # noqa: E402
from free_min import FREE, ExitConfig                               # noqa: E402
import infer                                                        # noqa: E402
from util import checkpoints, config, report                        # noqa: E402
from util.checkpoints import build_from_checkpoint                  # noqa: E402


def question_types(annotations: str) -> dict:
    """question_id -> question_type, from a VQA v2 annotations file."""
    with open(annotations) as f:
        return {a["question_id"]: a.get("question_type", "?") for a in json.load(f)["annotations"]}


def by_type(split, types: dict):
    """The split with each question's family set to its question type."""
    for r in split.records:
        r["family"] = types[r["question_id"]]
    return split


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a checkpoint of train.py trained with --data vqa2 (a backbone, or with exits)")
    p.add_argument("--split", default="test", choices=["val", "calib", "test"], help="the split to score")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        model, free, tokenizer, answers, dcfg = build_from_checkpoint(checkpoints.load_checkpoint(args.ckpt))
        if dcfg.data != "vqa2":
            raise config.UsageError(f"{args.ckpt}: trained on {dcfg.data}, not on VQA-format files")
        split = load_data(dcfg, tokenizer, answers, only=(args.split,))[0][args.split]
        split = by_type(split, question_types(dcfg.vqa_annotations))
    except (config.UsageError, OSError, KeyError) as e:
        raise SystemExit(f"error: {e}")
    if free is None:                                         # a backbone: the final layer alone
        probs = {"exits": [], "final": torch.cat([model.eval()(**split.batch(ids)).float().softmax(1)
                                                  for ids in torch.split(torch.arange(len(split)), 256)])}
        layers = []
    else:
        probs, layers = infer.collect(free, split, 256), free.exit_layers
    table = report.per_family_depth(free, split, probs, None)
    every = torch.arange(len(split))
    overall = [100 * split.score(every, p.argmax(1)).mean().item() for p in [*probs["exits"], probs["final"]]]
    print(f"{args.ckpt}, {args.split} split ({len(split)} questions), accuracy (%) by question type:\n")
    print("| question type | " + " | ".join([f"exit after layer {l}" for l in layers] + ["final layer"]) + " |")
    print("|---" * (len(layers) + 2) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.1f}" for a in [*row["exits"], row["final"]]) + " |")
    print("| all | " + " | ".join(f"**{a:.1f}**" for a in overall) + " |")
    if free is not None:
        untrained = infer.collect(FREE(free.backbone, ExitConfig(**vars(free.cfg))).eval(), split, 256)
        for name, p in (("all, exits as initialised", untrained["exits"]), ("all, raw readout", probs["raw"])):
            print(f"| {name} | " + " | ".join(f"{100 * split.score(every, q.argmax(1)).mean().item():.1f}"
                                              for q in p) + " | |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
