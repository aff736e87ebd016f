"""Early-exit inference and the evaluation report: FREE's speed/accuracy claim, measured.

    python infer.py --ckpt out/ckpt.pt --image IMG.png --question "what color is the circle?"
    python infer.py --ckpt out/ckpt.pt --eval [--split test] [--json FILE.json] [--plot FILE.png]

The paper's promise: inference is input-adaptive (a sample leaves at the first exit confident
enough) and so faster at comparable accuracy (free_min.early_exit_predict):

    h = embed(image, question)
    for l = 1..L:  h = layer_l(h);  at an exit k (l = l_k):  p_k = softmax(head(G_k(h)))
                   the rows with max p_k >= alpha answer argmax p_k and leave the batch
    the rows left answer from the final layer

Samples that exit stop computing, and the speedup is measured in wall-clock time against the full
model in the same process (time_speedup), beside the paper's layer-count view. The report (--eval)
holds the full model's accuracy and every exit's (the depth profile, beside a raw readout of the
same layer without G_k); mid-crisis and overthinking; a threshold sweep per exit rule
(free_min.RULES); a calibrated operating point, picked on the *calib* split (the fastest whose
accuracy drop is <= --max-drop points; data.SPLITS says which split chooses what), reported on the
eval split and timed at batch 1 and batched; and the depth each question family runs to there.
Its statistics, cost models, printing and figure are in util/report.py.

Public: InferConfig, RISKS, main, collect, accuracy, exit_profile, simulate, layers_run,
predicted_speedup, layer_speedup, timing_batches, time_speedup, calibrate, exit_indices,
build_report, read_question.
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from data import batches, encode_questions, load_data
from free_min import RULES, early_exit_predict
from util import report
from util.checkpoints import default_checkpoint, load_free
from util.config import (flag, ConfigError, DataError, Parser, UsageError, add_config_args,
                         config_from_args)
from util.runtime import (device_of, inference_copy, pick_device, pick_threads, synchronize,
                          to_device)
from util.vqa import load_image

RISKS = ("harm", "disagree")          # the losses calibration can bound (see risk_losses)


@dataclass
class InferConfig:
    # checkpoint written by train.py (backbone + exits); default: out/ckpt.pt if it exists, else the
    # exits the repo ships (backbones/shapes-default-free.pt)
    ckpt: str = ""
    image: str = ""  # answer one question about this image file
    question: str = ""  # the question to answer about --image
    # with --image: show every exit's answer and the rule's measure against its threshold, and why
    # it left where it did
    explain: bool = False
    eval: bool = False  # evaluate on --split, print the report and write it (--json, --plot)
    # split to report on
    split: str = field(default="test", metadata={"choices": ["train", "val", "test"]})
    # exit rule (maxprob = FREE's)
    rule: str = field(default="maxprob", metadata={"choices": list(RULES)})
    # exit threshold for --image (-1 = the calibrated one, else the rule's default)
    threshold: float = -1.0
    # calibration: the accuracy drop (points) the calibrated point may cost on new images
    max_drop: float = 1.0
    # guaranteed: Learn-then-Test, the drop stays within --max-drop with probability >= 1 - --delta
    # (see calibrate); empirical: the fastest point within --max-drop on calib, no guarantee
    calibration: str = field(default="guaranteed",
                             metadata={"choices": ["guaranteed", "empirical"]})
    # guaranteed calibration: the probability that the promise fails (over the draw of the
    # calibration images)
    delta: float = 0.1
    # the split the point is calibrated on: calib (drawn for it, chose nothing else: what the
    # guarantee assumes) or val (to compare choices on val, as experiments/select_exits.py does)
    calibrate_on: str = field(default="calib", metadata={"choices": ["calib", "val"]})
    # the loss calibration bounds: harm (an early answer loses credit the full model had; reads
    # labels) or disagree (it differs from the full model's; reads none); auto = harm if the exits
    # were trained with labels, else disagree
    risk: str = field(default="auto", metadata={"choices": ["auto", *RISKS]})
    # --eval: the report's JSON file (default: report.json in the checkpoint's folder;
    # report_SPLIT.json for another --split)
    json: str = ""
    # --eval: the figure, accuracy vs speedup, depth profile and depth per family (default:
    # speedup.png beside report.json)
    plot: str = ""
    batch_size: int = 64  # batch size of evaluation and of the batched timing
    timing_samples: int = 256  # questions timed per measurement (half of them at batch 1)
    repeats: int = 5  # timing rounds; the median is reported
    # CPU threads for torch (0 = the cores not busy with other work; the report prints it)
    threads: int = 0
    # where the report runs and is timed: auto (cuda, then mps, then cpu; printed), cuda, mps or cpu
    device: str = field(default="auto", metadata={"choices": ["auto", "cuda", "mps", "cpu"]})
    # measure wall-clock speedups and calibrate by costs measured here (--no-timing: the layer view
    # and FLOPs only, deterministic)
    timing: bool = True


def check_infer_config(cfg: InferConfig) -> None:
    """Refuse settings that cannot work, naming the flag (ConfigError)."""
    for name in ("batch_size", "timing_samples", "repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(
                f"{flag(name)} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.threads < 0 or not 0 < cfg.max_drop < 100:
        raise ConfigError(
            f"--threads must be >= 0 and --max-drop in (0, 100) points (got {cfg.threads}, "
            f"{cfg.max_drop})")
    if not 0 < cfg.delta < 1:
        raise ConfigError(f"--delta must be a probability in (0, 1) (got {cfg.delta})")
    spec, t = RULES[cfg.rule], cfg.threshold
    if t != -1 and not (spec.bounds[0] <= t <= spec.bounds[1] and (not spec.whole or t == int(t))):
        kind = "a whole number" if spec.whole else "a number"
        raise ConfigError(f"--threshold {t:g}: {cfg.rule} takes {kind} from {spec.bounds[0]:g} to "
                          f"{spec.bounds[1]:g} (or -1: the calibrated one)")
    refusals = [
        (
            cfg.image and not cfg.question.strip(),
            "--image needs a question: give --question with the text to answer (it is empty)",
        ),
        (cfg.question and not cfg.image, "--question needs --image, the picture it asks about"),
        (
            cfg.eval and cfg.image,
            "--eval reports on a whole split and --image answers one question: give one of them",
        ),
        (cfg.explain and not cfg.image, "--explain goes with --image and --question"),
        (not (cfg.eval or cfg.image), "nothing to do: give --eval, or --image and --question"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)


# --------------------------------------------------------------------------------------------------
# One pass over a split: every exit's and the final layer's answer distribution
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(free, split, batch_size: int) -> dict:
    """Answer probabilities of the final layer (n, A), of every exit (K, n, A), and of a raw
    readout of the exits' layers through the frozen head without G_k (K, n, A); the mean sequence
    length. CPU tensors."""
    free.eval()
    bb, device = free.backbone, device_of(free)
    final, exits, raw, seq = [], [], [], []
    for ids in batches(len(split), batch_size):
        out = free.all_outputs(**to_device(split.batch(ids), device))
        final.append(out["final"].float().softmax(1).cpu())                            # (B, A)
        exits.append(torch.stack([e.float().softmax(1) for e in out["exits"]]).cpu())  # (K, B, A)
        readout = [bb.head(out["states"][l][:, 0]).float().softmax(1) for l in free.exit_layers]
        raw.append(torch.stack(readout).cpu())                                         # (K, B, A)
        mask, S = out["attn_mask"], out["states"][0].shape[1]                     # None: no padding
        lengths = torch.full((len(ids),), float(S)) if mask is None else mask.sum(dim=-1).flatten()
        seq.append(lengths.float().cpu())
    return {"final": torch.cat(final), "exits": torch.cat(exits, 1), "raw": torch.cat(raw, 1),
            "seq_len": torch.cat(seq).mean().item()}


def accuracy(split, pred: torch.Tensor) -> float:
    return 100.0 * split.score(torch.arange(len(split)), pred).mean().item()


def exit_profile(split, probs: dict, exit_layers: list[int]) -> dict:
    """The depth profile: every exit's standalone accuracy (every question forced to leave there),
    the raw readout's, each exit's agreement (%) with the final layer's answer, and the final
    layer's accuracy."""
    final = probs["final"].argmax(1)
    exits = [{"layer": l, "accuracy": accuracy(split, probs["exits"][k].argmax(1)),
              "raw_accuracy": accuracy(split, probs["raw"][k].argmax(1)),
              "agreement": 100.0 * (probs["exits"][k].argmax(1) == final).float().mean().item()}
             for k, l in enumerate(exit_layers)]
    return {"final": accuracy(split, final), "exits": exits}


def simulate(probs: dict, rule: str, threshold: float, exits: list[int] | None = None) -> dict:
    """Where every question would leave under a rule, evaluating the exits `exits` (indices;
    default all), from the collected probabilities: what early_exit_predict does question by
    question (tested), in one pass instead of one per threshold. Returns exit (n,) in 0..K
    (K = final), pred (n,), evaluated (n,) exits run."""
    K, n = probs["exits"].shape[:2]
    exits = list(range(K)) if exits is None else exits
    exit_at, evaluated = torch.full((n,), K), torch.full((n,), len(exits))
    pred, last, streak = probs["final"].argmax(1), torch.full((n,), -1), torch.zeros(n).long()
    running = torch.ones(n, dtype=torch.bool)
    for j, k in enumerate(exits):
        conf, a = probs["exits"][k].max(dim=1)
        streak, last = torch.where(a == last, streak + 1, 1), a
        fire = running & RULES[rule].fires(conf, probs["exits"][k], streak, threshold)
        exit_at[fire], pred[fire], evaluated[fire] = k, a[fire], j + 1
        running &= ~fire
    return {"exit": exit_at, "pred": pred, "evaluated": evaluated}


# --------------------------------------------------------------------------------------------------
# What early exit saves: the paper's layer view, and seconds measured here
# --------------------------------------------------------------------------------------------------
def layers_run(free, sim: dict) -> torch.Tensor:
    """(n,) float: the language-model layers each question of `sim` runs (its exit's, or L)."""
    return torch.tensor(free.depths())[sim["exit"]].float()


def predicted_speedup(free, sim: dict, costs: dict) -> float:
    """Full-model cost / mean early-exit cost of the questions in `sim` under a cost model
    (util/report.py: seconds measured at batch 1, or FLOPs): embedding + layers + exits evaluated
    (+ the final head)."""
    at_final = (sim["exit"] == free.num_exits).float()
    cost = (costs["embed"] + layers_run(free, sim) * costs["layer"]
            + sim["evaluated"] * costs["exit"] + at_final * costs["head"])
    full = costs["embed"] + free.backbone.depth * costs["layer"] + costs["head"]
    return full / cost.mean().item()


def layer_speedup(free, sim: dict, seq_len: float) -> tuple[float, float]:
    """The paper's view: (mean layers run, L / (layers run + exits evaluated x an exit's cost in
    layer units))."""
    flops = report.flop_costs(free, seq_len)
    return layers_run(free, sim).mean().item(), predicted_speedup(free, sim, flops)


def timing_batches(free, split, ids: torch.Tensor, batch_size: int, tokens_ready: bool = False):
    """The questions `ids` as batches of model inputs on the device. With tokens_ready the
    encoder's tokens are computed beforehand (as a cache of a frozen encoder has them): the
    language model alone is then timed."""
    device = device_of(free)
    inputs = [to_device(split.batch(b, raw_images=True), device)
              for b in torch.split(ids, batch_size)]
    if tokens_ready:
        inputs = [x | {"images": None, "patches": free.backbone.patch_features(x["images"])}
                  for x in inputs]
    return inputs


@torch.inference_mode()
def time_speedup(free, inputs: list[dict], point: dict, repeats: int) -> dict:
    """Seconds of the full model and of early exit at `point` (rule, threshold, exits) over the
    same batches (timing_batches), each run ending when its answers are ready. Interleaved batch by
    batch: each batch runs through both back to back, which goes first alternating, so both see
    the same machine load; a warm-up round, then `repeats` rounds, each summing its batches.
    Returns the medians over rounds and the range of the per-round ratios."""
    device = device_of(free)
    runs = {"full": lambda x: free.backbone(**x).argmax(1),
            "early_exit": lambda x: early_exit_predict(free, x, point["rule"], point["threshold"],
                                                       point.get("exits"))}

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
    return {"full_s": full_s, "early_exit_s": ee_s, "speedup": full_s / ee_s,
            "samples": sum(len(x["tokens"]) for x in inputs),
            "rounds": repeats, "round_speedup_min": min(ratios), "round_speedup_max": max(ratios)}


# --------------------------------------------------------------------------------------------------
# The sweep and the calibrated operating point
# --------------------------------------------------------------------------------------------------
def sweep(free, split, probs: dict, timing_ids, cfg: InferConfig) -> list[dict]:
    """Every rule at every threshold of its grid, every exit evaluated: accuracy, layers run, layer
    speedup and (with timing) the measured batched wall-clock speedup."""
    rows = []
    inputs = timing_batches(free, split, timing_ids, cfg.batch_size) if cfg.timing else None
    for rule, spec in RULES.items():
        for t in spec.grid(free.num_exits):
            sim = simulate(probs, rule, t)
            avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
            row = {"rule": rule, "threshold": t, "accuracy": accuracy(split, sim["pred"]),
                   "avg_layers": avg_layers, "layer_speedup": speedup}
            if cfg.timing:
                point, repeats = {"rule": rule, "threshold": t}, max(1, cfg.repeats // 2)
                row["wallclock_speedup"] = time_speedup(free, inputs, point, repeats)["speedup"]
            rows.append(row)
    return rows


def exit_subsets(K: int) -> list[list[int]]:
    """Every non-empty set of exits, larger sets first (all K first: the paper's setting wins)."""
    subsets = ([k for k in range(K) if mask >> k & 1] for mask in range(1, 2 ** K))
    return sorted(subsets, key=len, reverse=True)


# A calibrated point should keep its promise on new questions, not only on the questions it was
# picked on. Its risk is the mean of a per-question loss in [0, 1] over new questions, and both
# losses bound the accuracy drop from above (a score is in [0, 1], and an answer that does not
# change cannot lose credit):
#   harm:     max(0, score of the full model's answer - score of the early answer)   (reads labels)
#   disagree: 1 if the early answer differs from the full model's, else 0   (CALM's; reads none)
def risk_losses(split, full_pred: torch.Tensor, pred: torch.Tensor, risk: str) -> torch.Tensor:
    """(n,) per-question losses in [0, 1] of early answers `pred` against the full model's."""
    if risk == "disagree":
        return (pred != full_pred).float()                                # reads no label
    every = torch.arange(len(split))
    return (split.score(every, full_pred) - split.score(every, pred)).clamp(min=0.0)


def accuracy_drop(split, full_pred: torch.Tensor, pred: torch.Tensor) -> float:
    """The accuracy lost by answering `pred` instead of the full model's `full_pred`, in [0, 1]."""
    return (accuracy(split, full_pred) - accuracy(split, pred)) / 100


# What is drawn independently is an *image*, not a question: the questions about one scene (four
# on shapes, about five on VQA v2) share it, and are correlated. So the unit of calibration is the
# image: its loss is the mean over its questions, the risk is the mean of that over new images,
# and n is the number of calibration images. (With as many questions on every image, as shapes
# has, that risk is the accuracy drop on new questions; with uneven counts each image weighs the
# same.)
def image_losses(image: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """(n_images,) the mean of per-question `losses` (n,) over each image's questions; image (n,)
    numbers each question's image 0..n_images-1."""
    total = torch.zeros(int(image.max()) + 1).index_add_(0, image, losses)
    count = torch.zeros_like(total).index_add_(0, image, torch.ones_like(losses))
    return total / count


# Learn-then-Test (Angelopoulos et al. 2021), as CALM does for early exit in language models
# (Schuster et al. 2022): for each threshold, from the most conservative to the most aggressive,
# test H0: risk > eps with the Hoeffding-Bentkus p-value of the mean image loss r over n images,
#   p = min(exp(-n h(r, eps)), e P(Binomial(n, eps) <= ceil(n r))),  h(a, b) = KL(Ber(a) || Ber(b))
# (report.hb_pvalue); stop at the first one not rejected at level delta. Every threshold rejected
# before it has risk <= eps with probability >= 1 - delta over the draw of the calibration images
# (testing in a fixed order controls the family-wise error). Searching several sets of exits would
# void that, so each set is tested at delta / (number of sets) (Bonferroni): all certified points
# hold at once with probability >= 1 - delta, and so does the fastest of them, the one chosen.
# The calibration images must have chosen nothing else (data.SPLITS: the `calib` split).
def calibrate(free, calib, calib_probs: dict, costs: dict, promise: InferConfig) -> dict:
    """On the calibration split: the threshold *and the set of exits evaluated* with the highest
    predicted speedup under the cost model `costs` that keeps the promise (promise.rule,
    .max_drop, .calibration, .delta, .risk): certified to risk <= max_drop ('guaranteed', above),
    or with a measured drop <= max_drop ('empirical': the accuracy drop, or for risk 'disagree'
    the share of changed answers; no guarantee). Why the exits too: an exit pays only if enough
    questions leave there, and at batch 1 on a CPU an exit costs about a layer."""
    full_pred, sets = calib_probs["final"].argmax(1), exit_subsets(free.num_exits)
    eps, best = promise.max_drop / 100, None
    _, image = torch.unique(calib.image_index, return_inverse=True)        # (n,) in 0..n_img-1
    n_images = int(image.max()) + 1
    for exits in sets:
        for t in reversed(RULES[promise.rule].grid(len(exits))):      # the most conservative first
            sim = simulate(calib_probs, promise.rule, t, exits)
            losses = risk_losses(calib, full_pred, sim["pred"], promise.risk)
            if promise.calibration == "guaranteed":
                loss = image_losses(image, losses).mean().item()
                p = report.hb_pvalue(loss, n_images, eps)
                if p > promise.delta / len(sets):
                    break                              # a fixed sequence: stop at the first failure
                measured = {"calib_risk": loss, "p_value": p}
            else:
                drop = losses.mean().item()
                if promise.risk != "disagree":
                    drop = accuracy_drop(calib, full_pred, sim["pred"])
                if drop > eps:
                    continue
                measured = {"calib_drop": 100 * drop}
            speedup = predicted_speedup(free, sim, costs)
            if best is None or speedup > best["predicted_speedup"] + 1e-9:
                best = {"threshold": t, "exit_layers": [free.exit_layers[k] for k in exits],
                        "predicted_speedup": speedup, **measured}
    setting = {"rule": promise.rule, "calibration": promise.calibration, "risk": promise.risk,
               "max_drop": promise.max_drop, "delta": promise.delta, "split": promise.calibrate_on,
               "calibration_unit": "image", "calibration_images": n_images,
               "calibration_questions": len(calib),
               "exit_sets": len(sets), "cost_model": costs}
    if best is None or best["predicted_speedup"] <= 1.0:  # none, or none faster than the full model
        return setting | {"threshold": None}
    return setting | best


def exit_indices(free, cal: dict) -> list[int]:
    """The exits a calibrated point evaluates, as indices."""
    return [free.exit_layers.index(l) for l in cal["exit_layers"]]


def calibrated_point(free, split, probs: dict, cal: dict, full_accuracy: float) -> dict:
    """A calibrated point on the eval split: its accuracy and drop, and the layer view."""
    if cal["threshold"] is None:
        return cal
    sim = simulate(probs, cal["rule"], cal["threshold"], exit_indices(free, cal))
    avg_layers, speedup = layer_speedup(free, sim, probs["seq_len"])
    acc = accuracy(split, sim["pred"])
    return cal | {"accuracy": acc, "accuracy_drop": full_accuracy - acc, "avg_layers": avg_layers,
                  "layer_speedup": speedup}


def time_point(free, split, cal: dict, timing_ids: torch.Tensor, cfg: InferConfig) -> dict:
    """The wall-clock speedup of a calibrated point, at batch 1 (half the questions) and batched,
    end to end and for the language model alone (lm_)."""
    point = {"rule": cal["rule"], "threshold": cal["threshold"], "exits": exit_indices(free, cal)}
    half, out = timing_ids[:max(1, len(timing_ids) // 2)], {}
    for ready, prefix in ((False, ""), (True, "lm_")):
        for ids, batch, name in ((half, 1, "batch1"), (timing_ids, cfg.batch_size, "batched")):
            inputs = timing_batches(free, split, ids, batch, ready)
            t = time_speedup(free, inputs, point, cfg.repeats) | {"batch_size": batch}
            out |= {f"{prefix}wallclock_speedup_{name}": t["speedup"], f"{prefix}timing_{name}": t}
    return out


def build_report(free, splits: dict, split_name: str, cfg: InferConfig) -> dict:
    """Everything the report says about one checkpoint on one split, calibrated on the calib
    split (cfg.calibrate_on); run and timed where `free` is, on an inference copy
    (util.runtime.inference_copy)."""
    free = inference_copy(free)
    split, calib = splits[split_name], splits[cfg.calibrate_on]
    probs = collect(free, split, cfg.batch_size)
    calib_probs = collect(free, calib, cfg.batch_size)
    timing_ids = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    timing_ids = timing_ids[:cfg.timing_samples]
    out = {"split": split_name} | describe_depth(free, split, probs, cfg)
    out["sweep"] = sweep(free, split, probs, timing_ids, cfg)
    if cfg.timing:
        costs = report.unit_costs(free, calib, torch.arange(min(32, len(calib))), cfg.repeats)
    else:
        costs = report.flop_costs(free, calib_probs["seq_len"])
    risk = cfg.risk
    # harm where the exits were trained with labels
    if risk == "auto":
        risk = "harm" if free.cfg.label_fraction > 0 else "disagree"
    promise = replace(cfg, risk=risk)
    cal = calibrate(free, calib, calib_probs, costs, promise)
    out["calibrated"] = calibrated_point(free, split, probs, cal, out["full"]["accuracy"])
    if cfg.timing and cal["threshold"] is not None:
        out["calibrated"] |= time_point(free, split, cal, timing_ids, cfg)
    if cfg.calibration == "guaranteed":              # the rule without a guarantee: what it costs
        plain = calibrate(free, calib, calib_probs, costs,
                          replace(promise, calibration="empirical"))
        out["empirical"] = calibrated_point(free, split, probs, plain, out["full"]["accuracy"])
    point = None
    if cal["threshold"] is not None:
        point = simulate(probs, cfg.rule, cal["threshold"], exit_indices(free, cal))
        point["layers"] = layers_run(free, point)
    out["per_family"] = report.per_family_depth(free, split, probs, point)
    return out


def describe_depth(free, split, probs: dict, cfg: InferConfig) -> dict:
    """The report's first part: where it ran, the full model, the depth profile, mid-crisis,
    overthinking and the oracle (util/report.py)."""
    profile = exit_profile(split, probs, free.exit_layers)
    oracle = layer_speedup(free, report.oracle_exits(probs), probs["seq_len"])
    crisis = {"free_exits": report.mid_crisis(profile),
              "raw_readout": report.mid_crisis(profile, "raw_accuracy")}
    return {"samples": len(split), "device": str(device_of(free)),
            "batch_size": cfg.batch_size, "threads": torch.get_num_threads(),
            "full": {"accuracy": profile["final"], "layers": free.backbone.depth},
            "exits": profile["exits"], "mid_crisis": crisis,
            "overthinking": report.overthinking(split, probs),
            "oracle": dict(zip(("avg_layers", "layer_speedup"), oracle))}


# --------------------------------------------------------------------------------------------------
# One question, and the command line
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def read_question(tokenizer, image_path: str, question: str,
                  image_size: int) -> tuple[dict, list[str]]:
    """The model's inputs for --image and --question (image (1, 3, H, W) in [0, 1], tokens and mask
    (1, T)), and notes on what the model will not see as given: words no training question had, a
    question cut to the tokens the model reads, an image unlike the ones it was trained on."""
    if not os.path.isfile(image_path):
        raise DataError(f"--image {image_path}: file not found")
    image = load_image(image_path, image_size).float()[None] / 255.0           # (1, 3, H, W)
    tokens, text_mask = encode_questions(tokenizer, [question])                 # (1, T)
    notes = []
    unseen = unseen_words(tokenizer, question)
    if unseen:
        notes.append(
            f"no training question had the words {', '.join(unseen)}: the answer cannot rest "
            "on what they mean")
    if tokenizer.encode(question).overflowing:
        kept = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True).replace(" ##", "")
        notes.append(
            f"the question is longer than the {tokens.shape[1]} tokens the model reads; it "
            f"reads: \"{kept}\"")
    with Image.open(image_path) as im:
        mode, size = im.mode, im.size
    if mode != "RGB" or size != (image_size, image_size):
        notes.append(
            f"the image is {size[0]} x {size[1]} {mode}; the model sees it as {image_size} x "
            f"{image_size} RGB (it was trained on pictures like those of data.py --scene)")
    return {"images": image, "tokens": tokens, "text_mask": text_mask}, notes


def unseen_words(tokenizer, question: str) -> list[str]:
    """The question's words (once each, punctuation left out) that are no word of the tokenizer's
    vocabulary: the training questions never had them (the tokenizer still splits them into known
    characters, so the model answers regardless)."""
    words = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(question))
    unseen = [
        w for w, _ in words if any(c.isalnum() for c in w) and tokenizer.token_to_id(w) is None
    ]
    return list(dict.fromkeys(unseen))


def answer_one(free, answers: list[str], inputs: dict, rule: str, threshold: float,
               exits: list[int] | None = None) -> dict:
    """Answer one question with early exit (evaluating the exits `exits`, default all): the
    answer, its probability, the exit it left at (K = the final layer) and where that is, in
    words."""
    device = device_of(free)
    out = early_exit_predict(free, to_device(inputs, device), rule, threshold, exits)
    k, L = out["exit"].item(), free.backbone.depth
    where = f"the final layer ({L} of {L})"
    if k < free.num_exits:
        where = f"exit {k + 1} of {free.num_exits} (after layer {free.exit_layers[k]} of {L})"
    return {"answer": answers[out["pred"].item()], "confidence": out["confidence"].item(),
            "exit": k, "where": where}


def report_paths(cfg: InferConfig) -> tuple[str, str]:
    """--json and --plot, or beside the checkpoint: report.json and speedup.png for the test
    split (the names train.py gives the same report), report_SPLIT.json and speedup_SPLIT.png for
    another split."""
    folder = os.path.dirname(os.path.abspath(cfg.ckpt))
    tail = "" if cfg.split == "test" else f"_{cfg.split}"
    return (cfg.json or os.path.join(folder, f"report{tail}.json"),
            cfg.plot or os.path.join(folder, f"speedup{tail}.png"))


def pick_threshold(free, cfg: InferConfig, calibrated: dict) -> tuple[float, list[int] | None, str]:
    """The threshold and exits --image uses, and how they were chosen: --threshold if given; else
    the run's calibrated point for this rule (none evaluated, i.e. the full model, where
    calibration found no point that keeps its promise); else the rule's default."""
    default = RULES[cfg.rule].default
    if cfg.threshold != -1:
        return cfg.threshold, None, f"threshold {cfg.threshold:g}"
    if calibrated.get("rule") == cfg.rule and calibrated.get("threshold") is not None:
        exits = [free.exit_layers.index(l) for l in calibrated["exit_layers"]]
        how = f"calibrated, {calibrated.get('calibration', 'empirical')}"
        return calibrated["threshold"], exits, f"threshold {calibrated['threshold']:g} ({how})"
    if calibrated.get("rule") == cfg.rule:
        return default, [], "no exit: calibration found no point that keeps its promise"
    return default, None, f"threshold {default:g} (the rule's default; not calibrated)"


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
            only = tuple({cfg.calibrate_on, cfg.split})
            splits, _, _ = load_data(dcfg, tokenizer, answers, only=only)
            results = build_report(free, splits, cfg.split, cfg)
            hint = "; choose the files with --json and --plot"
            report.write_report(results, free, *report_paths(cfg), hint)
        else:
            answer_command(free, answers, state, tokenizer, cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def answer_command(free, answers: list[str], state: dict, tokenizer, cfg: InferConfig) -> None:
    """--image and --question: the answer, where it left and how the threshold was chosen
    (--explain: why)."""
    threshold, exits, how = pick_threshold(free, cfg, state.get("calibrated") or {})
    size = state["model_config"]["image_size"]
    inputs, notes = read_question(tokenizer, cfg.image, cfg.question, size)
    out = answer_one(free, answers, inputs, cfg.rule, threshold, exits)
    print(f"answer: {out['answer']}  (confidence {out['confidence']:.3f}; left at {out['where']}; "
          f"rule {cfg.rule}, {how})")
    if cfg.explain:
        print("\n".join(report.explain(free, answers, inputs, cfg.rule, threshold, exits)))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
