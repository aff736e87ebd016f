"""Where the exits sit and how long they train, chosen on val (never on test): stage 2 on one backbone for
each placement x number of epochs, each calibrated as the report does by default (guaranteed) but on val, and
judged on the val split alone (the calib split, which certifies the point shipped, chooses nothing); one table.

    python experiments/select_exits.py BACKBONE OUTDIR [--layers 1,2,4,6 2,4,6] [--epochs 2 6] [--threads 2]

Each run is `train.py --stage exits --no-final-eval` into OUTDIR/NAME, then `infer.py --eval --split val
--calibrate-on val` (timed on this machine); finished runs are skipped. The column to choose by is the
calibration's own objective: the certified point's speedup predicted from the costs measured at batch 1.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out: str, backbone: str, layers: str, epochs: int, threads: int) -> dict:
    """One placement x epochs: stage 2, then the report on val (unless OUTDIR/NAME/val.json exists)."""
    folder = os.path.join(out, f"exits{layers.replace(',', '')}_e{epochs}")
    report = os.path.join(folder, "val.json")
    if not os.path.isfile(report):
        steps = [["train.py", "--stage", "exits", "--backbone", backbone, "--out", folder, "--no-final-eval",
                  "--exit-layers", layers, "--exit-epochs", str(epochs)],
                 ["infer.py", "--ckpt", os.path.join(folder, "ckpt.pt"), "--eval", "--split", "val", "--calibrate-on", "val",
                  "--json", report]]
        with open(folder + ".log", "w") as log:
            for cmd in steps:
                if subprocess.run([sys.executable, *cmd, "--threads", str(threads)], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"failed: {folder} (see {folder}.log)")
    with open(report) as f:
        return {"layers": layers, "epochs": epochs} | json.load(f)


def row(r: dict) -> str:
    c = r["calibrated"]
    exits = " / ".join(f"{e['accuracy']:.1f}" for e in r["exits"])
    if c["threshold"] is None:
        return f"| {r['layers']} | {r['epochs']} | {exits} | {r['full']['accuracy']:.1f} | none certified | | | | |"
    return (f"| {r['layers']} | {r['epochs']} | {exits} | {r['full']['accuracy']:.1f} | {c['rule']} {c['threshold']:g}, exits "
            f"{','.join(map(str, c['exit_layers']))} | {c['accuracy_drop']:+.2f} | {c['avg_layers']:.2f} | "
            f"**{c['predicted_speedup']:.2f}x** | {c.get('wallclock_speedup_batch1', 0):.2f}x / "
            f"{c.get('wallclock_speedup_batched', 0):.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbone", help="a trained backbone")
    p.add_argument("out", help="folder of the runs")
    p.add_argument("--layers", nargs="+", default=["1,2,4,6", "2,4,6", "1,3,5,7"], help="exit placements")
    p.add_argument("--epochs", type=int, nargs="+", default=[2, 6], help="stage-2 epochs")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = [run(args.out, args.backbone, layers, epochs, args.threads) for layers in args.layers for epochs in args.epochs]
    print("| exits after | stage-2 epochs | val accuracy by exit | val final | certified point (val) | val drop | layers "
          "| predicted speedup | wall clock batch 1 / 64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(row(r) for r in results))


if __name__ == "__main__":
    main()
