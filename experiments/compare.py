"""FREE against the baselines on one frozen backbone, over label fractions and seeds, as one markdown table.

    python experiments/compare.py BACKBONE OUTDIR [--seeds 0 1 2] [--fractions 0 0.01 0.1 1] [--threads 2]
    python experiments/compare.py --table OUTDIR/run_a OUTDIR/run_b ...       # the table of finished runs only

Methods (all on the same exits, steps and seeds): `free` with the paper's GAN term (--adv-loss gan), `free`
with free-min's default (feature matching), `kd` (distillation only; it reads no label, so one run per seed)
and `ce` (labels only; F > 0). Each run is `train.py --stage exits` into OUTDIR/NAME, then `infer.py --eval
--no-timing` (accuracy and the layer view: deterministic); finished runs are skipped, so the script can be
stopped and started again. Rows group the runs that differ only in their seed: mean +- std over them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from free_min import ExitConfig                                     # noqa: E402
from util.checkpoints import load_checkpoint                        # noqa: E402
from util.config import CheckpointError, UsageError                 # noqa: E402

METHODS = {"free_gan": ["--exit-method", "free", "--adv-loss", "gan"], "free": ["--exit-method", "free"],
           "kd": ["--exit-method", "kd"], "ce": ["--exit-method", "ce"]}
HARD, HARD_AT = ("compare", "relate"), (2, 4)     # the families where depth matters, and the exits shown for them


def run(name: str, out: str, backbone: str, flags: list[str], threads: int) -> str:
    """One stage-2 run and its untimed report, unless OUTDIR/NAME/report.json exists. Returns the folder."""
    folder = os.path.join(out, name)
    if not os.path.isfile(os.path.join(folder, "report.json")):
        common = ["--threads", str(threads)]
        with open(folder + ".log", "w") as log:
            for cmd in (["train.py", "--stage", "exits", "--backbone", backbone, "--out", folder, "--no-final-eval", *flags],
                        ["infer.py", "--ckpt", os.path.join(folder, "ckpt.pt"), "--eval", "--no-timing", "--json",
                         os.path.join(folder, "report.json")]):
                if subprocess.run([sys.executable, *cmd, *common], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"failed: {folder} (see {folder}.log)")
        print(f"done: {folder}")
    return folder


def read_run(folder: str) -> dict:
    """A finished run: its exit config (ckpt.pt) and its test report (report.json)."""
    state = load_checkpoint(os.path.join(folder, "ckpt.pt"), "run")
    if "exit_config" not in state:
        raise CheckpointError(f"{folder}: holds a backbone but no exits")
    try:
        with open(os.path.join(folder, "report.json")) as f:
            report = json.load(f)
        report["exits"], report["per_family"], report["calibrated"]        # what the table reads
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: not a finished run ({e.__class__.__name__}: {e})")
    return {"config": state["exit_config"], "report": report}


def label(config: dict) -> str:
    """A run's method and every exit setting other than the defaults (seed and label fraction aside)."""
    default = asdict(ExitConfig())
    changed = [f"{k}={v}" for k, v in config.items() if k not in ("exit_method", "label_fraction", "exit_layers")
               and v != default.get(k)]
    return config["exit_method"] + (f" ({', '.join(changed)})" if changed else "")


def mean_std(values: list[float], fmt: str = ".1f") -> str:
    """'m' for one value, 'm ± s' (sample std) for several."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt.lstrip('+')}}"


def exit_accuracy(report: dict, layer: int, family: str | None = None) -> float | None:
    """The test accuracy of the exit after `layer` (over one question family, or all); None if there is none."""
    layers = [e["layer"] for e in report["exits"]]
    if layer not in layers:
        return None
    if family is None:
        return report["exits"][layers.index(layer)]["accuracy"]
    return report["per_family"][family]["exits"][layers.index(layer)]


def guaranteed_cell(reports: list[dict]) -> str:
    """The certified points of a group of runs: rule, thresholds and exits, then the test accuracy drop,
    the mean layers run and the predicted speedup (FLOPs), mean ± std; or how many certified nothing."""
    cals = [r["calibrated"] for r in reports]
    none = sum(c["threshold"] is None for c in cals)
    if none:
        return f"none certified ({none} of {len(cals)})"
    thresholds = "/".join(f"{t:g}" for t in sorted({c["threshold"] for c in cals}))
    exits = "/".join(sorted({",".join(map(str, c["exit_layers"])) for c in cals}, key=len, reverse=True))
    return (f"{cals[0]['rule']} {thresholds} (exits {exits}): drop {mean_std([c['accuracy_drop'] for c in cals], '+.2f')}, "
            f"{mean_std([c['avg_layers'] for c in cals], '.2f')} layers, "
            f"{mean_std([c['predicted_speedup'] for c in cals], '.2f')}x")


def table(folders: list[str]) -> str:
    """One row per method and label fraction, mean ± std over its seeds, all on test: every exit's accuracy and
    the final layer's; the hard families (HARD) at the exits after HARD_AT; mid-crisis (the largest fall of
    accuracy from one exit to a deeper one, points); overthinking (questions some exit gets right and the final
    layer wrong, %); the guaranteed early-exit point."""
    groups = defaultdict(list)
    for r in map(read_run, folders):
        groups[(label(r["config"]), r["config"]["label_fraction"])].append(r["report"])
    layers = sorted({e["layer"] for reports in groups.values() for r in reports for e in r["exits"]})
    head = (["method", "labels F", "n"] + [f"exit L{l}" for l in layers] + ["final"]
            + [f"{f} L{'/L'.join(map(str, HARD_AT))}" for f in HARD]
            + ["mid-crisis", "overthinking %", "guaranteed point: drop, layers, predicted speedup"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, fraction), reports in sorted(groups.items()):               # by method, then labels
        cells = [name, f"{fraction:g}", str(len(reports))]
        for l in layers:
            accs = [a for a in (exit_accuracy(r, l) for r in reports) if a is not None]
            cells.append(mean_std(accs) if accs else "-")
        cells.append(mean_std([r["full"]["accuracy"] for r in reports]))
        for family in HARD:
            at = [[exit_accuracy(r, l, family) for r in reports] for l in HARD_AT]
            cells.append(" / ".join(mean_std(a, ".0f") if None not in a else "-" for a in at))
        cells += [mean_std([r["mid_crisis"]["free_exits"]["drop"] for r in reports]),
                  mean_std([r["overthinking"]["fixable_pct"] for r in reports], ".2f"), guaranteed_cell(reports)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbone", nargs="?", help="a trained backbone (e.g. backbones/shapes-default.pt)")
    p.add_argument("out", nargs="?", help="folder of the runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every setting")
    p.add_argument("--fractions", type=float, nargs="+", default=[0, 0.01, 0.1, 1], help="label fractions F")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each run")
    p.add_argument("--table", nargs="+", metavar="RUN", help="only print the table of these finished runs")
    args = p.parse_args(argv)
    try:
        if args.table:
            print(table(args.table))
            return
        if not (args.backbone and args.out):
            p.error("give BACKBONE and OUTDIR (or --table RUN ...)")
        os.makedirs(args.out, exist_ok=True)
        folders = []
        for seed in args.seeds:
            for f in args.fractions:
                for method in ("free_gan", "free") + (("ce",) if f > 0 else ()):
                    folders.append(run(f"{method}_F{f:g}_s{seed}", args.out, args.backbone,
                                       METHODS[method] + ["--label-fraction", str(f), "--seed", str(seed)], args.threads))
            folders.append(run(f"kd_s{seed}", args.out, args.backbone, METHODS["kd"] + ["--label-fraction", "0",
                                                                                          "--seed", str(seed)], args.threads))
        print(table(folders))
    except UsageError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
