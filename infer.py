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
  * a calibrated operating point: the threshold and the exits to evaluate, picked on *val* (the fastest
    whose accuracy drop is <= --max-drop points, by the costs measured at batch 1 on this machine, or by
    FLOPs with --no-timing), reported on the eval split, timed at batch 1 and batched;
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

from data import (DataConfig, DataError, Parser, add_config_args, batches, check_data_config, config_from_args,
                  encode_questions, load_data, load_image, to_device)
from free_min import (RULES, ExitConfig, build_from_checkpoint, early_exit_predict, inference_copy, layer_costs, load_checkpoint,
                      rule_fires)

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
    max_drop: float = field(default=1.0, metadata={"help": "calibration (threshold and exits to evaluate): largest accuracy "
                                                           "drop (points) allowed on val"})
    json: str = field(default="", metadata={"help": "write the report to this JSON file"})
    plot: str = field(default="", metadata={"help": "write accuracy-vs-speedup and depth-profile plots to this PNG"})
    batch_size: int = field(default=64, metadata={"help": "batch size of the throughput timing and of evaluation"})
    timing_samples: int = field(default=256, metadata={"help": "questions timed per measurement (batch 1 and batched)"})
    repeats: int = field(default=5, metadata={"help": "timing repeats; the median is reported"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default; printed)"})
    device: str = field(default="cpu", metadata={"help": "where the report runs and is timed: cpu, cuda or auto (cuda if "
                                                         "there is one)", "choices": ["cpu", "cuda", "auto"]})
    timing: bool = field(default=True, metadata={"help": "measure wall-clock speedups and calibrate by the costs measured at "
                                                         "batch 1 (--no-timing: accuracy and the layer view only, calibrated "
                                                         "by FLOPs; deterministic and fast, for sweeps)"})
    compare: str = field(default="", metadata={"help": "comma-separated train.py --out folders: print their test depth "
                                                       "profiles (and calibrated points, where a report.json exists) "
                                                       "side by side as a markdown table"})


# ----------------------------------------------------------------------------------------------------
# One pass over a split: every exit's and the final layer's answer distribution
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(free, split, batch_size: int) -> dict:
    """Probabilities of the final layer (n, A), of every exit (K, n, A) and of a raw readout of the same
    layers through the frozen head without G_k (K, n, A), plus the mean sequence length. Runs on the
    model's device; returns CPU tensors."""
    bb, device = free.backbone, next(free.parameters()).device
    final, exits, raw, seq = [], [], [], []
    for ids in batches(len(split), batch_size):
        out = free.all_outputs(**to_device(split.batch(ids), device))
        final.append(out["final"].float().softmax(1).cpu())
        exits.append(torch.stack([e.float().softmax(1) for e in out["exits"]]).cpu())   # (K, B, A)
        raw.append(torch.stack([bb.head(out["states"][l][:, 0]).float().softmax(1) for l in free.exit_layers]).cpu())
        mask, S = out["attn_mask"], out["states"][0].shape[1]                           # mask None: no padding
        real = torch.full((len(ids),), float(S)) if mask is None else mask.sum(dim=-1).flatten().float().cpu()
        seq.append(real)                                                                  # (B,) real tokens
    return {"final": torch.cat(final), "exits": torch.cat(exits, 1), "raw": torch.cat(raw, 1),
            "seq_len": torch.cat(seq).mean().item()}


def simulate(probs: dict, rule: str, threshold: float, exits: list[int] | None = None) -> dict:
    """Where every sample would leave under a rule, evaluating the exits `exits` (indices; default all), from
    the collected probabilities. This equals early_exit_predict sample by sample (tested); it lets a sweep
    cost one pass instead of one per point.
    Returns exit (n,) in 0..K (K = final), pred (n,), evaluated (n,) = exits evaluated."""
    final = probs["final"]                                                             # (n, A)
    K, n = probs["exits"].shape[:2]
    exits = list(range(K)) if exits is None else exits
    exit_at, evaluated = torch.full((n,), K, dtype=torch.long), torch.full((n,), len(exits), dtype=torch.long)
    pred = final.argmax(1)
    streak, last = torch.zeros(n, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    for j, k in enumerate(exits):
        a = probs["exits"][k].argmax(1)
        streak = torch.where(a == last, streak + 1, torch.ones_like(streak))
        fire = running & rule_fires(rule, probs["exits"][k], threshold, streak)
        exit_at[fire], pred[fire], evaluated[fire] = k, a[fire], j + 1
        running &= ~fire
        last = a
    return {"exit": exit_at, "pred": pred, "evaluated": evaluated}


def flop_costs(free, seq_len: float) -> dict:
    """The paper's view as a cost model: a layer costs 1, an exit its FLOPs in layer units, the rest nothing."""
    layer_flops, exit_flops = layer_costs(free, seq_len)
    return {"embed": 0.0, "layer": 1.0, "exit": exit_flops / layer_flops, "head": 0.0, "unit": "layers (FLOPs)"}


def layers_run(free, sim: dict) -> torch.Tensor:
    """(n,) float: the language-model layers each sample of `sim` runs (its exit's layer, or L at the final)."""
    return torch.tensor(free.exit_layers + [free.backbone.depth])[sim["exit"]].float()


def predicted_speedup(free, sim: dict, costs: dict) -> float:
    """Full-model cost / mean early-exit cost of the samples in `sim`, under a cost model (unit_costs/flop_costs)."""
    layers = layers_run(free, sim)
    at_final = (sim["exit"] == free.num_exits).float()
    cost = costs["embed"] + layers * costs["layer"] + sim["evaluated"].float() * costs["exit"] + at_final * costs["head"]
    return (costs["embed"] + free.backbone.depth * costs["layer"] + costs["head"]) / cost.mean().item()


def layer_speedup(free, sim: dict, seq_len: float) -> tuple[float, float]:
    """The paper's view: L / (layers run + exits evaluated x exit cost in layer units). Returns
    (mean layers run, speedup)."""
    layers = layers_run(free, sim)
    return layers.mean().item(), predicted_speedup(free, sim, flop_costs(free, seq_len))


# ----------------------------------------------------------------------------------------------------
# Wall-clock timing: same process, warm-up, interleaved, median of repeats
# ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def time_speedup(free, split, ids: torch.Tensor, batch_size: int, rule: str, threshold: float, repeats: int,
                 image_tokens_ready: bool = False, exits: list[int] | None = None) -> dict:
    """Seconds for the full model and for early exit over the same questions (inputs prepared on the model's
    device beforehand), each run ending when its answers are ready (a device sync on a GPU). End to end by
    default (the image encoder runs in both, a fixed cost exits cannot skip); with image_tokens_ready, the
    encoder's tokens are computed beforehand (as a cache of image features would have them) and only the
    language model is timed.

    Interleaved batch by batch: each batch runs through the full model and through early exit back to back
    (which goes first alternates), so that both see the same machine load, down to a few milliseconds. On a
    shared machine the load drifts within a second: one operating point measured six times on 2 CPU cores
    (128 questions at batch 1, 5 rounds) gave 1.42-1.54x (std 0.05) timed as whole passes one after the
    other, and 1.40-1.45x (std 0.016) batch by batch. A round sums each method's batches; the result holds
    the medians over `repeats` rounds and the spread of the per-round ratios."""
    device = next(free.parameters()).device
    inputs = [to_device(split.batch(b, cached=False), device) for b in torch.split(ids, batch_size)]
    if image_tokens_ready:
        inputs = [x | {"images": None, "patches": free.backbone.patch_features(x["images"])} for x in inputs]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {"full": lambda x: free.backbone(**x).argmax(1),
            "early_exit": lambda x: early_exit_predict(free, **x, rule=rule, threshold=threshold, exits=exits)}

    def one_round(j0: int) -> dict:
        spent = dict.fromkeys(runs, 0.0)
        for j, x in enumerate(inputs):
            for name in (list(runs) if (j0 + j) % 2 == 0 else list(runs)[::-1]):
                sync()
                start = time.perf_counter()
                runs[name](x)
                sync()
                spent[name] += time.perf_counter() - start
        return spent

    one_round(0)                                               # warm-up
    rounds = [one_round(r) for r in range(repeats)]
    full_s = statistics.median(r["full"] for r in rounds)
    ee_s = statistics.median(r["early_exit"] for r in rounds)
    ratios = [r["full"] / r["early_exit"] for r in rounds]
    return {"full_s": full_s, "early_exit_s": ee_s, "speedup": full_s / ee_s, "batch_size": batch_size,
            "samples": len(ids), "rounds": repeats, "round_speedup_min": min(ratios), "round_speedup_max": max(ratios)}


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


def threshold_grid(free, rule: str) -> list:
    """The thresholds a sweep and the calibration try: a probability / entropy grid, or patience 1..K."""
    return list(range(1, free.num_exits + 1)) if rule == "patience" else THRESHOLDS[rule]


def sweep_rule(free, split, probs: dict, rule: str) -> list[dict]:
    """Accuracy and layer speedup of every threshold of one rule (no timing)."""
    rows = []
    for t in threshold_grid(free, rule):
        sim = simulate(probs, rule, t)
        avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
        rows.append({"rule": rule, "threshold": t, "accuracy": accuracy(split, sim["pred"]), "avg_layers": avg_layers,
                     "layer_speedup": speedup})
    return rows


@torch.inference_mode()
def unit_costs(free, split, ids: torch.Tensor, repeats: int) -> dict:
    """Measured seconds, at batch 1 on the model's device, of what an early-exit forward is made of: the
    embedding (image encoder, merge, text), one language-model layer, one exit evaluation (G_k, head and the
    rule's softmax) and the final head. Medians over the questions `ids` x repeats, mean over layers/exits."""
    device = next(free.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bb, times = free.backbone, defaultdict(list)

    def timed(name, fn, *args):
        sync()
        start = time.perf_counter()
        out = fn(*args)
        sync()
        times[name].append(time.perf_counter() - start)
        return out

    inputs = [to_device(split.batch(torch.tensor([i]), cached=False), device) for i in ids.tolist()]
    for r in range(repeats + 1):                                     # the first round warms up
        for x in inputs:
            h, mask = timed("embed", bb.embed, x["images"], x["tokens"], x["text_mask"])
            for layer in range(bb.depth):
                h = timed("layer", bb.layer, layer, h, mask)
                if layer + 1 in free.exit_layers:
                    k = free.exit_layers.index(layer + 1)
                    timed("exit", lambda: free.exit_logits(k, free.exit_feature(k, h, mask)).float().softmax(1).max(1))
            timed("head", lambda: bb.head(h[:, 0]).float().softmax(1).max(1))
        if r == 0:
            times.clear()
    return {name: statistics.median(v) for name, v in times.items()} | {"unit": "seconds at batch 1"}


def exit_subsets(K: int) -> list[list[int]]:
    """Every non-empty set of exits, all K first (the paper's setting wins ties), then larger sets first."""
    subsets = [[k for k in range(K) if mask >> k & 1] for mask in range(1, 2 ** K)]
    return sorted(subsets, key=len, reverse=True)


def calibrate(free, val, val_probs: dict, rule: str, max_drop: float, costs: dict) -> dict:
    """On val: the threshold *and the set of exits evaluated* with the highest predicted speedup under the cost
    model `costs` whose accuracy drop is <= max_drop points.

    Why choose exits too: an exit is worth evaluating only if enough questions leave there to pay for it.
    Under the FLOP view (flop_costs) an exit costs a fifth of a layer and every exit pays; measured at
    batch 1 on a CPU (unit_costs) an exit costs most of a layer (it reads a whole block's weights and runs
    as many small operations), and an exit where few questions leave costs more than it saves. The depth
    profile decides, on val, for the machine at hand."""
    full = accuracy(val, val_probs["final"].argmax(1))
    best = None
    for exits in exit_subsets(free.num_exits):
        for t in threshold_grid(free, rule):
            if rule == "patience" and t > len(exits):
                continue
            sim = simulate(val_probs, rule, t, exits)
            drop = full - accuracy(val, sim["pred"])
            if drop <= max_drop:
                speedup = predicted_speedup(free, sim, costs)
                if best is None or speedup > best["predicted_speedup"] + 1e-9:
                    best = {"threshold": t, "exit_layers": [free.exit_layers[k] for k in exits],
                            "val_accuracy_drop": drop, "predicted_speedup": speedup}
    if best is None:
        return {"rule": rule, "threshold": None}
    return {"rule": rule, "threshold": best["threshold"], "exit_layers": best["exit_layers"],
            "val_accuracy_drop": best["val_accuracy_drop"], "predicted_speedup": best["predicted_speedup"],
            "cost_model": costs}


def oracle_exits(probs: dict) -> dict:
    """Where every question would leave if a rule knew the final layer's answer: at the earliest exit that
    already gives it (else at the final layer). Same answers as the full model; the most any exit rule can
    save on these exits without changing an answer. Same keys as simulate()."""
    exits, final = probs["exits"], probs["final"]                                      # (K, n, A), (n, A)
    K = exits.shape[0]
    pred = final.argmax(1)                                                             # (n,)
    agree = exits.argmax(2) == pred[None]                                              # (K, n)
    first = agree.float().argmax(0)                                                    # first agreeing exit
    exit_at = torch.where(agree.any(0), first, torch.full_like(first, K))
    return {"exit": exit_at, "pred": pred, "evaluated": torch.clamp(exit_at + 1, max=K)}


def per_family_depth(free, split, sim: dict) -> dict:
    """Mean language-model layers run and the share leaving at each exit, per question family."""
    layers = layers_run(free, sim)
    out = {}
    for fam in sorted(set(split.families)):
        idx = torch.tensor([i for i, f in enumerate(split.families) if f == fam])
        shares = torch.bincount(sim["exit"][idx], minlength=free.num_exits + 1).float() / len(idx)
        out[fam] = {"avg_layers": layers[idx].mean().item(), "accuracy": 100.0 * split.score(idx, sim["pred"][idx]).mean().item(),
                    "exit_share": {str(l): 100.0 * s.item() for l, s in zip(free.exit_layers + ["final"], shares)}}
    return out


def build_report(free, splits: dict, split_name: str, cfg: InferConfig) -> dict:
    """Everything the README reports about one checkpoint, on one split (calibrated on val). It runs, and is
    timed, where `free` is (its device), on an inference copy with the conv-stem BatchNorms folded."""
    free = inference_copy(free)
    device = next(free.parameters()).device
    split = splits[split_name]
    probs = collect(free, split, cfg.batch_size)
    val_probs = probs if split_name == "val" else collect(free, splits["val"], cfg.batch_size)
    profile = depth_profile(free, split, probs)
    timing_ids = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:cfg.timing_samples]
    sweep = []
    for rule in RULES:
        for row in sweep_rule(free, split, probs, rule):
            if cfg.timing:
                row["wallclock_speedup"] = time_speedup(free, split, timing_ids, cfg.batch_size, rule, row["threshold"],
                                                        max(1, cfg.repeats // 2))["speedup"]
            sweep.append(row)
    oracle = oracle_exits(probs)
    oracle_layers, oracle_speedup = layer_speedup(free, oracle, probs["seq_len"])
    report = {"split": split_name, "samples": len(split), "device": str(device), "threads": torch.get_num_threads(),
              "full": {"accuracy": profile["final"]}, "exits": profile["exits"],
              "mid_crisis": {"free_exits": mid_crisis(profile), "raw_readout": mid_crisis(profile, "raw_accuracy")},
              "overthinking": overthinking(split, probs), "sweep": sweep,
              "oracle": {"avg_layers": oracle_layers, "layer_speedup": oracle_speedup}}
    val = splits["val"]
    costs = unit_costs(free, val, torch.arange(min(32, len(val))), cfg.repeats) if cfg.timing else \
        flop_costs(free, val_probs["seq_len"])
    cal = calibrate(free, val, val_probs, cfg.rule, cfg.max_drop, costs)
    report["calibrated"] = calibrated_point(free, split, probs, cal, profile["final"], oracle_speedup, timing_ids, cfg)
    if cal["threshold"] is not None:
        report["per_family"] = per_family_depth(free, split, simulate(probs, cfg.rule, cal["threshold"], exit_indices(free, cal)))
    return report


def exit_indices(free, cal: dict) -> list[int]:
    """The exits a calibrated point evaluates, as indices (all of them for a point saved without the choice)."""
    return [free.exit_layers.index(l) for l in cal.get("exit_layers") or free.exit_layers]


def calibrated_point(free, split, probs: dict, cal: dict, full_accuracy: float, oracle_speedup: float,
                     timing_ids: torch.Tensor, cfg: InferConfig) -> dict:
    """The val-calibrated threshold reported on the eval split: accuracy and its drop, the layer view, the
    share of the oracle's saving it reaches ((1 - 1/s) / (1 - 1/s_oracle), in compute saved) and, with
    timing on, the measured wall-clock speedup at batch 1 and batched."""
    if cal["threshold"] is None:
        return cal
    exits = exit_indices(free, cal)
    sim = simulate(probs, cal["rule"], cal["threshold"], exits)
    avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
    acc = accuracy(split, sim["pred"])
    saved = (1 - 1 / speedup) / (1 - 1 / oracle_speedup) if oracle_speedup > 1 else 0.0
    cal = cal | {"accuracy": acc, "accuracy_drop": full_accuracy - acc, "avg_layers": avg_layers, "layer_speedup": speedup,
                 "share_of_oracle_saving": saved}
    if cfg.timing:
        one = timing_ids[:max(1, cfg.timing_samples // 2)]
        for ready, prefix in ((False, ""), (True, "lm_")):         # end to end; language model only
            t1 = time_speedup(free, split, one, 1, cal["rule"], cal["threshold"], cfg.repeats, ready, exits)
            tb = time_speedup(free, split, timing_ids, cfg.batch_size, cal["rule"], cal["threshold"], cfg.repeats, ready, exits)
            cal |= {f"{prefix}wallclock_speedup_batch1": t1["speedup"], f"{prefix}wallclock_speedup_batched": tb["speedup"],
                    f"{prefix}timing_batch1": t1, f"{prefix}timing_batched": tb}
    return cal


def print_report(r: dict, free) -> None:
    print(f"\n== early-exit report on {r['split']} ({r['samples']} questions; measured on {r['device']}, "
          f"{r['threads']} torch threads) ==")
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
    timed = bool(r["sweep"]) and "wallclock_speedup" in r["sweep"][0]
    print(f"{'rule':<9}{'thr':>7}{'acc %':>8}{'layers':>8}{'layer x':>9}" + (f"{'clock x':>9}" if timed else ""))
    for s in r["sweep"]:
        print(f"{s['rule']:<9}{s['threshold']:>7g}{s['accuracy']:>8.2f}{s['avg_layers']:>8.2f}{s['layer_speedup']:>9.2f}" +
              (f"{s['wallclock_speedup']:>9.2f}" if timed else ""))
    print(f"oracle (every question leaves at the earliest exit that gives the final layer's answer): "
          f"{r['oracle']['avg_layers']:.2f} layers, layer speedup {r['oracle']['layer_speedup']:.2f}x")
    print(format_calibrated(r["calibrated"]))
    for fam, d in r.get("per_family", {}).items():
        shares = " ".join(f"{k}:{v:.0f}%" for k, v in d["exit_share"].items())
        print(f"  {fam:<14} avg layers {d['avg_layers']:5.2f}  acc {d['accuracy']:6.2f}%  exits {shares}")


def format_calibrated(c: dict) -> str:
    if c.get("threshold") is None:
        return f"calibrated ({c['rule']}): no threshold keeps the val accuracy drop within the limit"
    rule = {"maxprob": f"max prob >= {c['threshold']:g}", "entropy": f"normalized entropy <= {c['threshold']:g}",
            "patience": f"same answer at {c['threshold']:g} exits in a row"}[c["rule"]]
    exits = f"; exits after layers {','.join(map(str, c['exit_layers']))}" if c.get("exit_layers") else ""
    line = (f"calibrated on val ({c['rule']}: {rule}{exits}): "
            f"accuracy {c['accuracy']:.2f}% (drop {c['accuracy_drop']:+.2f} pts), layer speedup {c['layer_speedup']:.2f}x "
            f"({100 * c['share_of_oracle_saving']:.0f}% of the oracle's saving)")
    costs = c.get("cost_model") or {"unit": ""}
    if costs["unit"].startswith("seconds"):
        line += (f"\n  chosen by the costs measured here at batch 1: embedding {1e3 * costs['embed']:.2f} ms, a layer "
                 f"{1e3 * costs['layer']:.2f} ms, an exit {1e3 * costs['exit']:.2f} ms, the final head {1e3 * costs['head']:.2f} ms "
                 f"(predicted speedup {c['predicted_speedup']:.2f}x)")
    if "wallclock_speedup_batch1" in c:
        line += (f"\n  wall-clock speedup end to end: {c['wallclock_speedup_batch1']:.2f}x at batch 1{round_spread(c['timing_batch1'])}, "
                 f"{c['wallclock_speedup_batched']:.2f}x at batch {c['timing_batched']['batch_size']}{round_spread(c['timing_batched'])}; "
                 f"language model only (image tokens computed beforehand): {c['lm_wallclock_speedup_batch1']:.2f}x "
                 f"at batch 1, {c['lm_wallclock_speedup_batched']:.2f}x batched")
    return line


def round_spread(timing: dict) -> str:
    """' (rounds a-b)': the range of the per-round speedups of a time_speedup result ('' for older reports)."""
    if "round_speedup_min" not in timing:
        return ""
    return f" (rounds {timing['round_speedup_min']:.2f}-{timing['round_speedup_max']:.2f})"


def plot_report(r: dict, path: str) -> None:
    """Accuracy vs wall-clock speedup per rule (calibrated point marked) and exit accuracy vs depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    timed = bool(r["sweep"]) and "wallclock_speedup" in r["sweep"][0]
    key = "wallclock_speedup" if timed else "layer_speedup"            # measured if timed, else the layer view
    for rule in RULES:
        rows = sorted((s for s in r["sweep"] if s["rule"] == rule), key=lambda s: s[key])
        ax1.plot([s[key] for s in rows], [s["accuracy"] for s in rows], "o-", ms=3, label=rule)
    ax1.plot([1.0], [r["full"]["accuracy"]], "ks", label="full model")
    c = r["calibrated"]
    if c.get("threshold") is not None:
        ax1.plot([c["wallclock_speedup_batched" if timed else "layer_speedup"]], [c["accuracy"]], "r*", ms=14,
                 label=f"calibrated ({c['rule']})")
    ax1.set(xlabel=f"wall-clock speedup (batched, {r['device']})" if timed else "layer speedup", ylabel="accuracy (%)",
            title="accuracy vs speedup")
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
def answer_one(free, tokenizer, answers: list[str], image_size: int, cfg: InferConfig, threshold: float,
               exits: list[int] | None = None) -> dict:
    """Answer one question about one image file with early exit (evaluating the exits `exits`, default all)."""
    if not cfg.question.strip():
        raise DataError("--question is empty")
    image = load_image(cfg.image, image_size).float()[None] / 255.0          # (1, 3, H, W)
    tokens, text_mask = encode_questions(tokenizer, [cfg.question])           # (1, T)
    device = next(free.parameters()).device
    out = early_exit_predict(free, image.to(device), tokens.to(device), text_mask.to(device), rule=cfg.rule,
                             threshold=threshold, exits=exits)
    k = out["exit"].item()
    where = f"exit {k + 1} of {free.num_exits} (after layer {free.exit_layers[k]} of {free.backbone.depth})" \
        if k < free.num_exits else f"the final layer ({free.backbone.depth} of {free.backbone.depth})"
    return {"answer": answers[out["pred"].item()], "confidence": out["confidence"].item(), "exit": k, "where": where,
            "layers": out["layers"].item()}


def parse_args(argv=None):
    """--ckpt is read first: its data config gives the defaults of the data flags."""
    pre = Parser(add_help=False)
    pre.add_argument("--ckpt", default=InferConfig.ckpt)
    known, _ = pre.parse_known_args(argv)
    state = None
    if os.path.isfile(known.ckpt):
        try:
            state = load_checkpoint(known.ckpt, "--ckpt")
        except DataError as e:   # a truncated or foreign file: one line naming it, not a traceback
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, InferConfig)
    add_config_args(p, DataConfig, state["data_config"] if state and "data_config" in state else None)
    args = p.parse_args(argv)
    return config_from_args(InferConfig, args), config_from_args(DataConfig, args), state


def load_free(cfg: InferConfig, state: dict | None):
    if state is None:
        raise DataError(f"--ckpt {cfg.ckpt}: checkpoint not found")
    try:
        backbone, free, tokenizer, answers, _ = build_from_checkpoint(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"--ckpt {cfg.ckpt}: not a free-min checkpoint ({e.__class__.__name__}: {str(e)[:120]})")
    if free is None:
        raise DataError(f"--ckpt {cfg.ckpt}: has a backbone but no exits; train them with python train.py --stage exits")
    return free, tokenizer, answers


def evaluate_checkpoint(free, tokenizer, answers, dcfg: DataConfig, cfg: InferConfig) -> dict:
    """Load the data the checkpoint was trained on (or the flags' data), build, print and save the report."""
    splits, _, _ = load_data(dcfg, tokenizer, answers, only=tuple({"val", cfg.split}))
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
    of log.jsonl) and its report.json, if train.py wrote one. DataError naming the file if one is unreadable."""
    ckpt, log, rep = (os.path.join(folder, f) for f in ("ckpt.pt", "log.jsonl", "report.json"))
    state = load_checkpoint(ckpt, "--compare")
    if "exit_config" not in state:
        raise DataError(f"--compare {ckpt}: holds a backbone but no exits")
    tests = [r for r in read_json_lines(log) if r.get("stage") == "exits" and r.get("split") == "test"]
    if not tests:
        raise DataError(f"--compare {log}: no test depth profile (did stage 2 finish?)")
    report = None
    if os.path.isfile(rep):
        try:
            with open(rep) as f:
                report = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"--compare {rep}: not a readable report ({e.__class__.__name__})")
    return {"folder": folder, "config": state["exit_config"], "test": tests[-1], "report": report}


def read_json_lines(path: str) -> list[dict]:
    """The records of a log.jsonl ([] if the file does not exist); DataError naming the file if it is broken."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--compare {path}: not a readable log ({e.__class__.__name__})")


def run_label(config: dict) -> str:
    """A run's method and every exit setting that differs from the defaults, e.g. 'free (disc_input=pair)'."""
    default = asdict(ExitConfig())
    skip = {"exit_method", "label_fraction", "exit_layers"}
    changed = [f"{k}={v}" for k, v in config.items() if k not in skip and k in default and v != default[k]]
    return config["exit_method"] + (f" ({', '.join(changed)})" if changed else "")


def mean_std(values: list[float], fmt: str = ".1f") -> str:
    """'m' for one value, 'm ± s' (sample std) for several."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt.lstrip('+')}}"


def compare_table(folders: list[str]) -> str:
    """A markdown table of several stage-2 runs. Runs that differ only in their seed are one row (mean ± std
    over them, n = how many): every exit's standalone test accuracy with, in brackets, the mean % of
    questions on which it agrees with the final layer; the final layer's accuracy; and, where the runs have
    a report.json, the calibrated early-exit point (test accuracy drop, layer speedup, share of the oracle's
    saving, and the measured wall-clock speedups where the report was timed)."""
    groups = defaultdict(list)
    for r in map(read_run, folders):
        key = (run_label(r["config"]), r["config"]["label_fraction"], r["config"]["exit_layers"])
        groups[key].append(r)
    layers = sorted({e["layer"] for runs in groups.values() for r in runs for e in r["test"]["test_exits"]})
    head = ["method", "labels F", "n"] + [f"exit L{l} (agree %)" for l in layers] + ["final", "calibrated early exit (test)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, fraction, _), runs in groups.items():
        cells = [label, f"{fraction:g}", str(len(runs))]
        for l in layers:
            es = [e for r in runs for e in r["test"]["test_exits"] if e["layer"] == l]
            cells.append("-" if not es else f"{mean_std([e['accuracy'] for e in es])} "
                                             f"({statistics.mean(e['agreement'] for e in es):.0f})")
        cells += [mean_std([r["test"]["test_final"] for r in runs]), calibrated_cell(runs)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def calibrated_cell(runs: list[dict]) -> str:
    """The calibrated points of a group of runs, as mean ± std; '-' where a run has none."""
    cals = [(r["report"] or {}).get("calibrated") or {} for r in runs]
    if any(c.get("threshold") is None for c in cals):
        return "-"
    thresholds = "/".join(f"{t:g}" for t in sorted({c["threshold"] for c in cals}))
    exits = sorted({",".join(map(str, c["exit_layers"])) for c in cals if c.get("exit_layers")}, key=len, reverse=True)
    cell = (f"{cals[0]['rule']} {thresholds}" + (f" (exits {'/'.join(exits)})" if exits else "") + ": "
            f"drop {mean_std([c['accuracy_drop'] for c in cals], '+.2f')}, "
            f"{mean_std([c['layer_speedup'] for c in cals], '.2f')}x layers "
            f"({mean_std([100 * c['share_of_oracle_saving'] for c in cals], '.0f')}% of oracle)")
    if all("wallclock_speedup_batch1" in c for c in cals):
        cell += (f", wall {mean_std([c['wallclock_speedup_batch1'] for c in cals], '.2f')}x batch 1, "
                 f"{mean_std([c['wallclock_speedup_batched'] for c in cals], '.2f')}x batched")
    return cell


def report_device(choice: str) -> torch.device:
    """--device: cpu, cuda, or auto (cuda if torch sees one)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    return torch.device(choice)


def check_infer_config(cfg: InferConfig) -> None:
    """Refuse settings that cannot work, naming the flag (DataError)."""
    for name in ("batch_size", "timing_samples", "repeats"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.threads < 0 or cfg.max_drop < 0:
        raise DataError(f"--threads and --max-drop must be >= 0 (got {cfg.threads}, {cfg.max_drop})")
    if cfg.threshold != -1 and (cfg.threshold < 0 or (cfg.rule == "patience" and cfg.threshold != int(cfg.threshold))):
        raise DataError(f"--threshold {cfg.threshold:g}: give -1 (the calibrated one), a probability for maxprob/entropy, "
                        f"or a whole number of exits for patience")
    if bool(cfg.image) != bool(cfg.question):
        raise DataError("--image and --question go together: give both")


def main(argv=None) -> None:
    cfg, dcfg, state = parse_args(argv)
    try:
        check_infer_config(cfg)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.compare:
            print(compare_table([f for f in cfg.compare.split(",") if f]))
            return
        free, tokenizer, answers = load_free(cfg, state)
        free.to(report_device(cfg.device))
        if cfg.eval:
            check_data_config(dcfg)
            evaluate_checkpoint(free, tokenizer, answers, dcfg, cfg)
        elif cfg.image:
            threshold, exits = cfg.threshold, None
            calibrated = state.get("calibrated") or {}
            if threshold < 0:                   # the run's calibrated point (threshold and exits), if it has one
                if calibrated.get("rule") == cfg.rule and calibrated.get("threshold") is not None:
                    threshold, exits = calibrated["threshold"], exit_indices(free, calibrated)
                else:
                    threshold = 2 if cfg.rule == "patience" else 0.9
            out = answer_one(free, tokenizer, answers, state["model_config"]["image_size"], cfg, threshold, exits)
            print(f"answer: {out['answer']}  (confidence {out['confidence']:.3f}; left at {out['where']}; "
                  f"rule {cfg.rule}, threshold {threshold:g})")
        else:
            raise DataError("nothing to do: give --eval, or --image and --question")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
