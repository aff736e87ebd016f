"""Does the model see what is where? Linear probes of its tokens, per object.

    python experiments/probe_tokens.py CKPT [--images 400] [--threads 2] [--random]

CKPT: a train.py checkpoint or an exported backbone (backbones/*.pt), of the built-in shapes data. On fresh
shapes images, each probe is fitted on some and scored on others, beside the share of the most common class:
  * colour, shape: every ViT token -> the colour and shape under it (the targets of stand_ins.PatchProbe),
    scored on the tokens that cover an object;
  * position: the visual token the language model reads (VLM.embed's, after the merge and the position
    embedding) under each object's centre -> where the object is: the right or left half, the bottom or
    top half (which the token's own place decides), and its cell of an 8 x 8 grid (shapes.fact_cell, the
    cells of `relate`'s scene facts: finer than a visual token, so the token must also say where in it).
--random: the same architecture at its random initialisation.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                         # noqa: E402
from model import VLM                                               # noqa: E402
from util import checkpoints, config, runtime, shapes               # noqa: E402
from util.checkpoints import build_from_checkpoint                  # noqa: E402
from util.stand_ins import PatchProbe                               # noqa: E402


def tokens_and_targets(model: VLM, split, n: int):
    """The first n images' ViT tokens (n*P, Dv) and their colour / shape classes (n*P,) each."""
    device = runtime.device_of(model)
    with torch.no_grad():
        x = model.patch_features(split.images[:n].contiguous().float().div(255).to(device)).flatten(0, 1).cpu()
    labels = split.pixel_labels[:n]
    return x, [PatchProbe.targets(labels, model.cfg.patch_size, channel).flatten() for channel in (0, 1)]


def visual_tokens(model: VLM, images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, H, W, 3) -> the visual tokens the language model reads of them (n, N, D), as VLM.embed
    gives them (after the merge and the position embedding)."""
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)        # (n, 3, H, W)
        return model.encode_image(pixels.to(runtime.device_of(model))).cpu()    # (n, N, D)


def fresh_visual_tokens(model: VLM, n: int, seed: int):
    """n fresh scenes (lists of shapes.Obj) and their visual tokens (n, N, D)."""
    rng, size = np.random.default_rng(seed), model.cfg.image_size
    scenes = [shapes.make_scene(rng, size) for _ in range(n)]
    return scenes, visual_tokens(model, np.stack([shapes.render_scene(objs, rng, size) for objs in scenes]))


def object_positions(model: VLM, scenes: list, visual: torch.Tensor):
    """The visual token under each object's centre (n_obj, D) and where the object is (n_obj, 3): right
    half, bottom half, shapes.fact_cell."""
    size, side = model.cfg.image_size, model.grid // model.cfg.merge                   # visual tokens a side
    tokens, where = [], []
    for i, objs in enumerate(scenes):
        for o in objs:
            tokens.append(visual[i, int(o.y * side / size) * side + int(o.x * side / size)])
            where.append([int(o.x > size / 2), int(o.y > size / 2), shapes.fact_cell(o, size)])
    return torch.stack(tokens), torch.tensor(where)


def place_to_content(model: VLM, visual: torch.Tensor, n: int = 100) -> float:
    """How loudly a visual token says where it is, beside what it shows: the root-mean-square of each place's
    mean token on n blank images (background only, so only the place differs) about their mean, over that
    of the tokens of real scenes `visual` (n', N, D) about their place's mean. A linear probe reads position
    at any scale (it standardises each dimension); attention, which compares whole tokens, hears it at this
    ratio."""
    rng = np.random.default_rng(0)
    blank = visual_tokens(model, np.stack([shapes.render_scene([], rng, model.cfg.image_size) for _ in range(n)]))
    place = blank.mean(dim=0) - blank.mean(dim=(0, 1))                                  # (N, D)
    content = visual - visual.mean(dim=0)                                               # (n', N, D)
    return float(place.pow(2).sum(dim=1).mean().sqrt() / content.pow(2).sum(dim=2).mean().sqrt())


def probe_accuracy(x_fit: torch.Tensor, fit: torch.Tensor, x_val: torch.Tensor, val: torch.Tensor,
                   on_object: bool = True) -> float:
    """A full-batch logistic regression fitted on (x_fit, fit): the share of val's rows it reads right (of
    those with a class > 0, the tokens on an object, if on_object)."""
    probe = torch.nn.Linear(x_fit.shape[1], int(fit.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(probe(x_fit), fit)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = val > 0 if on_object else torch.ones_like(val, dtype=torch.bool)
    with torch.no_grad():
        return (probe(x_val[rows]).argmax(1) == val[rows]).float().mean().item()


def standardise(x_fit: torch.Tensor, x_val: torch.Tensor):
    """Both sets scaled by the fitting set's mean and std per dimension."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    return (x_fit - mean) / std, (x_val - mean) / std


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint or exported backbone (shapes data)")
    p.add_argument("--images", type=int, default=400, help="images to fit the probe on (and a quarter as many to score it)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = the cores other work leaves free)")
    p.add_argument("--random", action="store_true", help="probe the architecture at its random initialisation instead")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where the encoder runs (auto: cuda, then mps, then cpu; the probe fits on the CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(runtime.pick_threads(args.threads)[0])
    try:
        model, _, tokenizer, answers, dcfg = build_from_checkpoint(checkpoints.load_checkpoint(args.ckpt, "CKPT"))
        device = runtime.pick_device(args.device)
    except config.UsageError as e:
        raise SystemExit(f"error: {e}")
    if dcfg.data != "shapes":                           # e.g. the shapes set written as VQA files
        print(f"note: {args.ckpt} was trained on --data {dcfg.data}; the probe draws shapes scenes with their pixel "
              "labels, which says something only if its files were shapes written by data.py --write")
    torch.manual_seed(0)
    model = (VLM(cfg=model.cfg) if args.random else model).to(device).eval()
    print(f"encoder on {device}")
    cfg = data.DataConfig(train_images=args.images, val_images=max(1, args.images // 4), test_images=1, data_seed=12345)
    splits, _, _ = data.load_data(cfg, tokenizer, answers, only=("train", "val"))
    x_fit, y_fit = tokens_and_targets(model, splits["train"], args.images)
    x_val, y_val = tokens_and_targets(model, splits["val"], cfg.val_images)
    x_fit, x_val = standardise(x_fit, x_val)
    for name, fit, val in (("colour", y_fit[0], y_val[0]), ("shape", y_fit[1], y_val[1])):
        right = probe_accuracy(x_fit, fit, x_val, val)
        common = val[val > 0].bincount().max().item() / (val > 0).sum().item()
        print(f"{name}: {100 * right:.1f} % of object tokens read right (most common class: {100 * common:.1f} %)")
    (fit_scenes, fit_visual), (val_scenes, val_visual) = (fresh_visual_tokens(model, n, seed)
                                                          for n, seed in ((args.images, 1), (cfg.val_images, 2)))
    print(f"position: a visual token's place, against what it shows: {place_to_content(model, fit_visual):.2f} "
          "(root-mean-square ratio, see place_to_content)")
    (p_fit, w_fit), (p_val, w_val) = (object_positions(model, fit_scenes, fit_visual),
                                      object_positions(model, val_scenes, val_visual))
    p_fit, p_val = standardise(p_fit, p_val)
    for j, name in enumerate(("right half", "bottom half", f"cell of {shapes.FACT_GRID}x{shapes.FACT_GRID}")):
        right = probe_accuracy(p_fit, w_fit[:, j], p_val, w_val[:, j], on_object=False)
        common = w_val[:, j].bincount().max().item() / len(w_val)
        print(f"position, {name}: {100 * right:.1f} % of objects read right from the visual token under them "
              f"(most common class: {100 * common:.1f} %)")


if __name__ == "__main__":
    main()
