"""Does an image encoder see colour and shape? A linear probe on its ViT tokens, per object token.

    python experiments/probe_tokens.py CKPT [--images 400] [--threads 2] [--random]

CKPT: a train.py checkpoint or an exported backbone (backbones/*.pt), of the built-in shapes data. Fits a
linear read-out of every ViT token -> (colour, shape) under it (the targets of stand_ins.PatchProbe) on fresh
shapes images, and prints its accuracy on the tokens that cover an object, on other fresh images, beside
the share of the most common class. --random: the same architecture at its random initialisation.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                                   # noqa: E402
import runtime                                                                # noqa: E402
from prepare import build_from_checkpoint                                     # noqa: E402
from model import VLM                                                         # noqa: E402
from stand_ins import PatchProbe                                              # noqa: E402


def tokens_and_targets(model: VLM, split, n: int):
    """The first n images' ViT tokens (n*P, Dv) and their colour / shape classes (n*P,) each."""
    device = next(model.parameters()).device
    with torch.no_grad():
        x = model.patch_features(split.images[:n].float().div(255).to(device)).flatten(0, 1).cpu()
    labels = split.pixel_labels[:n]
    return x, [PatchProbe.targets(labels, model.cfg.patch_size, channel).flatten() for channel in (0, 1)]


def probe_accuracy(x_fit: torch.Tensor, fit: torch.Tensor, x_val: torch.Tensor, val: torch.Tensor) -> float:
    """A full-batch logistic regression fitted on (x_fit, fit): the share of val's object tokens it reads right."""
    probe = torch.nn.Linear(x_fit.shape[1], int(fit.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(probe(x_fit), fit)
        opt.zero_grad()
        loss.backward()
        opt.step()
    on_object = val > 0
    with torch.no_grad():
        return (probe(x_val[on_object]).argmax(1) == val[on_object]).float().mean().item()


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
        model, _, tokenizer, answers, dcfg = build_from_checkpoint(runtime.load_checkpoint(args.ckpt, "CKPT"))
        device = runtime.pick_device(args.device)
    except runtime.UsageError as e:
        raise SystemExit(f"error: {e}")
    if dcfg.data != "shapes":
        raise SystemExit(f"error: {args.ckpt} was trained on --data {dcfg.data}; the probe needs the shapes data's pixel labels")
    torch.manual_seed(0)
    model = (VLM(cfg=model.cfg) if args.random else model).to(device).eval()
    print(f"encoder on {device}")
    cfg = data.DataConfig(train_images=args.images, val_images=max(1, args.images // 4), test_images=1, data_seed=12345)
    splits, _, _ = data.load_data(cfg, tokenizer, answers, only=("train", "val"))
    x_fit, y_fit = tokens_and_targets(model, splits["train"], args.images)
    x_val, y_val = tokens_and_targets(model, splits["val"], cfg.val_images)
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_val = (x_fit - mean) / std, (x_val - mean) / std
    for name, fit, val in (("colour", y_fit[0], y_val[0]), ("shape", y_fit[1], y_val[1])):
        right = probe_accuracy(x_fit, fit, x_val, val)
        common = val[val > 0].bincount().max().item() / (val > 0).sum().item()
        print(f"{name}: {100 * right:.1f} % of object tokens read right (most common class: {100 * common:.1f} %)")


if __name__ == "__main__":
    main()
