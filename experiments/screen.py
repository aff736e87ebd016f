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
import re
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                         # noqa: E402
from model import VLM                                               # noqa: E402
import train                                                        # noqa: E402
from util import config, runtime, scenes, shapes, stand_ins         # noqa: E402


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


def find_objects(pixel_labels: torch.Tensor) -> list[list[tuple]]:
    """The objects of each image, recovered from its pixel labels (n_img, 2, H, W): [(colour index, shape index,
    x, y)] with (x, y) the generator's centre in pixels. Objects never touch (shapes.make_scene keeps them 2 px
    apart), so each connected region of foreground is one object: every pixel takes the largest id among its
    3 x 3 neighbours until nothing changes. A triangle's centre lies 0.133 r above its centroid (r from its
    area, 1.7 r^2)."""
    n, _, H, W = pixel_labels.shape
    fg = (pixel_labels[:, 0] > 0).float()[:, None]                                   # (n, 1, H, W)
    ids = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W) * fg
    while True:
        grown = torch.nn.functional.max_pool2d(ids, 3, stride=1, padding=1) * fg
        if torch.equal(grown, ids):
            break
        ids = grown
    # one entry per (image, region): pixel count, summed coordinates, colour and shape (the same on every pixel)
    key = (torch.arange(n).view(n, 1, 1) * (H * W + 1) + ids[:, 0].long()).flatten()    # (n H W,)
    keys, region = key.unique(return_inverse=True)                                       # region ids, background included
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    per_region = lambda v: torch.zeros(len(keys)).index_add_(0, region, v.float().expand(n, H, W).reshape(-1))
    area, sx, sy = per_region(fg[:, 0]), per_region(xx), per_region(yy)
    colour = torch.zeros(len(keys), dtype=torch.long).scatter_reduce_(0, region, pixel_labels[:, 0].flatten().long(), "amax")
    shape = torch.zeros(len(keys), dtype=torch.long).scatter_reduce_(0, region, pixel_labels[:, 1].flatten().long(), "amax")
    scenes = [[] for _ in range(n)]
    for k in torch.nonzero(keys % (H * W + 1)).flatten().tolist():                      # the foreground regions
        x, y = float(sx[k] / area[k]), float(sy[k] / area[k])
        if shapes.SHAPES[int(shape[k]) - 1] == "triangle":
            y -= (2 / 3 * 1.7 - 1) * math.sqrt(float(area[k]) / 1.7)
        scenes[int(keys[k]) // (H * W + 1)].append((int(colour[k]) - 1, int(shape[k]) - 1, x, y))
    return scenes


def object_patches(split, patch_size: int, width: int, merge: int = 2):
    """Perfect object-level perception, for a diagnostic (as in Relation Networks' "state description"
    inputs): one visual token per object, holding its colour and shape (one-hot) and its centre (x, y in
    [-1, 1], with sin/cos of pi k x and pi k y, k = 1..4); the other visual tokens are zero. Written into the
    first ViT token of each merged block, so that the language model reads one object per visual token."""
    H = split.pixel_labels.shape[-1]
    g = H // patch_size
    x, k = torch.zeros(len(split.images), g, g, width), torch.arange(1, 5) * math.pi
    for i, objs in enumerate(find_objects(split.pixel_labels)):
        for j, (colour, shape, cx, cy) in enumerate(objs):
            p = torch.tensor([2 * cx / H - 1, 2 * cy / H - 1])
            feats = torch.cat([torch.nn.functional.one_hot(torch.tensor(colour), len(shapes.COLORS)).float(),
                               torch.nn.functional.one_hot(torch.tensor(shape), len(shapes.SHAPES)).float(),
                               p, (p[:, None] * k).sin().flatten(), (p[:, None] * k).cos().flatten()])
            row, col = divmod(j, g // merge)
            x[i, row * merge, col * merge, :len(feats)] = feats
    split.patches = x.view(len(split.images), g * g, width).half()                       # (n_img, P, Dv)
    return split


class SeenScenes(scenes.TrainScenes):
    """The train split of every epoch, seen through `see` (an oracle's perception, or as it is)."""

    def __init__(self, see, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.see = see

    def __call__(self, epoch: int):
        split = super().__call__(epoch)
        return split if epoch == 0 else self.see(split)


def blind_score(objs: list, question: str, answer: str) -> float:
    """The expected score on one `relate` question of a model that sees every object's colour and shape but
    not where it is: it names the asked attribute of one of the objects other than the reference, at random."""
    name = re.search(r"(?:closest to|farthest from) the (.+?)(?: has|\?)", question).group(1)
    ref = next(o for phrase, o in shapes.reference_names(objs) if phrase == name)
    attr = "color" if "color" in question else "shape"
    others = [getattr(o, attr) for o in objs if o is not ref]
    return others.count(answer) / len(others)


def relate_without_positions(n_scenes: int = 3000, seed: int = 1) -> float:
    """blind_score averaged over the `relate` questions of n_scenes new scenes, in %. A model at this figure
    has learned the question's form, not the relation."""
    rng, scores = np.random.default_rng(seed), []
    for _ in range(n_scenes):
        objs = shapes.make_scene(rng)
        qa = shapes.GENERATORS["relate"](objs, rng)
        if qa is not None:
            scores.append(blind_score(objs, *qa[:2]))
    return 100.0 * sum(scores) / len(scores)


ASK_COMPARE = shapes.GENERATORS["compare"]
SIDES = {"left": ("x", False), "right": ("x", True), "top": ("y", False), "bottom": ("y", True)}


def ask_side(objs, rng):
    """A positional family of the screen's own (not in data.FAMILIES): "is the red object on the
    left?", yes when the named object's centre lies in that half of the image (never asked of an
    object within 4 px of the middle). The answer is a single position, read off one object: what
    a model that knows where its visual tokens are learns at once."""
    refs = [(name, o) for name, o in shapes.reference_names(objs)
            if min(abs(o.x - 32), abs(o.y - 32)) >= 4]
    if not refs:
        return None
    name, o = refs[rng.integers(len(refs))]
    side = str(rng.choice(list(SIDES)))
    axis, beyond = SIDES[side]
    return f"is the {name} on the {side}?", "yes" if (getattr(o, axis) > 32) == beyond else "no", {}


def more_only(objs, rng):
    """`compare` without its more/fewer flip, for a diagnostic: only the questions that say "more"."""
    qa = ASK_COMPARE(objs, rng)
    return None if qa is None or "fewer" in qa[0] else qa


def screen(families: list[str], steps: int, seed: int, out: str, flags: list[str], oracle: str = "",
           pos_std: float = 0.0, only_more: bool = False) -> dict:
    """One proxy run: val accuracy per family (%) after `steps` steps, and each family's majority answer."""
    saved = list(data.FAMILIES), dict(shapes.GENERATORS), dict(shapes.ANSWER_TYPES)
    data.FAMILIES[:] = families                                     # the generator asks these families only
    shapes.GENERATORS["side"], shapes.ANSWER_TYPES["side"] = ask_side, "yes/no"
    if only_more:
        shapes.GENERATORS["compare"] = more_only
    try:
        return proxy_run(seed, out, flags, oracle, pos_std, steps)
    finally:                                                        # the generator as it was
        data.FAMILIES[:] = saved[0]
        for table, before in ((shapes.GENERATORS, saved[1]), (shapes.ANSWER_TYPES, saved[2])):
            table.clear()
            table.update(before)


def proxy_run(seed: int, out: str, flags: list[str], oracle: str, pos_std: float, steps: int) -> dict:
    _, dcfg, mcfg, tcfg, ecfg = train.parse_args(flags + ["--seed", str(seed), "--out", out, "--stage", "backbone"])
    train.validate(dcfg, mcfg, tcfg, ecfg)                        # the flags checked and completed as train.py does
    torch.set_num_threads(tcfg.threads or torch.get_num_threads())
    runtime.use_device(tcfg.device)                                 # device and dtype, as train.py
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    splits, tok, answers = data.load_data(dcfg, only=("train", "val"))
    mcfg.vocab_size, mcfg.num_answers = tok.get_vocab_size(), len(answers)
    tcfg.epochs = math.ceil(steps / math.ceil(len(splits["train"]) / tcfg.batch_size))
    device = runtime.RUN["device"]
    model = VLM(cfg=mcfg).to(device)
    if pos_std:     # the question's and the image's position embeddings at this scale (the core: std 0.02)
        for pos in (model.text_pos, model.visual_pos):
            torch.nn.init.normal_(pos, std=pos_std)
    see = lambda split: split
    if oracle:
        see = {"patches": lambda split: oracle_patches(split, mcfg.patch_size, mcfg.vit_dim),
               "objects": lambda split: object_patches(split, mcfg.patch_size, mcfg.vit_dim, mcfg.merge)}[oracle]
        splits = {name: see(split) for name, split in splits.items()}
    # drawn in this process: the generator is changed in place here (screen), which a worker would not see
    scenes = SeenScenes(see, dcfg, splits["train"], tok, answers, tcfg.epochs, workers=0)
    heads = {}
    keep_heads = lambda epoch, step, opt, scaler, trained: heads.update(trained)     # in place of a checkpoint
    train.train_backbone(model, splits, tcfg, keep_heads, None, scenes)
    res = train.evaluate(model, splits["val"], device)
    facts = fact_accuracy(model, heads["scene"][1], splits["val"], device) if "scene" in heads else {}
    return {"accuracy": res["per_family"], "majority": data.majority_baseline(splits["train"], splits["val"]),
            "facts": facts}


@torch.no_grad()
def fact_accuracy(model: VLM, scene: "stand_ins.SceneHeads", split, device) -> dict[str, float]:
    """How often the trained SceneHeads read each scene fact right on `split` (%), over the questions that
    have it. The `reference` cell says whether positions reach the language model at all."""
    model.eval()
    hits, counts = torch.zeros(len(data.FACTS)), torch.zeros(len(data.FACTS))
    for ids in data.batches(len(split), train.EVAL_BATCH):
        states, _ = model.hidden_states(**runtime.to_device(split.batch(ids), device))
        preds = torch.stack([z.argmax(dim=1).cpu() for z in scene.logits(states[-1][:, 0]).values()], dim=1)
        has = split.facts[ids] >= 0                                                                  # (B, F)
        hits += ((preds == split.facts[ids]) & has).sum(dim=0)
        counts += has.sum(dim=0)
    return {name: 100.0 * float(h / c) for name, h, c in zip(data.FACTS, hits, counts) if c > 0}


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder of the runs' logs")
    p.add_argument("--families", nargs="+", default=["relate"], choices=[*data.FAMILIES, "side"],
                   help="question families (side: the screen's positional question, see ask_side)")
    p.add_argument("--steps", type=int, default=1500, help="stage-1 steps of each run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--oracle", choices=["patches", "objects"], default="", help="perfect perception, per patch "
                   "(oracle_patches) or per object (object_patches); give --freeze-vit")
    p.add_argument("--only-more", action="store_true", help="diagnostic: compare asks 'more' only (see more_only)")
    p.add_argument("--pos-std", type=float, default=0.0, help="initialise the text and visual position embeddings at "
                   "this std instead of the core's 0.02 (the tokens they are added to have std about 1)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        results = [screen(args.families, args.steps, s, os.path.join(args.out, f"seed{s}"), flags, args.oracle,
                          args.pos_std, args.only_more)
                   for s in args.seeds]
    except config.UsageError as e:                                     # a bad train.py flag: one line, no traceback
        raise SystemExit(f"error: {e}")
    if "relate" in args.families:
        print(f"relate without positions (see relate_without_positions): {relate_without_positions():.1f}%")
    for s, r in zip(args.seeds, results):
        print(f"seed {s}: " + "  ".join(f"{f} {a:.1f}% (majority {r['majority'][f]:.1f}%)" for f, a in r["accuracy"].items())
              + "".join(f"  [fact {name} {a:.1f}%]" for name, a in r["facts"].items()))
    arm = " ".join([*flags, *([f"--oracle {args.oracle}"] if args.oracle else []), *(["--only-more"] if args.only_more else []),
                    *([f"--pos-std {args.pos_std:g}"] if args.pos_std else [])]) or "(defaults)"
    for f in results[0]["accuracy"]:
        accs = [r["accuracy"][f] for r in results]
        spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        print(f"{arm} | {f} | {statistics.mean(accs):.1f}{spread} | majority {results[0]['majority'][f]:.1f} | "
              f"{args.steps} steps, seeds {' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
