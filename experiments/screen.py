"""Short stage-1 proxies for screening backbone ideas before a full run: the shapes data restricted to one or
two question families (new scenes every epoch), a few hundred steps, several seeds, each scored on val
against the family's majority answer.

    python experiments/screen.py OUTDIR --families relate --steps 1500 --seeds 0 1 2 -- [train.py flags]

Everything after `--` goes to train.py's parser (the model flags, --lr, ...): what is screened is what a full
run would train. Prints one line per seed and the mean +- std per family.
"""
import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                         # noqa: E402
import train                                                        # noqa: E402
from model import VLM                                               # noqa: E402


def oracle_patches(split, patch_size: int, width: int):
    """Perfect perception, for a diagnostic: every ViT token replaced by the fractions of its patch covered by
    each colour and each shape (background included), from the generator's pixel labels, zero-padded to
    the ViT width. With --freeze-vit (no auxiliary heads), the language model reads these in place of the
    encoder's tokens (Split.patches)."""
    fractions = [torch.nn.functional.avg_pool2d(torch.nn.functional.one_hot(split.pixel_labels[:, c].long(), k)
                                                .permute(0, 3, 1, 2).float(), patch_size) for c, k in ((0, 7), (1, 5))]
    x = torch.cat(fractions, dim=1).flatten(2).transpose(1, 2)                     # (n_img, P, 12)
    split.patches = torch.nn.functional.pad(x, (0, width - x.shape[-1])).half()     # (n_img, P, Dv)
    return split


def screen(families: list[str], steps: int, seed: int, out: str, flags: list[str], oracle: bool = False) -> dict:
    """One proxy run: val accuracy per family (%) after `steps` steps, and each family's majority answer."""
    data.FAMILIES[:] = families                                     # the generator asks these families only
    _, dcfg, mcfg, tcfg, _ = train.parse_args(flags + ["--seed", str(seed), "--out", out, "--stage", "backbone"])
    torch.set_num_threads(tcfg.threads or torch.get_num_threads())
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    splits, tok, answers = data.load_data(dcfg, only=("train", "val"))
    mcfg.image_size, mcfg.max_text_len = dcfg.image_size, dcfg.max_question_len
    mcfg.vocab_size, mcfg.num_answers = tok.get_vocab_size(), len(answers)
    tcfg.epochs = math.ceil(steps / math.ceil(len(splits["train"]) / tcfg.batch_size))
    model = VLM(cfg=mcfg)
    fresh = lambda epoch: splits["train"] if epoch == 0 else data.fresh_train_split(dcfg, epoch, tok, answers)
    if oracle:
        see = lambda split: oracle_patches(split, mcfg.patch_size, mcfg.vit_dim)
        splits = {name: see(split) for name, split in splits.items()}
        fresh = (lambda f: lambda epoch: see(f(epoch)))(fresh)
    train.train_backbone(model, splits, tcfg, torch.device("cpu"), torch.float32, lambda *a: None, None, fresh)
    res = train.evaluate(model, splits["val"], torch.device("cpu"), torch.float32)
    return {"accuracy": res["per_family"], "majority": data.majority_baseline(splits["train"], splits["val"])}


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder of the runs' logs")
    p.add_argument("--families", nargs="+", default=["relate"], choices=list(data.FAMILIES), help="question families")
    p.add_argument("--steps", type=int, default=1500, help="stage-1 steps of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--oracle", action="store_true", help="perfect perception (see oracle_patches; give --freeze-vit)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    results = [screen(args.families, args.steps, s, os.path.join(args.out, f"seed{s}"), flags, args.oracle)
               for s in args.seeds]
    for s, r in zip(args.seeds, results):
        print(f"seed {s}: " + "  ".join(f"{f} {a:.1f}% (majority {r['majority'][f]:.1f}%)" for f, a in r["accuracy"].items()))
    for f in results[0]["accuracy"]:
        accs = [r["accuracy"][f] for r in results]
        spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        print(f"{' '.join(flags) or '(defaults)'}{' --oracle' if args.oracle else ''} | {f} | {statistics.mean(accs):.1f}{spread} | majority "
              f"{results[0]['majority'][f]:.1f} | {args.steps} steps, seeds {' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
