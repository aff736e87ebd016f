"""Early-exit inference and the evaluation report: FREE's speed/accuracy claim, measured.

    python infer.py --ckpt out/ckpt.pt --image IMG.png --question "what color is the circle?"
    python infer.py --ckpt out/ckpt.pt --eval [--split test] [--json report.json] [--plot curve.png]
    python infer.py --compare out,runs/kd,runs/ce    # several stage-2 runs side by side (a markdown table)

The paper's promise: inference is input-adaptive (a sample leaves at the first exit confident enough)
and so faster at comparable accuracy (> 1.51x reported). Here samples that exit are removed from the
batch and stop computing (free_min.early_exit_predict), and the speedup is measured in wall-clock time
against the full model in the same process, beside the paper's layer-count view.

The report (--eval):
  * full model accuracy; every exit's standalone accuracy (the depth profile) next to a *raw* readout
    of the same layer through the frozen head without G_k (what an untrained exit sees: mid-crisis);
  * mid-crisis: the largest drop of accuracy from a shallower exit to a deeper one;
  * overthinking: samples some exit gets right but the final layer gets wrong, and samples whose
    earliest right answer comes before the final layer;
  * a threshold sweep per rule (maxprob = FREE's, entropy = DeeBERT, patience = PABEE): accuracy,
    layers run, layer speedup and measured wall-clock speedup;
  * a calibrated operating point: the threshold picked on *val* (fastest by layer speedup whose
    accuracy drop is <= --max-drop points), reported on the eval split, timed at batch 1 and batched;
  * exit depth per question family.
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from data import DataConfig, DataError, add_config_args, batches, config_from_args, encode_questions, load_data, load_image
from free_min import RULES, build_from_checkpoint, early_exit_predict, layer_costs, rule_fires

THRESHOLDS = {"maxprob": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999],
              "entropy": [0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01, 0.001]}


@dataclass
class InferConfig:
    ckpt: str = field(default="out/ckpt.pt", metadata={"help": "checkpoint written by train.py (backbone + exits)"})
    image: str = field(default="", metadata={"help": "answer one question about this image file"})
    question: str = field(default="", metadata={"help": "the question to answer about --image"})
    eval: bool = field(default=False, metadata={"help": "evaluate on --split and print the report"})
    split: str = field(default="test", metadata={"help": "split to report on", "choices": ["train", "val", "test"]})
    rule: str = field(default="maxprob", metadata={"help": "exit rule (maxprob = FREE's)", "choices": list(RULES)})
    threshold: float = field(default=-1.0, metadata={"help": "exit threshold for --image/--question (maxprob/entropy: a "
                                                             "probability; patience: a count); -1 = the calibrated one"})
    max_drop: float = field(default=1.0, metadata={"help": "calibration: largest accuracy drop (points) allowed on val"})
    json: str = field(default="", metadata={"help": "write the report to this JSON file"})
    plot: str = field(default="", metadata={"help": "write accuracy-vs-speedup and depth-profile plots to this PNG"})
    batch_size: int = field(default=64, metadata={"help": "batch size of the throughput timing and of evaluation"})
    timing_samples: int = field(default=256, metadata={"help": "questions timed per measurement (batch 1 and batched)"})
    repeats: int = field(default=5, metadata={"help": "timing repeats; the median is reported"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default; printed)"})
    compare: str = field(default="", metadata={"help": "comma-separated train.py --out folders: print their test depth "
                                                       "profiles (and calibrated points, where a report.json exists) "
                                                       "side by side as a markdown table"})


# ----------------------------------------------------------------------------------------------------
# One pass over a split: every exit's and the final layer's answer distribution
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(free, split, batch_size: int) -> dict:
    """Probabilities of the final layer (n, A), of every exit (K, n, A) and of a raw readout of the same
    layers through the frozen head without G_k (K, n, A), plus the mean sequence length."""
    bb = free.backbone
    final, exits, raw, seq = [], [], [], []
    for ids in batches(len(split), batch_size):
        out = free.all_outputs(**split.batch(ids))
        final.append(out["final"].softmax(1))
        exits.append(torch.stack([e.softmax(1) for e in out["exits"]]))                 # (K, B, A)
        raw.append(torch.stack([bb.head(out["states"][l][:, 0]).softmax(1) for l in free.exit_layers]))
        seq.append(out["attn_mask"].sum(dim=-1).flatten().float())                     # (B,) real tokens
    return {"final": torch.cat(final), "exits": torch.cat(exits, 1), "raw": torch.cat(raw, 1),
            "seq_len": torch.cat(seq).mean().item()}


def simulate(probs: dict, rule: str, threshold: float) -> dict:
    """Where every sample would leave under a rule, from the collected probabilities. This equals
    early_exit_predict sample by sample (tested); it lets a sweep cost one pass instead of one per point.
    Returns exit (n,) in 0..K (K = final), pred (n,), evaluated (n,) = exits evaluated."""
    exits, final = probs["exits"], probs["final"]                                      # (K, n, A), (n, A)
    K, n = exits.shape[:2]
    exit_at = torch.full((n,), K, dtype=torch.long)
    pred = final.argmax(1)
    streak, last = torch.zeros(n, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    for k in range(K):
        a = exits[k].argmax(1)
        streak = torch.where(a == last, streak + 1, torch.ones_like(streak))
        fire = running & rule_fires(rule, exits[k], threshold, streak)
        exit_at[fire], pred[fire] = k, a[fire]
        running &= ~fire
        last = a
    return {"exit": exit_at, "pred": pred, "evaluated": torch.clamp(exit_at + 1, max=K)}


def layer_speedup(free, sim: dict, seq_len: float) -> tuple[float, float]:
    """The paper's view: L / (layers run + exits evaluated x exit cost in layer units). Returns
    (mean layers run, speedup)."""
    layer_flops, exit_flops = layer_costs(free, seq_len)
    layers = torch.tensor(free.exit_layers + [free.backbone.depth])[sim["exit"]].float()
    cost = layers + sim["evaluated"].float() * exit_flops / layer_flops
    return layers.mean().item(), free.backbone.depth / cost.mean().item()


# ----------------------------------------------------------------------------------------------------
# Wall-clock timing: same process, warm-up, interleaved, median of repeats
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def time_speedup(free, split, ids: torch.Tensor, batch_size: int, rule: str, threshold: float, repeats: int) -> dict:
    """Seconds for the full model and for early exit over the same questions (inputs prepared beforehand,
    image encoder included), interleaved so that both see the same machine load. Returns medians."""
    inputs = [split.batch(b) for b in torch.split(ids, batch_size)]

    def full():
        for x in inputs:
            free.backbone(**x).argmax(1)

    def early():
        for x in inputs:
            early_exit_predict(free, **x, rule=rule, threshold=threshold)

    runs = {"full": full, "early_exit": early}
    times = defaultdict(list)
    for fn in runs.values():                                   # warm-up
        fn()
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    full_s, ee_s = statistics.median(times["full"]), statistics.median(times["early_exit"])
    return {"full_s": full_s, "early_exit_s": ee_s, "speedup": full_s / ee_s, "batch_size": batch_size,
            "samples": len(ids)}


# ----------------------------------------------------------------------------------------------------
# The analyses
# ----------------------------------------------------------------------------------------------------
def accuracy(split, pred: torch.Tensor) -> float:
    return 100.0 * split.score(torch.arange(len(split)), pred).mean().item()


def depth_profile(free, split, probs: dict) -> dict:
    """Standalone accuracy of every exit (FREE-trained, and the raw readout) and of the final layer."""
    return {"exits": [{"layer": l, "accuracy": accuracy(split, probs["exits"][k].argmax(1)),
                       "raw_accuracy": accuracy(split, probs["raw"][k].argmax(1))} for k, l in enumerate(free.exit_layers)],
            "final": accuracy(split, probs["final"].argmax(1))}


def mid_crisis(profile: dict, key: str = "accuracy") -> dict:
    """The largest drop of accuracy from a shallower exit to a deeper one (final layer included)."""
    points = [(e["layer"], e[key]) for e in profile["exits"]] + [(None, profile["final"])]
    best = {"drop": 0.0, "from_layer": None, "to_layer": None}
    for i, (la, a) in enumerate(points):
        for lb, b in points[i + 1:]:
            if a - b > best["drop"]:
                best = {"drop": a - b, "from_layer": la, "to_layer": lb if lb is not None else "final"}
    return best


def overthinking(split, probs: dict) -> dict:
    """Right = full official credit. 'fixable': some exit is right but the final layer is wrong (later layers
    undid or never found it). 'early_right': of the samples the final layer gets right, those whose earliest
    right answer is at an exit before the final layer (the layers after it were wasted compute)."""
    every = torch.arange(len(split))
    final_right = split.score(every, probs["final"].argmax(1)) >= 1.0                        # (n,)
    exit_right = torch.stack([split.score(every, p.argmax(1)) >= 1.0 for p in probs["exits"]])  # (K, n)
    fixable = exit_right.any(0) & ~final_right
    early_right = exit_right.any(0) & final_right
    return {"fixable_pct": 100.0 * fixable.float().mean().item(),
            "early_right_pct_of_final_right": 100.0 * early_right.sum().item() / max(1, final_right.sum().item())}


def sweep_rule(free, split, probs: dict, rule: str) -> list[dict]:
    """Accuracy and layer speedup of every threshold of one rule (no timing)."""
    grid = list(range(1, free.num_exits + 1)) if rule == "patience" else THRESHOLDS[rule]
    rows = []
    for t in grid:
        sim = simulate(probs, rule, t)
        avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
        rows.append({"rule": rule, "threshold": t, "accuracy": accuracy(split, sim["pred"]), "avg_layers": avg_layers,
                     "layer_speedup": speedup})
    return rows


def calibrate(free, val, val_probs: dict, rule: str, max_drop: float) -> dict:
    """On val: the threshold with the highest layer speedup whose accuracy drop is <= max_drop points.
    (Layer speedup, not seconds, picks the point: it is deterministic; seconds are then measured.)"""
    full = accuracy(val, val_probs["final"].argmax(1))
    ok = [r for r in sweep_rule(free, val, val_probs, rule) if full - r["accuracy"] <= max_drop]
    if not ok:
        return {"rule": rule, "threshold": None}
    best = max(ok, key=lambda r: r["layer_speedup"])
    return {"rule": rule, "threshold": best["threshold"], "val_accuracy_drop": full - best["accuracy"]}


def per_family_depth(free, split, sim: dict) -> dict:
    """Mean language-model layers run and the share leaving at each exit, per question family."""
    layers = torch.tensor(free.exit_layers + [free.backbone.depth])[sim["exit"]].float()
    out = {}
    for fam in sorted(set(split.families)):
        idx = torch.tensor([i for i, f in enumerate(split.families) if f == fam])
        shares = torch.bincount(sim["exit"][idx], minlength=free.num_exits + 1).float() / len(idx)
        out[fam] = {"avg_layers": layers[idx].mean().item(), "accuracy": 100.0 * split.score(idx, sim["pred"][idx]).mean().item(),
                    "exit_share": {str(l): 100.0 * s.item() for l, s in zip(free.exit_layers + ["final"], shares)}}
    return out


def build_report(free, splits: dict, split_name: str, cfg: InferConfig) -> dict:
    """Everything the README reports about one checkpoint, on one split (calibrated on val)."""
    split = splits[split_name]
    probs = collect(free, split, cfg.batch_size)
    val_probs = probs if split_name == "val" else collect(free, splits["val"], cfg.batch_size)
    profile = depth_profile(free, split, probs)
    g = torch.Generator().manual_seed(0)
    timing_ids = torch.randperm(len(split), generator=g)[:cfg.timing_samples]
    sweep = []
    for rule in RULES:
        for row in sweep_rule(free, split, probs, rule):
            row["wallclock_speedup"] = time_speedup(free, split, timing_ids, cfg.batch_size, rule, row["threshold"],
                                                    max(1, cfg.repeats // 2))["speedup"]
            sweep.append(row)
    cal = calibrate(free, splits["val"], val_probs, cfg.rule, cfg.max_drop)
    report = {"split": split_name, "samples": len(split), "threads": torch.get_num_threads(),
              "full": {"accuracy": profile["final"]}, "exits": profile["exits"],
              "mid_crisis": {"free_exits": mid_crisis(profile), "raw_readout": mid_crisis(profile, "raw_accuracy")},
              "overthinking": overthinking(split, probs), "sweep": sweep}
    if cal["threshold"] is not None:
        sim = simulate(probs, cal["rule"], cal["threshold"])
        avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
        t1 = time_speedup(free, split, timing_ids[:max(1, cfg.timing_samples // 2)], 1, cal["rule"], cal["threshold"], cfg.repeats)
        tb = time_speedup(free, split, timing_ids, cfg.batch_size, cal["rule"], cal["threshold"], cfg.repeats)
        cal |= {"accuracy": accuracy(split, sim["pred"]), "accuracy_drop": profile["final"] - accuracy(split, sim["pred"]),
                "avg_layers": avg_layers, "layer_speedup": speedup, "wallclock_speedup_batch1": t1["speedup"],
                "wallclock_speedup_batched": tb["speedup"], "timing_batch1": t1, "timing_batched": tb}
        report["per_family"] = per_family_depth(free, split, sim)
    report["calibrated"] = cal
    return report


def print_report(r: dict, free) -> None:
    print(f"\n== early-exit report on {r['split']} ({r['samples']} questions, {r['threads']} torch threads) ==")
    print(f"full model accuracy: {r['full']['accuracy']:.2f}%  ({free.backbone.depth} language-model layers)")
    print("depth profile (every sample forced to leave at the exit):")
    for e in r["exits"]:
        print(f"  after layer {e['layer']:>2}: FREE exit {e['accuracy']:6.2f}%   raw readout (no G_k) {e['raw_accuracy']:6.2f}%")
    mc = r["mid_crisis"]
    print(f"mid-crisis (largest accuracy drop shallower -> deeper): FREE exits {mc['free_exits']['drop']:.2f} pts, "
          f"raw readout {mc['raw_readout']['drop']:.2f} pts")
    o = r["overthinking"]
    print(f"overthinking: {o['fixable_pct']:.2f}% of questions are right at some exit but wrong at the final layer; "
          f"{o['early_right_pct_of_final_right']:.1f}% of those the final layer gets right were already right at an exit")
    print(f"{'rule':<9}{'thr':>7}{'acc %':>8}{'layers':>8}{'layer x':>9}{'clock x':>9}")
    for s in r["sweep"]:
        print(f"{s['rule']:<9}{s['threshold']:>7g}{s['accuracy']:>8.2f}{s['avg_layers']:>8.2f}{s['layer_speedup']:>9.2f}"
              f"{s['wallclock_speedup']:>9.2f}")
    print(format_calibrated(r["calibrated"]))
    for fam, d in r.get("per_family", {}).items():
        shares = " ".join(f"{k}:{v:.0f}%" for k, v in d["exit_share"].items())
        print(f"  {fam:<14} avg layers {d['avg_layers']:5.2f}  acc {d['accuracy']:6.2f}%  exits {shares}")


def format_calibrated(c: dict) -> str:
    if c.get("threshold") is None:
        return f"calibrated ({c['rule']}): no threshold keeps the val accuracy drop within the limit"
    rule = {"maxprob": f"max prob >= {c['threshold']:g}", "entropy": f"normalized entropy <= {c['threshold']:g}",
            "patience": f"same answer at {c['threshold']:g} exits in a row"}[c["rule"]]
    return (f"calibrated on val ({c['rule']}: {rule}): "
            f"accuracy {c['accuracy']:.2f}% (drop {c['accuracy_drop']:+.2f} pts), layer speedup {c['layer_speedup']:.2f}x, "
            f"wall-clock speedup {c['wallclock_speedup_batch1']:.2f}x at batch 1, {c['wallclock_speedup_batched']:.2f}x "
            f"at batch {c['timing_batched']['batch_size']}")


def plot_report(r: dict, path: str) -> None:
    """Accuracy vs wall-clock speedup per rule (calibrated point marked) and exit accuracy vs depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule in RULES:
        rows = sorted((s for s in r["sweep"] if s["rule"] == rule), key=lambda s: s["wallclock_speedup"])
        ax1.plot([s["wallclock_speedup"] for s in rows], [s["accuracy"] for s in rows], "o-", ms=3, label=rule)
    ax1.plot([1.0], [r["full"]["accuracy"]], "ks", label="full model")
    c = r["calibrated"]
    if c.get("threshold") is not None:
        ax1.plot([c["wallclock_speedup_batched"]], [c["accuracy"]], "r*", ms=14, label=f"calibrated ({c['rule']})")
    ax1.set(xlabel="wall-clock speedup (batched)", ylabel="accuracy (%)", title="accuracy vs measured speedup")
    ax1.legend()
    layers = [e["layer"] for e in r["exits"]]
    ax2.plot(layers, [e["accuracy"] for e in r["exits"]], "o-", label="FREE exits")
    ax2.plot(layers, [e["raw_accuracy"] for e in r["exits"]], "x--", label="raw readout (no exit layer)")
    ax2.axhline(r["full"]["accuracy"], color="k", ls=":", label="final layer")
    ax2.set(xlabel="language-model layer", ylabel="accuracy (%)", title="depth profile")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: str, report: dict) -> None:
    """Atomically: a temp file, then rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


@torch.no_grad()
def answer_one(free, tokenizer, answers: list[str], image_size: int, cfg: InferConfig, threshold: float) -> dict:
    """Answer one question about one image file with early exit."""
    if not cfg.question.strip():
        raise DataError("--question is empty")
    image = load_image(cfg.image, image_size).float()[None] / 255.0          # (1, 3, H, W)
    tokens, text_mask = encode_questions(tokenizer, [cfg.question])           # (1, T)
    out = early_exit_predict(free, image, tokens, text_mask, rule=cfg.rule, threshold=threshold)
    k = out["exit"].item()
    where = f"exit {k + 1} of {free.num_exits} (after layer {free.exit_layers[k]} of {free.backbone.depth})" \
        if k < free.num_exits else f"the final layer ({free.backbone.depth} of {free.backbone.depth})"
    return {"answer": answers[out["pred"].item()], "confidence": out["confidence"].item(), "exit": k, "where": where,
            "layers": out["layers"].item()}


def parse_args(argv=None):
    """--ckpt is read first: its data config gives the defaults of the data flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt", default=InferConfig.ckpt)
    known, _ = pre.parse_known_args(argv)
    state = None
    if os.path.isfile(known.ckpt):
        try:
            state = torch.load(known.ckpt, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file: one line naming it, not a traceback
            print(f"error: --ckpt {known.ckpt}: not a readable checkpoint ({e.__class__.__name__})", file=sys.stderr)
            raise SystemExit(2)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, InferConfig)
    add_config_args(p, DataConfig, state["data_config"] if state and "data_config" in state else None)
    args = p.parse_args(argv)
    return config_from_args(InferConfig, args), config_from_args(DataConfig, args), state


def load_free(cfg: InferConfig, state: dict | None):
    if state is None:
        raise DataError(f"--ckpt {cfg.ckpt}: checkpoint not found")
    try:
        backbone, free, tokenizer, answers, _ = build_from_checkpoint(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"--ckpt {cfg.ckpt}: not a free-min checkpoint ({e.__class__.__name__}: {str(e)[:120]})")
    if free is None:
        raise DataError(f"--ckpt {cfg.ckpt}: has a backbone but no exits; train them with python train.py --stage exits")
    return free, tokenizer, answers


def evaluate_checkpoint(free, tokenizer, answers, dcfg: DataConfig, cfg: InferConfig) -> dict:
    """Load the data the checkpoint was trained on (or the flags' data), build, print and save the report."""
    splits, _, _ = load_data(dcfg, tokenizer, answers)
    report = build_report(free, splits, cfg.split, cfg)
    print_report(report, free)
    if cfg.json:
        write_json(cfg.json, report)
        print(f"wrote {cfg.json}")
    if cfg.plot:
        plot_report(report, cfg.plot)
        print(f"wrote {cfg.plot}")
    return report


def read_run(folder: str) -> dict:
    """One finished stage-2 run: its exit config (from ckpt.pt), its test depth profile (the last test line
    of log.jsonl) and its report.json, if train.py wrote one."""
    ckpt, log, rep = (os.path.join(folder, f) for f in ("ckpt.pt", "log.jsonl", "report.json"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False) if os.path.isfile(ckpt) else {}
    if "exit_config" not in state:
        raise DataError(f"--compare: {ckpt} is missing or holds no exits")
    lines = []
    if os.path.isfile(log):
        with open(log) as f:
            lines = [json.loads(line) for line in f]
    tests = [r for r in lines if r.get("stage") == "exits" and r.get("split") == "test"]
    if not tests:
        raise DataError(f"--compare: {log} has no test depth profile (did stage 2 finish?)")
    report = None
    if os.path.isfile(rep):
        with open(rep) as f:
            report = json.load(f)
    return {"folder": folder, "config": state["exit_config"], "test": tests[-1], "report": report}


def compare_table(folders: list[str]) -> str:
    """A markdown table: one row per run, its exits' standalone test accuracies (with, in brackets, the % of
    questions where the exit agrees with the final layer), the final layer's, and the calibrated
    early-exit point where the run has a report."""
    runs = [read_run(f) for f in folders]
    layers = sorted({e["layer"] for r in runs for e in r["test"]["test_exits"]})
    head = ["run", "method", "labels F"] + [f"exit L{l} (agree %)" for l in layers] + ["final", "calibrated early exit (test)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        acc = {e["layer"]: f"{e['accuracy']:.1f} ({e['agreement']:.0f})" for e in r["test"]["test_exits"]}
        c = (r["report"] or {}).get("calibrated") or {}
        cal = "-" if c.get("threshold") is None else (
            f"{c['rule']} {c['threshold']:g}: {c['accuracy']:.1f} ({c['accuracy_drop']:+.1f}), "
            f"{c['layer_speedup']:.2f}x layers, {c['wallclock_speedup_batch1']:.2f}x wall batch 1, "
            f"{c['wallclock_speedup_batched']:.2f}x batched")
        cells = [r["folder"], r["config"]["exit_method"], f"{r['config']['label_fraction']:g}"]
        cells += [acc.get(l, "-") for l in layers] + [f"{r['test']['test_final']:.1f}", cal]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    cfg, dcfg, state = parse_args(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.compare:
            print(compare_table([f for f in cfg.compare.split(",") if f]))
            return
        free, tokenizer, answers = load_free(cfg, state)
        if cfg.eval:
            evaluate_checkpoint(free, tokenizer, answers, dcfg, cfg)
        elif cfg.image:
            threshold = cfg.threshold
            calibrated = state.get("calibrated", {})
            if threshold < 0:
                threshold = calibrated.get("threshold") if calibrated.get("rule") == cfg.rule else None
                threshold = threshold if threshold is not None else (2 if cfg.rule == "patience" else 0.9)
            out = answer_one(free, tokenizer, answers, state["model_config"]["image_size"], cfg, threshold)
            print(f"answer: {out['answer']}  (confidence {out['confidence']:.3f}; left at {out['where']}; "
                  f"rule {cfg.rule}, threshold {threshold:g})")
        else:
            raise DataError("nothing to do: give --eval, or --image and --question")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
