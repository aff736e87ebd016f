"""The paper's GAN term trained the way the GAN literature trains a discriminator that wins from the start:
three remedies, each screened on val against the paper's term as it is and against free-min's default.

    python experiments/gan_remedies.py BACKBONE OUTDIR [--seeds 0 1 2] [--baseline runs/compare]
    python experiments/gan_remedies.py --table OUTDIR [--baseline runs/compare]      # finished runs only

Every run is stage 2 of FREE with the paper's term (--adv-loss gan), label-free (F = 0, where the adversarial
term is all the exits have besides distillation), on the same backbone, exits, steps and seeds as
experiments/compare.py, with one change to the discriminator D:
  smooth  one-sided label smoothing: D's target for the final layer's features is 0.9, not 1 (Salimans et
          al. 2016, "Improved techniques for training GANs", section 3.4)
  noise   instance noise: Gaussian noise on everything D reads, real and fake, in D's step and in the exits',
          its std annealed from NOISE_STD to 0 over the run (Sønderby et al. 2017, "Amortised MAP inference
          for image super-resolution", section 3.3; Arjovsky & Bottou 2017)
  sn      spectral normalisation of D's three linear layers (Miyato et al. 2018, "Spectral normalization for
          generative adversarial networks")
The remedies live here, patched over free_min for the run: none is part of free-min unless it wins. Instance
noise won (RESULTS.md, 2026-12-08) and is kept as `train.py --disc-noise 1.0` (a test checks that it trains
the same exits, bit for bit, as the patch here).
The table reads each run's val accuracy per exit after the last epoch (OUT/log.jsonl) and sets them beside
compare.py's runs of the paper's term (free_gan_F0_sS) and of the default (free_F0_sS) from --baseline:
mean ± std over seeds. A remedy wins if its mean over the exits beats the paper's term by more than the two
stds together.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import free_min                                                     # noqa: E402
import train                                                        # noqa: E402
from compare import mean_std                                        # noqa: E402

REMEDIES = ("smooth", "noise", "sn")
REAL_TARGET = 0.9        # smooth: D's target for real features (Salimans et al.: 0.9)
NOISE_STD = 1.0          # noise: the std at the start; D reads LayerNorm'd features, of std ~1 per dimension


def smoothed_discriminator_loss(free, real, fakes):
    """free_min.discriminator_loss with the real target REAL_TARGET (one-sided: fakes keep 0)."""
    norm = free.backbone.norm
    d_real = free.disc(norm(real)).float()                                                # (B,)
    d_fake = free.disc(norm(torch.cat(fakes).detach())).float()                           # (K*B,)
    loss = F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, REAL_TARGET)) + \
        F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return loss, {"d_loss": loss.detach(), "d_real_acc": (d_real > 0).float().mean(),
                  "d_fake_acc": (d_fake < 0).float().mean()}


def patch(remedy: str, total_steps: int) -> None:
    """Change free_min's D (and train.py's D step) for this process."""
    if remedy == "smooth":
        train.discriminator_loss = smoothed_discriminator_loss
    elif remedy == "noise":
        done, forward, d_step = [0], free_min.Discriminator.forward, train.discriminator_loss

        def counted_d_step(free, real, fakes):
            done[0] += 1
            return d_step(free, real, fakes)

        def noisy_forward(self, x):
            if self.training:
                x = x + NOISE_STD * max(0.0, 1 - done[0] / total_steps) * torch.randn_like(x)
            return forward(self, x)
        train.discriminator_loss, free_min.Discriminator.forward = counted_d_step, noisy_forward
    elif remedy == "sn":
        init = free_min.Discriminator.__init__

        def spectral_init(self, dim, hidden):
            init(self, dim, hidden)
            for module in [*self.body, self.out]:
                if isinstance(module, torch.nn.Linear):
                    torch.nn.utils.parametrizations.spectral_norm(module)
        free_min.Discriminator.__init__ = spectral_init
    else:
        raise SystemExit(f"error: unknown remedy {remedy!r} (one of {', '.join(REMEDIES)})")


def flags(backbone: str, out: str, seed: int, threads: int) -> list[str]:
    return ["--stage", "exits", "--backbone", backbone, "--out", out, "--no-final-eval", "--exit-method", "free",
            "--adv-loss", "gan", "--label-fraction", "0", "--seed", str(seed), "--threads", str(threads)]


def one(remedy: str, argv: list[str]) -> None:
    """One stage-2 run with `remedy` patched in (this process)."""
    _, dcfg, _, tcfg, ecfg = train.parse_args(argv)
    steps = ecfg.exit_epochs * math.ceil(dcfg.train_images * dcfg.questions_per_image / tcfg.batch_size)
    patch(remedy, steps)
    train.main(argv)


def last_val(folder: str) -> dict[int, float] | None:
    """Layer -> val accuracy of its exit after a finished run's last epoch, or None."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "ckpt.pt")):
        return None
    with open(path) as f:
        rows = list(map(json.loads, f))
    val = [r for r in rows if "val_exits" in r]
    finished = any("test_exits" in r for r in rows)                  # stage 2 ends with its test line
    return {e["layer"]: e["accuracy"] for e in val[-1]["val_exits"]} if val and finished else None


def table(out: str, baseline: str, seeds: list[int]) -> str:
    """Val accuracy per exit and over the exits, mean ± std over seeds, one row per setting."""
    settings = {"paper's GAN term": (baseline, "free_gan_F0_s{}"), "default term (fm)": (baseline, "free_F0_s{}")}
    settings |= {f"GAN term + {r}": (out, r + "_s{}") for r in REMEDIES}
    found = {name: [v for v in (last_val(os.path.join(folder, pattern.format(s))) for s in seeds) if v]
             for name, (folder, pattern) in settings.items()}
    layers = sorted({l for runs in found.values() for r in runs for l in r})
    rows = ["| setting | n | " + " | ".join(f"exit L{l}" for l in layers) + " | mean over exits |",
            "|---" * (len(layers) + 3) + "|"]
    for name, runs in found.items():
        if runs:
            cells = [mean_std([r[l] for r in runs], ".2f") if all(l in r for r in runs) else "-" for l in layers]
            cells.append(mean_std([statistics.mean(r.values()) for r in runs], ".2f"))
            rows.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    means = {name: [statistics.mean(r.values()) for r in runs] for name, runs in found.items() if len(runs) > 1}
    paper = means.get("paper's GAN term")
    for name, xs in means.items():
        if paper and name.startswith("GAN term +"):
            gain, spread = statistics.mean(xs) - statistics.mean(paper), statistics.stdev(xs) + statistics.stdev(paper)
            rows.append(f"{name}: {gain:+.2f} points over the paper's term, spread {spread:.2f}: "
                        f"{'wins' if gain > spread else 'does not win'}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbone", nargs="?", help="the trained backbone (e.g. backbones/shapes-default.pt)")
    p.add_argument("out", nargs="?", help="folder of the runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every remedy")
    p.add_argument("--remedies", nargs="+", default=list(REMEDIES), choices=REMEDIES, help="remedies to run")
    p.add_argument("--baseline", default="runs/compare", help="compare.py's folder (the paper's term, the default)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    p.add_argument("--table", metavar="OUTDIR", help="only print the table of the finished runs in OUTDIR")
    p.epilog = "Each run is this script again, as: gan_remedies.py --one REMEDY TRAIN.PY-FLAGS..."
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table, args.baseline, args.seeds))
        return
    if not (args.backbone and args.out):
        p.error("give BACKBONE and OUTDIR (or --table OUTDIR)")
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for remedy in args.remedies:
            folder = os.path.join(args.out, f"{remedy}_s{seed}")
            if last_val(folder) is None:
                with open(folder + ".log", "w") as log:
                    cmd = [sys.executable, __file__, "--one", remedy, *flags(args.backbone, folder, seed, args.threads)]
                    if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                        raise SystemExit(f"failed: {folder} (see {folder}.log)")
                print(f"done: {folder}", flush=True)
    print(table(args.out, args.baseline, args.seeds))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        one(sys.argv[2], sys.argv[3:])
    else:
        main()
