"""Early-exit inference and the evaluation report: FREE's speed/accuracy claim, measured.

    python infer.py --ckpt out/ckpt.pt --image IMG.png --question "what color is the circle?"
    python infer.py --ckpt out/ckpt.pt --eval [--split test] [--json report.json] [--plot speedup.png]

The paper's promise: inference is input-adaptive (a sample leaves at the first exit confident enough) and
so faster at comparable accuracy. Here samples that exit leave the batch and stop computing
(free_min.early_exit_predict), and the speedup is measured in wall-clock time against the full model in the
same process, beside the paper's layer-count view. The report (--eval) holds:
  * the full model's accuracy; every exit's standalone accuracy (the depth profile) beside a *raw* readout
    of the same layer through the frozen head without G_k (what an exit without its layer would give);
  * mid-crisis (the largest accuracy drop from a shallower exit to a deeper one) and overthinking (questions
    some exit gets right and the final layer wrong; right answers found before the final layer);
  * a threshold sweep per exit rule (free_min.RULES): accuracy, layers run, layer and wall-clock speedup;
  * a calibrated operating point: the threshold and the exits to evaluate, picked on *val* (the fastest whose
    accuracy drop is <= --max-drop points), reported on the eval split, timed at batch 1 and batched;
  * the depth each question family runs to at that point.
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from PIL import Image

from data import (DataError, Parser, add_config_args, batches, config_from_args, encode_questions, load_data,
                  load_image, pick_device, pick_threads, save_atomic, synchronize, to_device)
from free_min import RULES, build_from_checkpoint, early_exit_predict, load_checkpoint

RISKS = ("harm", "disagree")          # the losses calibration can bound (see risk_losses)


@dataclass
class InferConfig:
    ckpt: str = field(default="", metadata={"help": "checkpoint written by train.py (backbone + exits); default: "
                                                    "out/ckpt.pt if it exists, else the exits the repo ships "
                                                    "(backbones/shapes-default-free.pt)"})
    image: str = field(default="", metadata={"help": "answer one question about this image file"})
    question: str = field(default="", metadata={"help": "the question to answer about --image"})
    explain: bool = field(default=False, metadata={"help": "with --image: show every exit's answer and the rule's "
                                                           "measure against its threshold, and why it left where it did"})
    eval: bool = field(default=False, metadata={"help": "evaluate on --split, print the report and write it (--json, "
                                                        "--plot)"})
    split: str = field(default="test", metadata={"help": "split to report on", "choices": ["train", "val", "test"]})
    rule: str = field(default="maxprob", metadata={"help": "exit rule (maxprob = FREE's)", "choices": list(RULES)})
    threshold: float = field(default=-1.0, metadata={"help": "exit threshold for --image (-1 = the calibrated one, "
                                                             "else the rule's default)"})
    max_drop: float = field(default=1.0, metadata={"help": "calibration: the accuracy drop (points) the calibrated point "
                                                           "may cost on new questions"})
    calibration: str = field(default="guaranteed", metadata={"help": "guaranteed: Learn-then-Test, the drop stays within "
                                                                     "--max-drop with probability >= 1 - --delta (see "
                                                                     "calibrate); empirical: the fastest point within "
                                                                     "--max-drop on val, no guarantee",
                                                             "choices": ["guaranteed", "empirical"]})
    delta: float = field(default=0.1, metadata={"help": "guaranteed calibration: the probability that the promise fails "
                                                        "(over the draw of the calibration questions)"})
    risk: str = field(default="auto", metadata={"help": "the loss calibration bounds: harm (an early answer loses credit "
                                                        "the full model had; reads labels) or disagree (it differs from "
                                                        "the full model's; reads none); auto = harm if the exits were "
                                                        "trained with labels, else disagree",
                                                "choices": ["auto", *RISKS]})
    json: str = field(default="", metadata={"help": "--eval: the report's JSON file (default: report.json in the "
                                                    "checkpoint's folder; report_SPLIT.json for another --split)"})
    plot: str = field(default="", metadata={"help": "--eval: the figure, accuracy vs speedup, depth profile and depth per "
                                                    "family (default: speedup.png beside report.json)"})
    batch_size: int = field(default=64, metadata={"help": "batch size of evaluation and of the batched timing"})
    timing_samples: int = field(default=256, metadata={"help": "questions timed per measurement (half of them at batch 1)"})
    repeats: int = field(default=5, metadata={"help": "timing rounds; the median is reported"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = the cores not busy with other work; "
                                                      "the report prints it)"})
    device: str = field(default="auto", metadata={"help": "where the report runs and is timed: auto (cuda, then mps, "
                                                          "then cpu; printed), cuda, mps or cpu",
                                                  "choices": ["auto", "cuda", "mps", "cpu"]})
    timing: bool = field(default=True, metadata={"help": "measure wall-clock speedups and calibrate by costs measured "
                                                         "here (--no-timing: the layer view and FLOPs only, deterministic)"})


# ----------------------------------------------------------------------------------------------------
# One pass over a split: every exit's and the final layer's answer distribution
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d (the conv stem's) into that convolution, in place.
    In eval mode BN(conv(x)) = g (w * x + c - mean) / sqrt(var + eps) + b = w' * x + c', with
    w' = w g / sqrt(var + eps) and c' = b + (c - mean) g / sqrt(var + eps): one operation instead of two."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)                       # (C_out,)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True).to(conv.weight.device)
            fused.weight.copy_(conv.weight * scale[:, None, None, None])                  # (C_out, C_in, k, k)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
            seq[i], seq[i + 1] = fused, nn.Identity()
    return model


def inference_copy(free):
    """A copy of `free` for evaluation and timing: eval mode, the conv stem's BatchNorms folded, and on a CPU
    the convolution weights channels-last (the layout oneDNN convolves fastest in; kept to the CPU, since
    Apple GPUs have convolved such weights wrongly). Same answers up to float rounding; the full model and
    early exit both run on it, so the image encoder, a cost no exit can skip, is trimmed for both alike."""
    copied = copy.deepcopy(free).eval()
    fold_batchnorm(copied.backbone)
    if next(copied.parameters()).device.type == "cpu":
        copied.backbone.to(memory_format=torch.channels_last)    # only 4-D tensors (conv weights) change layout
    return copied


@torch.no_grad()
def collect(free, split, batch_size: int) -> dict:
    """Answer probabilities of the final layer (n, A), of every exit (K, n, A), and of a raw readout of the
    exits' layers through the frozen head without G_k (K, n, A); the mean sequence length. CPU tensors."""
    free.eval()
    bb, device = free.backbone, next(free.parameters()).device
    final, exits, raw, seq = [], [], [], []
    for ids in batches(len(split), batch_size):
        out = free.all_outputs(**to_device(split.batch(ids), device))
        final.append(out["final"].float().softmax(1).cpu())                                        # (B, A)
        exits.append(torch.stack([e.float().softmax(1) for e in out["exits"]]).cpu())              # (K, B, A)
        raw.append(torch.stack([bb.head(out["states"][l][:, 0]).float().softmax(1) for l in free.exit_layers]).cpu())
        mask, S = out["attn_mask"], out["states"][0].shape[1]                                      # mask None: no padding
        seq.append(torch.full((len(ids),), float(S)) if mask is None else mask.sum(dim=-1).flatten().float().cpu())
    return {"final": torch.cat(final), "exits": torch.cat(exits, 1), "raw": torch.cat(raw, 1),
            "seq_len": torch.cat(seq).mean().item()}


def accuracy(split, pred: torch.Tensor) -> float:
    return 100.0 * split.score(torch.arange(len(split)), pred).mean().item()


def exit_profile(split, probs: dict, exit_layers: list[int]) -> dict:
    """The depth profile: every exit's standalone accuracy (every question forced to leave there), the raw
    readout's, each exit's agreement (%) with the final layer's answer, and the final layer's accuracy."""
    final = probs["final"].argmax(1)
    return {"final": accuracy(split, final),
            "exits": [{"layer": l, "accuracy": accuracy(split, probs["exits"][k].argmax(1)),
                       "raw_accuracy": accuracy(split, probs["raw"][k].argmax(1)),
                       "agreement": 100.0 * (probs["exits"][k].argmax(1) == final).float().mean().item()}
                      for k, l in enumerate(exit_layers)]}


def simulate(probs: dict, rule: str, threshold: float, exits: list[int] | None = None) -> dict:
    """Where every question would leave under a rule, evaluating the exits `exits` (indices; default all), from
    the collected probabilities: what early_exit_predict does question by question (tested), for one pass
    instead of one per threshold. Returns exit (n,) in 0..K (K = final), pred (n,), evaluated (n,) exits run."""
    K, n = probs["exits"].shape[:2]
    exits = list(range(K)) if exits is None else exits
    exit_at, evaluated = torch.full((n,), K), torch.full((n,), len(exits))
    pred, last, streak = probs["final"].argmax(1), torch.full((n,), -1), torch.zeros(n, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    for j, k in enumerate(exits):
        conf, a = probs["exits"][k].max(dim=1)
        streak, last = torch.where(a == last, streak + 1, 1), a
        fire = running & RULES[rule].fires(conf, probs["exits"][k], streak, threshold)
        exit_at[fire], pred[fire], evaluated[fire] = k, a[fire], j + 1
        running &= ~fire
    return {"exit": exit_at, "pred": pred, "evaluated": evaluated}


# ----------------------------------------------------------------------------------------------------
# What early exit costs: the paper's layer view, FLOPs, and seconds measured here
# ----------------------------------------------------------------------------------------------------
def layer_costs(free, seq_len: float) -> tuple[float, float]:
    """FLOPs per question of one language-model layer and of one exit (G_k on the [CLS] row: q, k and v for
    every token, the rest for one row; then the head), for seq_len tokens. Multiply-adds count 2; norms,
    softmaxes and activations are left out."""
    D, A, S = free.backbone.cfg.dim, free.backbone.cfg.num_answers, seq_len
    layer = 2 * (S * D * 3 * D + 2 * S * S * D + S * D * D + 2 * S * D * 4 * D)
    exit_ = 2 * (S * D * 3 * D + 2 * S * D + D * D + 2 * D * 4 * D + D * A)
    return layer, exit_


def flop_costs(free, seq_len: float) -> dict:
    """The paper's view as a cost model: a layer costs 1, an exit its FLOPs in layer units, the rest nothing."""
    layer_flops, exit_flops = layer_costs(free, seq_len)
    return {"embed": 0.0, "layer": 1.0, "exit": exit_flops / layer_flops, "head": 0.0, "unit": "layers (FLOPs)"}


@torch.inference_mode()
def unit_costs(free, split, ids: torch.Tensor, repeats: int) -> dict:
    """Measured seconds at batch 1 on the model's device of what an early-exit forward is made of: the
    embedding (image encoder, merge, text), one language-model layer, one exit evaluation (G_k, head, the
    rule's softmax) and the final head. Medians over the questions `ids` x repeats (after a warm-up round)."""
    device, bb, times = next(free.parameters()).device, free.backbone, defaultdict(list)

    def timed(name, fn, *args):
        synchronize(device)
        start = time.perf_counter()
        out = fn(*args)
        synchronize(device)
        times[name].append(time.perf_counter() - start)
        return out

    inputs = [to_device(split.batch(torch.tensor([i]), raw_images=True), device) for i in ids.tolist()]
    for r in range(repeats + 1):
        for x in inputs:
            h, mask = timed("embed", bb.embed, x["images"], x["tokens"], x["text_mask"])
            for i in range(bb.depth):
                h = timed("layer", bb.layer, i, h, mask)
                if i + 1 in free.exit_layers:
                    k = free.exit_layers.index(i + 1)
                    timed("exit", lambda: free.exit_logits(k, h, mask).float().softmax(1).max(1))
            timed("head", lambda: bb.head(h[:, 0]).float().softmax(1).max(1))
        if r == 0:
            times.clear()                                                 # the first round warms up
    return {name: statistics.median(v) for name, v in times.items()} | {"unit": "seconds at batch 1"}


def layers_run(free, sim: dict) -> torch.Tensor:
    """(n,) float: the language-model layers each question of `sim` runs (its exit's layer, or L)."""
    return torch.tensor(free.exit_layers + [free.backbone.depth])[sim["exit"]].float()


def predicted_speedup(free, sim: dict, costs: dict) -> float:
    """Full-model cost / mean early-exit cost of the questions in `sim`, under a cost model (unit or FLOP costs)."""
    at_final = (sim["exit"] == free.num_exits).float()
    cost = costs["embed"] + layers_run(free, sim) * costs["layer"] + sim["evaluated"] * costs["exit"] + at_final * costs["head"]
    return (costs["embed"] + free.backbone.depth * costs["layer"] + costs["head"]) / cost.mean().item()


def layer_speedup(free, sim: dict, seq_len: float) -> tuple[float, float]:
    """The paper's view: (mean layers run, L / (layers run + exits evaluated x an exit's cost in layer units))."""
    return layers_run(free, sim).mean().item(), predicted_speedup(free, sim, flop_costs(free, seq_len))


@torch.inference_mode()
def time_speedup(free, split, ids: torch.Tensor, batch_size: int, rule: str, threshold: float, repeats: int,
                 image_tokens_ready: bool = False, exits: list[int] | None = None) -> dict:
    """Seconds of the full model and of early exit over the same questions (inputs on the device beforehand),
    each run ending when its answers are ready. End to end by default (the image encoder runs in both, a cost
    exits cannot skip); with image_tokens_ready the encoder's tokens are computed beforehand (as a cache of
    a frozen encoder has them) and the language model alone is timed.
    Interleaved batch by batch: each batch runs through both back to back, which goes first alternating, so
    both see the same machine load; a warm-up round, then `repeats` rounds, each summing its batches. Returns
    the medians over rounds and the range of the per-round ratios."""
    device = next(free.parameters()).device
    inputs = [to_device(split.batch(b, raw_images=True), device) for b in torch.split(ids, batch_size)]
    if image_tokens_ready:
        inputs = [x | {"images": None, "patches": free.backbone.patch_features(x["images"])} for x in inputs]
    runs = {"full": lambda x: free.backbone(**x).argmax(1),
            "early_exit": lambda x: early_exit_predict(free, **x, rule=rule, threshold=threshold, exits=exits)}

    def one_round(r: int) -> dict:
        spent = dict.fromkeys(runs, 0.0)
        for j, x in enumerate(inputs):
            for name in (list(runs) if (r + j) % 2 == 0 else list(runs)[::-1]):
                synchronize(device)
                start = time.perf_counter()
                runs[name](x)
                synchronize(device)
                spent[name] += time.perf_counter() - start
        return spent

    one_round(0)
    rounds = [one_round(r) for r in range(repeats)]
    full_s, ee_s = (statistics.median(r[name] for r in rounds) for name in runs)
    ratios = [r["full"] / r["early_exit"] for r in rounds]
    return {"full_s": full_s, "early_exit_s": ee_s, "speedup": full_s / ee_s, "batch_size": batch_size,
            "samples": len(ids), "rounds": repeats, "round_speedup_min": min(ratios), "round_speedup_max": max(ratios)}


# ----------------------------------------------------------------------------------------------------
# The analyses
# ----------------------------------------------------------------------------------------------------
def mid_crisis(profile: dict, key: str = "accuracy") -> dict:
    """The largest drop of accuracy from a shallower exit to a deeper one (the final layer included)."""
    points = [(e["layer"], e[key]) for e in profile["exits"]] + [("final", profile["final"])]
    best = {"drop": 0.0, "from_layer": None, "to_layer": None}
    for i, (la, a) in enumerate(points):
        for lb, b in points[i + 1:]:
            if a - b > best["drop"]:
                best = {"drop": a - b, "from_layer": la, "to_layer": lb}
    return best


def overthinking(split, probs: dict) -> dict:
    """Right = full official credit. 'fixable': some exit is right but the final layer wrong (later layers
    undid or never found it). 'early_right': of the questions the final layer gets right, those already
    right at an exit before it (the layers after it were wasted compute)."""
    every = torch.arange(len(split))
    final_right = split.score(every, probs["final"].argmax(1)) >= 1.0                          # (n,)
    exit_right = torch.stack([split.score(every, p.argmax(1)) >= 1.0 for p in probs["exits"]])  # (K, n)
    return {"fixable_pct": 100.0 * (exit_right.any(0) & ~final_right).float().mean().item(),
            "early_right_pct_of_final_right": 100.0 * (exit_right.any(0) & final_right).sum().item()
            / max(1, final_right.sum().item())}


def oracle_exits(probs: dict) -> dict:
    """Every question leaves at the earliest exit that already gives the final layer's answer (else at the
    final layer): the layers a rule could save *keeping every answer of the full model*, a reference point.
    A rule that changes answers (any real one does) can save more or less than this. Keys as simulate()'s."""
    K = probs["exits"].shape[0]
    pred = probs["final"].argmax(1)                                                    # (n,)
    agree = probs["exits"].argmax(2) == pred[None]                                     # (K, n)
    exit_at = torch.where(agree.any(0), agree.float().argmax(0), torch.full_like(pred, K))
    return {"exit": exit_at, "pred": pred, "evaluated": torch.clamp(exit_at + 1, max=K)}


def per_family_depth(free, split, probs: dict, sim: dict | None) -> dict:
    """Where depth matters, per question family: every exit's standalone accuracy and the final layer's
    ('exits', 'final'), and where a calibrated point `sim` is given, the mean language-model layers its
    questions run, its accuracy and the share leaving at each exit."""
    out = {}
    for fam in sorted(set(split.families)):
        idx = torch.tensor([i for i, f in enumerate(split.families) if f == fam])
        acc = lambda pred: 100.0 * split.score(idx, pred[idx]).mean().item()
        out[fam] = {"exits": [acc(p.argmax(1)) for p in probs["exits"]], "final": acc(probs["final"].argmax(1))}
        if sim is not None:
            shares = torch.bincount(sim["exit"][idx], minlength=free.num_exits + 1).float() / len(idx)
            out[fam] |= {"avg_layers": layers_run(free, sim)[idx].mean().item(), "accuracy": acc(sim["pred"]),
                         "exit_share": {str(l): 100.0 * s.item() for l, s in zip(free.exit_layers + ["final"], shares)}}
    return out


# ----------------------------------------------------------------------------------------------------
# The sweep and the calibrated operating point
# ----------------------------------------------------------------------------------------------------
def sweep(free, split, probs: dict, timing_ids, cfg: InferConfig) -> list[dict]:
    """Every rule at every threshold of its grid, every exit evaluated: accuracy, layers run, layer speedup and
    (with timing) the measured batched wall-clock speedup."""
    rows = []
    for rule, spec in RULES.items():
        for t in spec.grid(free.num_exits):
            sim = simulate(probs, rule, t)
            avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
            row = {"rule": rule, "threshold": t, "accuracy": accuracy(split, sim["pred"]), "avg_layers": avg_layers,
                   "layer_speedup": speedup}
            if cfg.timing:
                row["wallclock_speedup"] = time_speedup(free, split, timing_ids, cfg.batch_size, rule, t,
                                                        max(1, cfg.repeats // 2))["speedup"]
            rows.append(row)
    return rows


def exit_subsets(K: int) -> list[list[int]]:
    """Every non-empty set of exits, larger sets first (all K first: the paper's setting wins ties)."""
    return sorted(([k for k in range(K) if mask >> k & 1] for mask in range(1, 2 ** K)), key=len, reverse=True)


# A calibrated point should keep its promise on new questions, not only on the questions it was picked on.
# Its risk is the mean of a per-question loss in [0, 1] over new questions, and both losses bound the
# accuracy drop from above (a score is in [0, 1], and an answer that does not change cannot lose credit):
#   harm:     max(0, score of the full model's answer - score of the early answer)   (needs labels)
#   disagree: 1 if the early answer differs from the full model's, else 0   (CALM's consistency; no labels)
def risk_losses(val, full_pred: torch.Tensor, pred: torch.Tensor, risk: str) -> torch.Tensor:
    """(n,) per-question losses in [0, 1] of early answers `pred` against the full model's `full_pred`."""
    if risk == "disagree":
        return (pred != full_pred).float()                                # reads no label
    every = torch.arange(len(val))
    return (val.score(every, full_pred) - val.score(every, pred)).clamp(min=0.0)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p) for i in range(0, min(k, n) + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def hb_pvalue(risk_hat: float, n: int, eps: float) -> float:
    """p-value of H0: risk > eps, from the mean risk_hat of n i.i.d. losses in [0, 1] (Hoeffding-Bentkus,
    Bates et al. 2021): min(exp(-n h(risk_hat, eps)), e P(Binomial(n, eps) <= ceil(n risk_hat))), with
    h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)); 1 where risk_hat >= eps."""
    if risk_hat >= eps:
        return 1.0
    h = (risk_hat * math.log(risk_hat / eps) if risk_hat > 0 else 0.0) + (1 - risk_hat) * math.log((1 - risk_hat) / (1 - eps))
    return min(1.0, math.exp(-n * h), math.e * binomial_cdf(math.ceil(n * risk_hat - 1e-9), n, eps))


# Learn-then-Test (Angelopoulos et al. 2021), as CALM does for early exit in language models (Schuster et
# al. 2022): for each threshold, from the most conservative to the most aggressive, test H0: risk > eps with
# the p-value above, and stop at the first one not rejected at level delta. Every threshold rejected before
# it has risk <= eps with probability >= 1 - delta over the draw of the calibration questions (testing in a
# fixed order controls the family-wise error). Searching several sets of exits would void that, so each set
# is tested at delta / (number of sets) (Bonferroni): all certified points hold at once with probability
# >= 1 - delta, and so does the fastest of them, which is the one chosen.
def calibrate(free, val, val_probs: dict, rule: str, costs: dict, max_drop: float, calibration: str = "guaranteed",
              delta: float = 0.1, risk: str = "harm") -> dict:
    """On val: the threshold *and the set of exits evaluated* with the highest predicted speedup under the cost
    model `costs` that is certified to risk <= max_drop points (calibration 'guaranteed', see above), or whose
    measured val drop is <= max_drop points ('empirical': the accuracy drop, or for risk 'disagree' the share
    of changed answers; no guarantee). Why the exits too: an exit pays only if enough questions leave there,
    and at batch 1 on a CPU an exit costs most of a layer (as many small operations) whatever its FLOPs."""
    full_pred, sets, eps, best = val_probs["final"].argmax(1), exit_subsets(free.num_exits), max_drop / 100, None
    for exits in sets:
        for t in reversed(RULES[rule].grid(len(exits))):                  # from the most conservative threshold
            sim = simulate(val_probs, rule, t, exits)
            loss = risk_losses(val, full_pred, sim["pred"], risk).mean().item()
            if calibration == "guaranteed":
                p = hb_pvalue(loss, len(val), eps)
                if p > delta / len(sets):
                    break                                                  # fixed sequence: stop at the first failure
                measured = {"val_risk": loss, "p_value": p}
            else:
                drop = loss if risk == "disagree" else (accuracy(val, full_pred) - accuracy(val, sim["pred"])) / 100
                if drop > eps:
                    continue
                measured = {"val_drop": 100 * drop}
            speedup = predicted_speedup(free, sim, costs)
            if best is None or speedup > best["predicted_speedup"] + 1e-9:
                best = {"threshold": t, "exit_layers": [free.exit_layers[k] for k in exits], "predicted_speedup": speedup,
                        **measured}
    setting = {"rule": rule, "calibration": calibration, "risk": risk, "max_drop": max_drop, "delta": delta,
               "calibration_questions": len(val), "exit_sets": len(sets), "cost_model": costs}
    if best is None or best["predicted_speedup"] <= 1.0:        # none, or none faster than the full model
        return setting | {"threshold": None}
    return setting | best


def questions_to_certify(eps: float, delta: float) -> int:
    """The fewest calibration questions with which even a point that changes no answer (risk 0 on all of
    them) is certified to risk <= eps at level delta: below it, Learn-then-Test can certify nothing."""
    n = 1
    while hb_pvalue(0.0, n, eps) > delta:
        n *= 2
    low, high = n // 2, n
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if hb_pvalue(0.0, mid, eps) > delta else (low, mid)
    return high


def promise(c: dict) -> str:
    """What a calibrated point promises, in words."""
    if c["calibration"] == "empirical":
        measured = "accuracy drop" if c["risk"] == "harm" else "share of answers that differ from the full model's"
        return f"no guarantee: the {measured} on the calibration (val) questions was <= {points(c['max_drop'])}"
    what = "the accuracy drop" if c["risk"] == "harm" else "the share of answers that differ from the full model's " \
        "(and so the accuracy drop)"
    return (f"with probability >= {100 * (1 - c['delta']):g} % over the draw of the {c['calibration_questions']} "
            f"calibration (val) questions, {what} on new questions from this distribution is <= {points(c['max_drop'])}")


def points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def exit_indices(free, cal: dict) -> list[int]:
    """The exits a calibrated point evaluates, as indices."""
    return [free.exit_layers.index(l) for l in cal["exit_layers"]]


def calibrated_point(free, split, probs: dict, cal: dict, full_accuracy: float, timing_ids, cfg: InferConfig,
                     timed: bool = True) -> dict:
    """A val-calibrated point on the eval split: accuracy and its drop, the layer view and, if timed, the
    measured wall-clock speedup at batch 1 and batched, end to end and for the language model alone."""
    if cal["threshold"] is None:
        return cal
    exits = exit_indices(free, cal)
    sim = simulate(probs, cal["rule"], cal["threshold"], exits)
    avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
    acc = accuracy(split, sim["pred"])
    cal = cal | {"accuracy": acc, "accuracy_drop": full_accuracy - acc, "avg_layers": avg_layers, "layer_speedup": speedup}
    if timed and cfg.timing:
        for ready, prefix in ((False, ""), (True, "lm_")):
            for ids, batch, name in ((timing_ids[:max(1, len(timing_ids) // 2)], 1, "batch1"), (timing_ids, cfg.batch_size, "batched")):
                t = time_speedup(free, split, ids, batch, cal["rule"], cal["threshold"], cfg.repeats, ready, exits)
                cal |= {f"{prefix}wallclock_speedup_{name}": t["speedup"], f"{prefix}timing_{name}": t}
    return cal


def build_report(free, splits: dict, split_name: str, cfg: InferConfig) -> dict:
    """Everything the report says about one checkpoint on one split, calibrated on val; run and timed where
    `free` is, on an inference copy (inference_copy)."""
    free = inference_copy(free)
    split, val = splits[split_name], splits["val"]
    probs = collect(free, split, cfg.batch_size)
    val_probs = probs if split_name == "val" else collect(free, val, cfg.batch_size)
    profile = exit_profile(split, probs, free.exit_layers)
    timing_ids = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:cfg.timing_samples]
    oracle = oracle_exits(probs)
    report = {"split": split_name, "samples": len(split), "device": str(next(free.parameters()).device),
              "batch_size": cfg.batch_size,
              "threads": torch.get_num_threads(), "full": {"accuracy": profile["final"], "layers": free.backbone.depth},
              "exits": profile["exits"],
              "mid_crisis": {"free_exits": mid_crisis(profile), "raw_readout": mid_crisis(profile, "raw_accuracy")},
              "overthinking": overthinking(split, probs), "sweep": sweep(free, split, probs, timing_ids, cfg),
              "oracle": dict(zip(("avg_layers", "layer_speedup"), layer_speedup(free, oracle, probs["seq_len"])))}
    costs = unit_costs(free, val, torch.arange(min(32, len(val))), cfg.repeats) if cfg.timing else \
        flop_costs(free, val_probs["seq_len"])
    risk = cfg.risk if cfg.risk != "auto" else ("harm" if free.cfg.label_fraction > 0 else "disagree")
    cal = calibrate(free, val, val_probs, cfg.rule, costs, cfg.max_drop, cfg.calibration, cfg.delta, risk)
    report["calibrated"] = calibrated_point(free, split, probs, cal, profile["final"], timing_ids, cfg)
    if cfg.calibration == "guaranteed":                    # the rule without a guarantee, for what it costs
        plain = calibrate(free, val, val_probs, cfg.rule, costs, cfg.max_drop, "empirical", cfg.delta, risk)
        report["empirical"] = calibrated_point(free, split, probs, plain, profile["final"], timing_ids, cfg, timed=False)
    point = None if cal["threshold"] is None else simulate(probs, cfg.rule, cal["threshold"], exit_indices(free, cal))
    report["per_family"] = per_family_depth(free, split, probs, point)
    return report


# ----------------------------------------------------------------------------------------------------
# Printing and plotting the report
# ----------------------------------------------------------------------------------------------------
def print_report(r: dict, free) -> None:
    print(f"\n== early-exit report on {r['split']} ({r['samples']} questions; measured on {r['device']}, "
          f"{r['threads']} torch threads) ==")
    print(f"full model accuracy: {r['full']['accuracy']:.2f}%  ({free.backbone.depth} language-model layers)")
    print("depth profile (every question forced to leave at the exit):")
    for e in r["exits"]:
        print(f"  after layer {e['layer']:>2}: FREE exit {e['accuracy']:6.2f}%   raw readout (no G_k) {e['raw_accuracy']:6.2f}%")
    mc, o = r["mid_crisis"], r["overthinking"]
    print(f"mid-crisis (largest accuracy drop shallower -> deeper): FREE exits {mc['free_exits']['drop']:.2f} pts, "
          f"raw readout {mc['raw_readout']['drop']:.2f} pts")
    print(f"overthinking: {o['fixable_pct']:.2f}% of questions are right at some exit but wrong at the final layer; "
          f"{o['early_right_pct_of_final_right']:.1f}% of those the final layer gets right were already right at an exit")
    timed = "wallclock_speedup" in r["sweep"][0]
    print("sweep, every exit evaluated (layers: language-model layers run, on average; layer x: the paper's view, "
          f"{free.backbone.depth} / (layers run + exits evaluated x an exit's cost in layers)" +
          (f"; clock x: measured wall-clock speedup, batches of {r['batch_size']})" if timed else ")"))
    print(f"{'rule':<9}{'thr':>7}{'acc %':>8}{'layers':>8}{'layer x':>9}" + (f"{'clock x':>9}" if timed else ""))
    for s in r["sweep"]:
        print(f"{s['rule']:<9}{s['threshold']:>7g}{s['accuracy']:>8.2f}{s['avg_layers']:>8.2f}{s['layer_speedup']:>9.2f}" +
              (f"{s['wallclock_speedup']:>9.2f}" if timed else ""))
    if timed:
        print(timing_noise(r["sweep"], free.backbone.depth))
    print(f"oracle (every question leaves at the earliest exit that gives the final layer's answer): "
          f"{r['oracle']['avg_layers']:.2f} layers, layer speedup {r['oracle']['layer_speedup']:.2f}x")
    print(format_calibrated(r["calibrated"], r.get("empirical")))
    print_per_family(r)


def timing_noise(sweep: list[dict], depth: int) -> str:
    """What the clock column is worth here: where no question leaves early, early exit does the full model's
    work, so its speedup there is timing noise alone."""
    idle = [s["wallclock_speedup"] for s in sweep if s["avg_layers"] >= depth - 1e-9]
    if not idle:
        return "(every threshold lets some question leave early, so the noise of the clock column is not seen here)"
    spread = f"{min(idle):.2f}-{max(idle):.2f}x"
    if max(idle) / min(idle) > 1.25 or abs(math.log(max(idle))) > 0.2 or abs(math.log(min(idle))) > 0.2:
        return (f"warning: where no question leaves early the clock reads {spread} (it should read 1.00x): timing is "
                f"noisy here (other work on this machine, or too few --timing-samples); trust the layer column")
    return f"where no question leaves early the clock reads {spread} (1.00x would be no noise)"


def print_per_family(r: dict) -> None:
    """The per-family table: accuracy at every exit and at the final layer; at the calibrated point, the
    mean layers run, the accuracy and where the questions leave."""
    layers = [e["layer"] for e in r["exits"]]
    point = "at the calibrated point" if r["calibrated"]["threshold"] is not None else \
        "no calibrated point, so its columns stay empty"
    print(f"per family (accuracy % with every question leaving at the exit; {point}):")
    print(f"  {'family':<13}" + "".join(f"{'L' + str(l):>7}" for l in layers) + f"{'final':>7}  | {'layers':>6} {'acc':>6}  leave at")
    for fam, d in r["per_family"].items():
        row = f"  {fam:<13}" + "".join(f"{a:>7.1f}" for a in d["exits"]) + f"{d['final']:>7.1f}  |"
        if "avg_layers" in d:
            row += f" {d['avg_layers']:>6.2f} {d['accuracy']:>6.1f}  " + " ".join(f"{k}:{v:.0f}%" for k, v in d["exit_share"].items())
        print(row)


def format_calibrated(c: dict, plain: dict | None = None) -> str:
    """The calibrated point, its promise and (plain: the empirical rule's point) what the promise costs."""
    if c["threshold"] is None:
        line = f"calibrated ({c['calibration']}, {c['risk']}): no threshold {c['rule']} keeps the promise on val"
        need = questions_to_certify(c["max_drop"] / 100, c["delta"] / c.get("exit_sets", 1))
        if c["calibration"] == "guaranteed" and c["calibration_questions"] < need:
            line += (f": with {c['calibration_questions']} calibration questions not even a point that changes no "
                     f"answer can be certified to a drop <= {points(c['max_drop'])} (that takes {need}; more "
                     f"--val-images, or a larger --max-drop)")
        return line + "; every question runs the full model"
    line = (f"calibrated on val ({c['calibration']}, risk {c['risk']}; {c['rule']} threshold {c['threshold']:g}, exits "
            f"after layers {','.join(map(str, c['exit_layers']))}): accuracy {c['accuracy']:.2f}% (drop "
            f"{c['accuracy_drop']:+.2f} pts), {c['avg_layers']:.2f} layers, layer speedup {c['layer_speedup']:.2f}x"
            f"\n  promise: {promise(c)}")
    costs = c["cost_model"]
    if costs["unit"].startswith("seconds"):
        line += (f"\n  chosen by the costs measured here at batch 1: embedding {1e3 * costs['embed']:.2f} ms, a layer "
                 f"{1e3 * costs['layer']:.2f} ms, an exit {1e3 * costs['exit']:.2f} ms, the final head "
                 f"{1e3 * costs['head']:.2f} ms (predicted speedup {c['predicted_speedup']:.2f}x)")
    if "wallclock_speedup_batch1" in c:
        spread = lambda t: f" (rounds {t['round_speedup_min']:.2f}-{t['round_speedup_max']:.2f})"
        line += (f"\n  wall-clock speedup end to end: {c['wallclock_speedup_batch1']:.2f}x at batch 1"
                 f"{spread(c['timing_batch1'])}, {c['wallclock_speedup_batched']:.2f}x at batch "
                 f"{c['timing_batched']['batch_size']}{spread(c['timing_batched'])}; language model only (image tokens "
                 f"computed beforehand): {c['lm_wallclock_speedup_batch1']:.2f}x at batch 1, "
                 f"{c['lm_wallclock_speedup_batched']:.2f}x batched")
    if plain is not None and plain["threshold"] is not None:
        line += (f"\n  without the guarantee (empirical rule): {plain['rule']} threshold {plain['threshold']:g}, exits "
                 f"after layers {','.join(map(str, plain['exit_layers']))}: drop {plain['accuracy_drop']:+.2f} pts, "
                 f"layer speedup {plain['layer_speedup']:.2f}x, predicted {plain['predicted_speedup']:.2f}x "
                 f"(the guarantee's price: {plain['predicted_speedup'] / c['predicted_speedup']:.2f}x of predicted speed)")
    return line


def plot_per_family(ax, r: dict, layers: list[int]) -> None:
    """Per family: accuracy at each exit and the final layer (lines), and the calibrated point's mean layers
    run and accuracy (a star on the family's line colour): where depth matters and who goes deep."""
    depth = r["full"].get("layers", layers[-1] + 2)
    starred = False
    for fam, d in r["per_family"].items():
        line, = ax.plot(layers + [depth], d["exits"] + [d["final"]], "o-", ms=3, label=fam)
        if "avg_layers" in d:
            ax.plot([d["avg_layers"]], [d["accuracy"]], "*", ms=12, color=line.get_color())
            starred = True
    stars = " (stars: the calibrated point's mean layers run)" if starred else ""
    ax.set(xlabel="language-model layer" + stars, ylabel="accuracy (%)", title="per family: where depth matters")
    ax.legend(fontsize=7, loc="lower right")


def plot_report(r: dict, path: str) -> None:
    """Accuracy vs speedup per rule (the calibrated point and the promised limit marked), exit accuracy vs
    depth, and the same per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
    timed = "wallclock_speedup" in r["sweep"][0]
    key = "wallclock_speedup" if timed else "layer_speedup"            # measured if timed, else the layer view
    for rule in RULES:
        rows = sorted((s for s in r["sweep"] if s["rule"] == rule), key=lambda s: s[key])
        ax1.plot([s[key] for s in rows], [s["accuracy"] for s in rows], "o-", ms=3, label=rule)
    full, c = r["full"]["accuracy"], r["calibrated"]
    ax1.plot([1.0], [full], "ks", label="full model")
    ax1.axhline(full - c["max_drop"], color="grey", ls="--", lw=1, label=f"the {points(c['max_drop'])} limit")
    if c["threshold"] is not None:
        ax1.plot([c["wallclock_speedup_batched" if timed else "layer_speedup"]], [c["accuracy"]], "r*", ms=14,
                 label=f"calibrated ({c['rule']})")
    lowest = min(s["accuracy"] for s in r["sweep"])
    ax1.set_ylim(min(lowest, full - 5) - 1, max(full, max(s["accuracy"] for s in r["sweep"])) + 1)
    ax1.set(xlabel=f"wall-clock speedup (batches of {r.get('batch_size', '?')}, {r['device']})" if timed else
            "layer speedup", ylabel="accuracy (%)", title="accuracy vs speedup")
    ax1.legend(fontsize=8, loc="lower left")
    layers = [e["layer"] for e in r["exits"]]
    ax2.plot(layers, [e["accuracy"] for e in r["exits"]], "o-", label="FREE exits")
    ax2.plot(layers, [e["raw_accuracy"] for e in r["exits"]], "x--", label="raw readout (no exit layer)")
    ax2.axhline(full, color="k", ls=":", label="final layer")
    shown = [full] + [e[k] for e in r["exits"] for k in ("accuracy", "raw_accuracy")]
    middle, half = (max(shown) + min(shown)) / 2, max(6.0, (max(shown) - min(shown)) / 2 + 2)
    ax2.set_ylim(middle - half, middle + half)                 # at least 12 points: rounding noise stays flat
    ax2.set(xlabel="language-model layer", ylabel="accuracy (%)", title="depth profile")
    ax2.legend(fontsize=8, loc="lower right")
    plot_per_family(ax3, r, layers)
    for ax in (ax2, ax3):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------
SHIPPED_EXITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backbones", "shapes-default-free.pt")


def default_checkpoint() -> str:
    """No --ckpt: train.py's output (out/ckpt.pt) if there is one, else the exits the repo ships."""
    return "out/ckpt.pt" if os.path.isfile("out/ckpt.pt") else SHIPPED_EXITS


def read_question(tokenizer, cfg: InferConfig, image_size: int) -> tuple[dict, list[str]]:
    """The model's inputs for --image and --question (image (1, 3, H, W) in [0, 1], tokens and mask (1, T)),
    and notes on what the model will not see as given: words no training question had, a question cut
    to the tokens the model reads, an image unlike the ones it was trained on."""
    if not os.path.isfile(cfg.image):
        raise DataError(f"--image {cfg.image}: file not found")
    image = load_image(cfg.image, image_size).float()[None] / 255.0           # (1, 3, H, W)
    tokens, text_mask = encode_questions(tokenizer, [cfg.question])            # (1, T)
    notes = []
    unseen = unseen_words(tokenizer, cfg.question)
    if unseen:
        notes.append(f"no training question had the words {', '.join(unseen)}: the answer cannot rest on what they mean")
    if tokenizer.encode(cfg.question).overflowing:
        kept = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True).replace(" ##", "")
        notes.append(f"the question is longer than the {tokens.shape[1]} tokens the model reads; it reads: \"{kept}\"")
    with Image.open(cfg.image) as im:
        mode, size = im.mode, im.size
    if mode != "RGB" or size != (image_size, image_size):
        notes.append(f"the image is {size[0]} x {size[1]} {mode}; the model sees it as {image_size} x {image_size} RGB "
                     f"(it was trained on pictures like those of data.py --scene)")
    return {"images": image, "tokens": tokens, "text_mask": text_mask}, notes


@torch.no_grad()
def answer_one(free, answers: list[str], inputs: dict, rule: str, threshold: float,
               exits: list[int] | None = None) -> dict:
    """Answer one question with early exit (evaluating the exits `exits`, default all): the answer, its
    probability, the exit it left at (K = the final layer) and where that is, in words."""
    device = next(free.parameters()).device
    out = early_exit_predict(free, **to_device(inputs, device), rule=rule, threshold=threshold, exits=exits)
    k, L = out["exit"].item(), free.backbone.depth
    where = f"exit {k + 1} of {free.num_exits} (after layer {free.exit_layers[k]} of {L})" if k < free.num_exits \
        else f"the final layer ({L} of {L})"
    return {"answer": answers[out["pred"].item()], "confidence": out["confidence"].item(), "exit": k, "where": where}


@torch.no_grad()
def explain(free, answers: list[str], inputs: dict, rule: str, threshold: float, exits: list[int] | None) -> list[str]:
    """Why the question left where it did, exit by exit: each exit's answer and the rule's measure against
    the threshold, whether this operating point evaluates that exit, and the final layer's answer."""
    device, spec = next(free.parameters()).device, RULES[rule]
    out = free.all_outputs(**to_device(inputs, device))
    sign = ">=" if spec.high else "<="
    lines = [f"exit by exit (rule {rule}: a question leaves at the first exit where {spec.what} {sign} {threshold:g}):"]
    last, streak, left = None, torch.zeros(1), False
    for k, logits in enumerate(out["exits"]):
        name = f"  exit {k + 1} (after layer {free.exit_layers[k]}):"
        probs = logits.float().softmax(dim=1)                                  # (1, A)
        conf, pred = probs.max(dim=1)
        if exits is not None and k not in exits:
            lines.append(f"{name:<26} {answers[pred.item()]:<10} not evaluated at this operating point")
            continue
        streak = torch.ones(1) if last is None or pred != last else streak + 1
        last, measure = pred, spec.measure(conf, probs, streak).item()
        fires = bool(spec.fires(conf, probs, streak, threshold))
        verdict = "(not run: the question had left)" if left else ("leaves here" if fires else "goes on")
        mark = sign if fires else {">=": "<", "<=": ">"}[sign]
        lines.append(f"{name:<26} {answers[pred.item()]:<10} {measure:.3f} {mark} {threshold:g}  {verdict}")
        left = left or fires
    conf, pred = out["final"].float().softmax(dim=1).max(dim=1)
    lines.append(f"  {'final layer:':<24} {answers[pred.item()]:<10} {conf.item():.3f}"
                 + ("" if left else "  answers (no exit fired)"))
    return lines


def unseen_words(tokenizer, question: str) -> list[str]:
    """The question's words (once each, punctuation left out) that are no word of the tokenizer's vocabulary:
    the training questions never had them (the tokenizer still splits them into known characters, so the
    model answers regardless)."""
    words = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(question))
    unseen = [w for w, _ in words if any(c.isalnum() for c in w) and tokenizer.token_to_id(w) is None]
    return list(dict.fromkeys(unseen))


def check_infer_config(cfg: InferConfig) -> None:
    """Refuse settings that cannot work, naming the flag (DataError)."""
    for name in ("batch_size", "timing_samples", "repeats"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.threads < 0 or not 0 < cfg.max_drop < 100:
        raise DataError(f"--threads must be >= 0 and --max-drop in (0, 100) points (got {cfg.threads}, {cfg.max_drop})")
    if not 0 < cfg.delta < 1:
        raise DataError(f"--delta must be a probability in (0, 1) (got {cfg.delta})")
    spec, t = RULES[cfg.rule], cfg.threshold
    if t != -1 and not (spec.bounds[0] <= t <= spec.bounds[1] and (not spec.whole or t == int(t))):
        kind = "a whole number" if spec.whole else "a number"
        raise DataError(f"--threshold {t:g}: {cfg.rule} takes {kind} from {spec.bounds[0]:g} to {spec.bounds[1]:g} "
                        f"(or -1: the calibrated one)")
    if cfg.image and not cfg.question.strip():
        raise DataError("--image needs a question: give --question with the text to answer (it is empty)")
    if cfg.question and not cfg.image:
        raise DataError("--question needs --image, the picture it asks about")
    if cfg.eval and cfg.image:
        raise DataError("--eval reports on a whole split and --image answers one question: give one of them")
    if cfg.explain and not cfg.image:
        raise DataError("--explain goes with --image and --question")
    if not (cfg.eval or cfg.image):
        raise DataError("nothing to do: give --eval, or --image and --question")


def load_free(cfg: InferConfig):
    """The checkpoint's FREE model (exits on their backbone), tokenizer, answers, data config and stored state."""
    state = load_checkpoint(cfg.ckpt, "--ckpt")
    try:
        _, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"--ckpt {cfg.ckpt}: not a free-min checkpoint ({e.__class__.__name__}: {str(e)[:120]})")
    if free is None:
        raise DataError(f"--ckpt {cfg.ckpt}: has a backbone but no exits; train them with python train.py --stage exits")
    return free, tokenizer, answers, dcfg, state


def pick_threshold(free, cfg: InferConfig, calibrated: dict) -> tuple[float, list[int] | None, str]:
    """The threshold and exits --image uses, and how they were chosen: --threshold if given; else the run's
    calibrated point for this rule (none evaluated, i.e. the full model, where calibration found no point
    that keeps its promise); else the rule's default."""
    if cfg.threshold != -1:
        return cfg.threshold, None, f"threshold {cfg.threshold:g}"
    if calibrated.get("rule") == cfg.rule and calibrated.get("threshold") is not None:
        return calibrated["threshold"], exit_indices(free, calibrated), f"threshold {calibrated['threshold']:g} " \
            f"(calibrated, {calibrated.get('calibration', 'empirical')})"
    if calibrated.get("rule") == cfg.rule:
        return RULES[cfg.rule].default, [], "no exit: calibration found no point that keeps its promise"
    return RULES[cfg.rule].default, None, f"threshold {RULES[cfg.rule].default:g} (the rule's default; not calibrated)"


def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, InferConfig)
    cfg = config_from_args(InferConfig, p.parse_args(argv))
    try:
        check_infer_config(cfg)
        torch.set_num_threads(pick_threads(cfg.threads)[0])
        if not cfg.ckpt:
            cfg.ckpt = default_checkpoint()
            print(f"checkpoint: {os.path.relpath(cfg.ckpt)} (--ckpt to choose)")
        free, tokenizer, answers, dcfg, state = load_free(cfg)
        free.to(pick_device(cfg.device))
        if cfg.eval:
            report_command(free, tokenizer, answers, dcfg, cfg)
        else:
            answer_command(free, tokenizer, answers, state, cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def report_command(free, tokenizer, answers: list[str], dcfg, cfg: InferConfig) -> None:
    """--eval: the report on --split, printed and written beside the checkpoint (or to --json / --plot)."""
    splits, _, _ = load_data(dcfg, tokenizer, answers, only=tuple({"val", cfg.split}))
    report = build_report(free, splits, cfg.split, cfg)
    print_report(report, free)
    json_path, plot_path = report_paths(cfg)
    try:
        save_atomic(json_path, report)
        plot_report(report, plot_path)
    except OSError as e:
        raise DataError(f"cannot write the report ({e.strerror}: {e.filename}); choose the files with --json and --plot")
    print(f"wrote {os.path.relpath(json_path)} and {os.path.relpath(plot_path)}")


def report_paths(cfg: InferConfig) -> tuple[str, str]:
    """--json and --plot, or beside the checkpoint: report.json and speedup.png for the test split (the names
    train.py gives the same report), report_SPLIT.json and speedup_SPLIT.png for another split."""
    folder, tail = os.path.dirname(os.path.abspath(cfg.ckpt)), "" if cfg.split == "test" else f"_{cfg.split}"
    return (cfg.json or os.path.join(folder, f"report{tail}.json"),
            cfg.plot or os.path.join(folder, f"speedup{tail}.png"))


def answer_command(free, tokenizer, answers: list[str], state: dict, cfg: InferConfig) -> None:
    """--image and --question: the answer, where it left and how the threshold was chosen (--explain: why)."""
    threshold, exits, how = pick_threshold(free, cfg, state.get("calibrated") or {})
    inputs, notes = read_question(tokenizer, cfg, state["model_config"]["image_size"])
    out = answer_one(free, answers, inputs, cfg.rule, threshold, exits)
    print(f"answer: {out['answer']}  (confidence {out['confidence']:.3f}; left at {out['where']}; rule "
          f"{cfg.rule}, {how})")
    if cfg.explain:
        print("\n".join(explain(free, answers, inputs, cfg.rule, threshold, exits)))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
