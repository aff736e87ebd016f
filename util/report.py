"""The report's parts beside the early-exit measurement in infer.py, and what train.py prints.

  * cost models: FLOPs of a layer and of an exit (the paper's layer view), and the seconds each
    part of an early-exit forward takes here at batch 1 (what calibration weighs exit sets by);
  * the paper's analyses of depth: mid-crisis, overthinking, depth per question family, and the
    oracle (every question leaves at the first exit that agrees with the final layer);
  * the statistics behind the guarantee (Hoeffding-Bentkus p-values for Learn-then-Test);
  * the report printed and its figure; one question explained exit by exit; train.py's progress.

Public: unit_costs, flop_costs, layer_costs, oracle_exits, mid_crisis, overthinking,
per_family_depth, hb_pvalue, binomial_cdf, explain, print_report, plot_report.
"""

import math
import os
import statistics
import time
from collections import defaultdict

import torch

from free_min import RULES
from util.checkpoints import log_json, save_atomic
from util.config import ConfigError
from util.runtime import device_of, synchronize, to_device


# --------------------------------------------------------------------------------------------------
# What early exit costs: FLOPs, and seconds measured here
# --------------------------------------------------------------------------------------------------
def layer_costs(free, seq_len: float) -> tuple[float, float]:
    """FLOPs per question of one language-model layer and of one exit (G_k on the [CLS] row: q, k
    and v for every token, the rest for one row; then the head), for seq_len tokens.
    Multiply-adds count 2; norms, softmaxes and activations are left out."""
    D, A, S = free.backbone.cfg.dim, free.backbone.cfg.num_answers, seq_len
    layer = 2 * (S * D * 3 * D + 2 * S * S * D + S * D * D + 2 * S * D * 4 * D)
    exit_ = 2 * (S * D * 3 * D + 2 * S * D + D * D + 2 * D * 4 * D + D * A)
    return layer, exit_


def flop_costs(free, seq_len: float) -> dict:
    """The paper's view as a cost model: a layer costs 1, an exit its FLOPs in layer units, the rest
    nothing."""
    layer_flops, exit_flops = layer_costs(free, seq_len)
    return {"embed": 0.0, "layer": 1.0, "exit": exit_flops / layer_flops, "head": 0.0,
            "unit": "layers (FLOPs)"}


@torch.inference_mode()
def unit_costs(free, split, ids: torch.Tensor, repeats: int) -> dict:
    """Measured seconds at batch 1 on the model's device of what an early-exit forward is made
    of: the embedding (image encoder, merge, text), one language-model layer, one exit evaluation
    (G_k, head, the rule's softmax) and the final head. Medians over the questions `ids` x
    repeats (after a warm-up round)."""
    device, bb, times = device_of(free), free.backbone, defaultdict(list)

    def timed(name, fn, *args):
        synchronize(device)
        start = time.perf_counter()
        out = fn(*args)
        synchronize(device)
        times[name].append(time.perf_counter() - start)
        return out

    inputs = [
        to_device(split.batch(torch.tensor([i]), raw_images=True), device) for i in ids.tolist()
    ]
    after = free.exits_after()                                           # layer -> exit k
    for r in range(repeats + 1):
        for x in inputs:
            h, mask = timed("embed", bb.embed, x["images"], x["tokens"], x["text_mask"])
            for i in range(bb.depth):
                h = timed("layer", bb.layer, i, h, mask)
                if i + 1 in after:
                    k = after[i + 1]
                    timed("exit", lambda: free.exit_logits(k, h, mask).float().softmax(1).max(1))
            timed("head", lambda: bb.head(h[:, 0]).float().softmax(1).max(1))
        if r == 0:
            times.clear()                                                 # the first round warms up
    medians = {name: statistics.median(v) for name, v in times.items()}
    return medians | {"unit": "seconds at batch 1"}


def oracle_exits(probs: dict) -> dict:
    """Every question leaves at the earliest exit that already gives the final layer's answer
    (else at the final layer): the layers a rule could save *keeping every answer of the full
    model*, a reference point. A rule that changes answers (any real one does) can save more or
    less than this. Keys as infer.simulate()'s."""
    K = probs["exits"].shape[0]
    pred = probs["final"].argmax(1)                                                    # (n,)
    agree = probs["exits"].argmax(2) == pred[None]                                     # (K, n)
    exit_at = torch.where(agree.any(0), agree.float().argmax(0), torch.full_like(pred, K))
    return {"exit": exit_at, "pred": pred, "evaluated": torch.clamp(exit_at + 1, max=K)}


# --------------------------------------------------------------------------------------------------
# The paper's analyses of depth: mid-crisis and overthinking
# --------------------------------------------------------------------------------------------------
def mid_crisis(profile: dict, key: str = "accuracy") -> dict:
    """The largest drop of accuracy from a shallower exit to a deeper one (the final layer
    included)."""
    points = [(e["layer"], e[key]) for e in profile["exits"]] + [("final", profile["final"])]
    best = {"drop": 0.0, "from_layer": None, "to_layer": None}
    for i, (la, a) in enumerate(points):
        for lb, b in points[i + 1:]:
            if a - b > best["drop"]:
                best = {"drop": a - b, "from_layer": la, "to_layer": lb}
    return best


def overthinking(split, probs: dict) -> dict:
    """Right = full official credit. 'fixable': some exit is right but the final layer wrong
    (later layers undid or never found it). 'early_right': of the questions the final layer gets
    right, those already right at an exit before it (the layers after it were wasted compute)."""
    every = torch.arange(len(split))
    final_right = split.score(every, probs["final"].argmax(1)) >= 1.0                         # (n,)
    # (K, n)
    exit_right = torch.stack([split.score(every, p.argmax(1)) >= 1.0 for p in probs["exits"]])
    early_right = (exit_right.any(0) & final_right).sum().item()
    final_right_n = max(1, final_right.sum().item())
    return {
        "fixable_pct": 100.0 * (exit_right.any(0) & ~final_right).float().mean().item(),
        "early_right_pct_of_final_right": 100.0 * early_right / final_right_n,
    }


def per_family_depth(free, split, probs: dict, sim: dict | None) -> dict:
    """Where depth matters, per question family: every exit's standalone accuracy and the final
    layer's ('exits', 'final'), and where a calibrated point `sim` is given (with the 'layers'
    each question runs, infer.layers_run), their mean, its accuracy and the share leaving at each
    exit."""
    out = {}
    for fam in sorted(set(split.families)):
        idx = torch.tensor([i for i, f in enumerate(split.families) if f == fam])

        def acc(pred):
            return 100.0 * split.score(idx, pred[idx]).mean().item()
        out[fam] = {"exits": [acc(p.argmax(1)) for p in probs["exits"]],
                    "final": acc(probs["final"].argmax(1))}
        if sim is None:
            continue
        shares = torch.bincount(sim["exit"][idx], minlength=free.num_exits + 1).float() / len(idx)
        where = free.exit_layers + ["final"]
        out[fam] |= {"avg_layers": sim["layers"][idx].mean().item(),
                     "accuracy": acc(sim["pred"]),
                     "exit_share": {str(l): 100.0 * s.item() for l, s in zip(where, shares)}}
    return out


# --------------------------------------------------------------------------------------------------
# The guarantee's statistics (Learn-then-Test, infer.calibrate)
# --------------------------------------------------------------------------------------------------
def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p) for i in range(0, min(k, n) + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def hb_pvalue(risk_hat: float, n: int, eps: float) -> float:
    """p-value of H0: risk > eps, from the mean risk_hat of n i.i.d. losses in [0, 1]
    (Hoeffding-Bentkus, Bates et al. 2021):
        min(exp(-n h(risk_hat, eps)), e P(Binomial(n, eps) <= ceil(n risk_hat))),
    with h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)); 1 where risk_hat >= eps."""
    if risk_hat >= eps:
        return 1.0
    h = (1 - risk_hat) * math.log((1 - risk_hat) / (1 - eps))
    if risk_hat > 0:
        h += risk_hat * math.log(risk_hat / eps)
    bentkus = math.e * binomial_cdf(math.ceil(n * risk_hat - 1e-9), n, eps)
    return min(1.0, math.exp(-n * h), bentkus)


def images_to_certify(eps: float, delta: float) -> int:
    """The fewest calibration images with which even a point that changes no answer (risk 0 on
    all of them) is certified to risk <= eps at level delta: below it, Learn-then-Test can
    certify nothing."""
    n = 1
    while hb_pvalue(0.0, n, eps) > delta:
        n *= 2
    low, high = n // 2, n
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if hb_pvalue(0.0, mid, eps) > delta else (low, mid)
    return high


# --------------------------------------------------------------------------------------------------
# The report, printed
# --------------------------------------------------------------------------------------------------
def points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def promise_text(c: dict) -> str:
    """What a calibrated point promises, in words."""
    changed = "share of answers that differ from the full model's"
    where = f"{c['calibration_images']} calibration images ({c['calibration_questions']} questions"
    where += ", a split that chose nothing else)" if c.get("split") == "calib" else ", val's)"
    if c["calibration"] == "empirical":
        measured = "accuracy drop" if c["risk"] == "harm" else changed
        return f"no guarantee: the {measured} on the {where} was <= {points(c['max_drop'])}"
    what = ("the accuracy drop" if c["risk"] == "harm"
            else f"the {changed} (and so the accuracy drop)")
    return (
        f"with probability >= {100 * (1 - c['delta']):g} % over the draw of the {where}, {what} "
        f"on new images from this distribution (each image's questions averaged) is <= "
        f"{points(c['max_drop'])}")


def write_report(r: dict, free, json_path: str, plot_path: str, hint: str = "") -> None:
    """Print the report and write its JSON and figure (ConfigError naming the file, and `hint`,
    if it cannot)."""
    print_report(r, free)
    try:
        save_atomic(json_path, r)
        plot_report(r, plot_path)
    except OSError as e:
        raise ConfigError(f"cannot write the report ({e.strerror}: {e.filename}){hint}")
    print(f"wrote {os.path.relpath(json_path)} and {os.path.relpath(plot_path)}")


def print_report(r: dict, free) -> None:
    """The whole report: the depth profile, mid-crisis and overthinking, the sweep, the oracle, the
    calibrated point and the per-family table."""
    depth = free.backbone.depth
    print(f"\n== early-exit report on {r['split']} ({r['samples']} questions; measured on"
          f" {r['device']}, {r['threads']} torch threads) ==")
    print(f"full model accuracy: {r['full']['accuracy']:.2f}%  ({depth} language-model layers)")
    print("depth profile (every question forced to leave at the exit):")
    for e in r["exits"]:
        print(
            f"  after layer {e['layer']:>2}: FREE exit {e['accuracy']:6.2f}%   raw readout (no G_k)"
            f" {e['raw_accuracy']:6.2f}%")
    mc, o = r["mid_crisis"], r["overthinking"]
    print(f"mid-crisis (largest accuracy drop shallower -> deeper): FREE exits "
          f"{mc['free_exits']['drop']:.2f} pts, raw readout {mc['raw_readout']['drop']:.2f} pts")
    print(f"overthinking: {o['fixable_pct']:.2f}% of questions are right at some exit but wrong at"
          f" the final layer; {o['early_right_pct_of_final_right']:.1f}% of those the final layer"
          " gets right were already right at an exit")
    print_sweep(r, depth)
    print(
        "oracle (every question leaves at the earliest exit that gives the final layer's answer): "
        f"{r['oracle']['avg_layers']:.2f} layers, layer speedup {r['oracle']['layer_speedup']:.2f}x"
    )
    print(format_calibrated(r["calibrated"], r.get("empirical")))
    print_per_family(r)


def print_sweep(r: dict, depth: int) -> None:
    """The sweep's table, and what its clock column is worth here."""
    timed = "wallclock_speedup" in r["sweep"][0]
    clock = (f"; clock x: measured wall-clock speedup, batches of {r['batch_size']})" if timed
             else ")")
    print("sweep, every exit evaluated (layers: language-model layers run, on average; layer x: "
          f"the paper's view, {depth} / (layers run + exits evaluated x an exit's cost in layers)"
          + clock)
    print(f"{'rule':<9}{'thr':>7}{'acc %':>8}{'layers':>8}{'layer x':>9}"
          + (f"{'clock x':>9}" if timed else ""))
    for s in r["sweep"]:
        row = (f"{s['rule']:<9}{s['threshold']:>7g}{s['accuracy']:>8.2f}{s['avg_layers']:>8.2f}"
               f"{s['layer_speedup']:>9.2f}")
        print(row + (f"{s['wallclock_speedup']:>9.2f}" if timed else ""))
    if timed:
        print(timing_noise(r["sweep"], depth))


def timing_noise(sweep: list[dict], depth: int) -> str:
    """What the clock column is worth here: where no question leaves early, early exit does the full
    model's work, so its speedup there is timing noise alone."""
    idle = [s["wallclock_speedup"] for s in sweep if s["avg_layers"] >= depth - 1e-9]
    if not idle:
        return (
            "(every threshold lets some question leave early, so the noise of the clock column is "
            "not seen here)")
    spread = f"{min(idle):.2f}-{max(idle):.2f}x"
    far_from_one = abs(math.log(max(idle))) > 0.2 or abs(math.log(min(idle))) > 0.2
    if max(idle) / min(idle) > 1.25 or far_from_one:
        return (f"warning: where no question leaves early the clock reads {spread} (it should read "
                f"1.00x): timing is noisy here (other work on this machine, or too few "
                f"--timing-samples); trust the layer column")
    return f"where no question leaves early the clock reads {spread} (1.00x would be no noise)"


def print_per_family(r: dict) -> None:
    """The per-family table: accuracy at every exit and at the final layer; at the calibrated
    point, the mean layers run, the accuracy and where the questions leave."""
    layers = [e["layer"] for e in r["exits"]]
    point = "at the calibrated point"
    if r["calibrated"]["threshold"] is None:
        point = "no calibrated point, so its columns stay empty"
    print(f"per family (accuracy % with every question leaving at the exit; {point}):")
    print(f"  {'family':<13}" + "".join(f"{'L' + str(l):>7}" for l in layers)
          + f"{'final':>7}  | {'layers':>6} {'acc':>6}  leave at")
    for fam, d in r["per_family"].items():
        row = f"  {fam:<13}" + "".join(f"{a:>7.1f}" for a in d["exits"]) + f"{d['final']:>7.1f}  |"
        if "avg_layers" in d:
            shares = " ".join(f"{k}:{v:.0f}%" for k, v in d["exit_share"].items())
            row += f" {d['avg_layers']:>6.2f} {d['accuracy']:>6.1f}  {shares}"
        print(row)


def format_calibrated(c: dict, plain: dict | None = None) -> str:
    """The calibrated point, its promise and (plain: the empirical rule's point) what the promise
    costs."""
    if c["threshold"] is None:
        return no_point(c)
    line = (
        f"calibrated on {c.get('split', 'calib')} ({c['calibration']}, risk {c['risk']}; "
        f"{c['rule']} threshold "
        f"{c['threshold']:g}, exits after layers {','.join(map(str, c['exit_layers']))}): accuracy "
        f"{c['accuracy']:.2f}% (drop {c['accuracy_drop']:+.2f} pts), {c['avg_layers']:.2f} layers, "
        f"layer speedup {c['layer_speedup']:.2f}x\n  promise: {promise_text(c)}")
    costs = c["cost_model"]
    if costs["unit"].startswith("seconds"):
        line += (
            "\n  chosen by the costs measured here at batch 1: embedding "
            f"{1e3 * costs['embed']:.2f} ms, a layer {1e3 * costs['layer']:.2f} ms, an exit "
            f"{1e3 * costs['exit']:.2f} ms, the final head {1e3 * costs['head']:.2f} ms (predicted "
            f"speedup {c['predicted_speedup']:.2f}x)")
    if "wallclock_speedup_batch1" in c:
        line += "\n  " + format_wallclock(c)
    if plain is not None and plain["threshold"] is not None:
        line += (
            f"\n  without the guarantee (empirical rule): {plain['rule']} threshold"
            f" {plain['threshold']:g}, exits after layers"
            f" {','.join(map(str, plain['exit_layers']))}: drop {plain['accuracy_drop']:+.2f} pts,"
            f" layer speedup {plain['layer_speedup']:.2f}x, predicted"
            f" {plain['predicted_speedup']:.2f}x (the guarantee's price:"
            f" {plain['predicted_speedup'] / c['predicted_speedup']:.2f}x of predicted speed)")
    return line


def no_point(c: dict) -> str:
    """Why there is no calibrated point, and what would give one."""
    line = (
        f"calibrated ({c['calibration']}, {c['risk']}): no threshold {c['rule']} keeps the promise"
        f" on the {c.get('split', 'calib')} images")
    need = images_to_certify(c["max_drop"] / 100, c["delta"] / c.get("exit_sets", 1))
    if c["calibration"] == "guaranteed" and c["calibration_images"] < need:
        line += (
            f": with {c['calibration_images']} calibration images not even a point that "
            f"changes no answer can be certified to a drop <= {points(c['max_drop'])} (that takes "
            f"{need}; more calibration images, or a larger --max-drop)")
    return line + "; every question runs the full model"


def format_wallclock(c: dict) -> str:
    """The calibrated point's measured speedups, end to end and for the language model alone."""
    def spread(t):
        return f" (rounds {t['round_speedup_min']:.2f}-{t['round_speedup_max']:.2f})"

    return (
        f"wall-clock speedup end to end: {c['wallclock_speedup_batch1']:.2f}x at batch 1"
        f"{spread(c['timing_batch1'])}, {c['wallclock_speedup_batched']:.2f}x at batch "
        f"{c['timing_batched']['batch_size']}{spread(c['timing_batched'])}; language model only "
        f"(image tokens computed beforehand): {c['lm_wallclock_speedup_batch1']:.2f}x at batch 1, "
        f"{c['lm_wallclock_speedup_batched']:.2f}x batched")


# --------------------------------------------------------------------------------------------------
# The report's figure
# --------------------------------------------------------------------------------------------------
def plot_report(r: dict, path: str) -> None:
    """Accuracy vs speedup per rule (the calibrated point and the promised limit marked), exit
    accuracy vs depth, and the same per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
    layers = [e["layer"] for e in r["exits"]]
    plot_sweep(ax1, r)
    plot_depth_profile(ax2, r, layers)
    plot_per_family(ax3, r, layers)
    for ax in (ax2, ax3):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(ax, r: dict) -> None:
    """Accuracy against speedup for every rule: measured if timed, else the layer view."""
    timed = "wallclock_speedup" in r["sweep"][0]
    key = "wallclock_speedup" if timed else "layer_speedup"
    for rule in dict.fromkeys(s["rule"] for s in r["sweep"]):
        rows = sorted((s for s in r["sweep"] if s["rule"] == rule), key=lambda s: s[key])
        ax.plot([s[key] for s in rows], [s["accuracy"] for s in rows], "o-", ms=3, label=rule)
    full, c = r["full"]["accuracy"], r["calibrated"]
    ax.plot([1.0], [full], "ks", label="full model")
    ax.axhline(
        full - c["max_drop"],
        color="grey",
        ls="--",
        lw=1,
        label=f"the {points(c['max_drop'])} limit",
    )
    if c["threshold"] is not None:
        speedup = c["wallclock_speedup_batched" if timed else "layer_speedup"]
        ax.plot([speedup], [c["accuracy"]], "r*", ms=14, label=f"calibrated ({c['rule']})")
    accuracies = [s["accuracy"] for s in r["sweep"]]
    ax.set_ylim(min(min(accuracies), full - 5) - 1, max(full, max(accuracies)) + 1)
    xlabel = "layer speedup"
    if timed:
        xlabel = f"wall-clock speedup (batches of {r.get('batch_size', '?')}, {r['device']})"
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", title="accuracy vs speedup")
    ax.legend(fontsize=8, loc="lower left")


def plot_depth_profile(ax, r: dict, layers: list[int]) -> None:
    """Every exit's accuracy, beside the raw readout of its layer and the final layer's."""
    full = r["full"]["accuracy"]
    ax.plot(layers, [e["accuracy"] for e in r["exits"]], "o-", label="FREE exits")
    ax.plot(layers, [e["raw_accuracy"] for e in r["exits"]], "x--",
            label="raw readout (no exit layer)")
    ax.axhline(full, color="k", ls=":", label="final layer")
    shown = [full] + [e[k] for e in r["exits"] for k in ("accuracy", "raw_accuracy")]
    middle, half = (max(shown) + min(shown)) / 2, max(6.0, (max(shown) - min(shown)) / 2 + 2)
    ax.set_ylim(middle - half, middle + half)        # at least 12 points: rounding noise stays flat
    ax.set(xlabel="language-model layer", ylabel="accuracy (%)", title="depth profile")
    ax.legend(fontsize=8, loc="lower right")


def plot_per_family(ax, r: dict, layers: list[int]) -> None:
    """Per family: accuracy at each exit and the final layer (lines), and the calibrated point's
    mean layers run and accuracy (a star on the family's line colour): where depth matters and
    who goes deep."""
    depth = r["full"].get("layers", layers[-1] + 2)
    starred = False
    for fam, d in r["per_family"].items():
        line, = ax.plot(layers + [depth], d["exits"] + [d["final"]], "o-", ms=3, label=fam)
        if "avg_layers" in d:
            ax.plot([d["avg_layers"]], [d["accuracy"]], "*", ms=12, color=line.get_color())
            starred = True
    stars = " (stars: the calibrated point's mean layers run)" if starred else ""
    ax.set(
        xlabel="language-model layer" + stars,
        ylabel="accuracy (%)",
        title="per family: where depth matters",
    )
    ax.legend(fontsize=7, loc="lower right")


# --------------------------------------------------------------------------------------------------
# train.py's progress, printed and logged (OUT/log.jsonl)
# --------------------------------------------------------------------------------------------------
def log_backbone_epoch(tcfg, record: dict, sums: list[float], val: dict) -> None:
    """After a stage-1 epoch: its training loss and accuracy (sums: loss, score, questions over
    every process) and the val accuracy per family (train.evaluate), printed and logged with
    `record` (epoch, step, time, family weights)."""
    loss_sum, hit_sum, seen = sums
    print(f"epoch {record['epoch']}/{tcfg.epochs}  loss {loss_sum / seen:.3f}  train acc "
          f"{100 * hit_sum / seen:.1f}%  val acc {val['accuracy']:.1f}%  ({record['time_s']:.0f}s)")
    log_json(tcfg.out, {"stage": "backbone"} | record | {
        "train_loss": loss_sum / seen, "time_s": round(record["time_s"], 1),
        "train_accuracy": 100 * hit_sum / seen, "val_accuracy": val["accuracy"],
        "val_per_family": val["per_family"]})


def log_test(out: str, res: dict, baseline: dict) -> None:
    """Stage 1's test accuracy per family (train.evaluate), beside each family's majority
    answer's."""
    print(f"test accuracy (official VQA metric): {res['accuracy']:.1f}% "
          f" ({len(res['pred'])} questions)")
    for fam, acc in res["per_family"].items():
        print(f"  {fam:<14} {acc:5.1f}%   (majority answer: {baseline[fam]:5.1f}%)")
    log_json(out, {"stage": "backbone", "split": "test", "test_accuracy": res["accuracy"],
                   "test_per_family": res["per_family"], "majority_baseline": baseline})


def log_exit_epoch(out: str, ecfg, epoch: str, means: dict, profile: dict) -> None:
    """After a stage-2 epoch: its mean losses (and 'seconds') and every exit's val accuracy
    (profile: infer.exit_profile), printed and logged."""
    means = dict(means)
    seconds = means.pop("seconds")
    by_exit = " ".join(f"L{e['layer']}:{e['accuracy']:.1f}" for e in profile["exits"])
    losses = "  ".join(f"{k} {v:.3f}" for k, v in means.items())
    print(
        f"exits epoch {epoch}  {losses}  val acc by exit: {by_exit}  final:{profile['final']:.1f}  "
        f"({seconds:.0f}s)")
    log_json(out, {"stage": "exits", "method": ecfg.exit_method, "epoch": int(epoch.split("/")[0]),
                   **means, "val_final": profile["final"], "val_exits": profile["exits"]})


def log_exit_test(out: str, ecfg, profile: dict) -> None:
    """After stage 2: the exits' test depth profile (infer.exit_profile), printed and logged."""
    print_depth_profile(profile, "test")
    log_json(out, {"stage": "exits", "split": "test", "method": ecfg.exit_method,
                   "label_fraction": ecfg.label_fraction, "test_final": profile["final"],
                   "test_exits": profile["exits"]})


def print_depth_profile(profile: dict, split_name: str) -> None:
    """Each exit's standalone accuracy next to the final layer's: where mid-crisis and overthinking
    show."""
    print(f"depth profile on {split_name} (every question forced to leave at that exit):")
    for e in profile["exits"]:
        print(f"  exit after layer {e['layer']:>2}: {e['accuracy']:5.1f}%   agrees with the final"
              f" layer {e['agreement']:5.1f}%")
    print(f"  final layer         : {profile['final']:5.1f}%")


# --------------------------------------------------------------------------------------------------
# One question, exit by exit (infer.py --explain)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def explain(free, answers: list[str], inputs: dict, rule: str, threshold: float,
            exits: list[int] | None) -> list[str]:
    """Why the question left where it did, exit by exit: each exit's answer and the rule's
    measure against the threshold, whether this operating point evaluates that exit, and the
    final layer's."""
    device, spec = device_of(free), RULES[rule]
    out = free.all_outputs(**to_device(inputs, device))
    sign = ">=" if spec.high else "<="
    lines = [
        f"exit by exit (rule {rule}: a question leaves at the first exit where {spec.what} {sign} "
        f"{threshold:g}):"
    ]
    last, streak, left = None, torch.zeros(1), False
    for k, logits in enumerate(out["exits"]):
        name = f"  exit {k + 1} (after layer {free.exit_layers[k]}):"
        probs = logits.float().softmax(dim=1)                                  # (1, A)
        conf, pred = probs.max(dim=1)
        if exits is not None and k not in exits:
            lines.append(
                f"{name:<26} {answers[pred.item()]:<10} not evaluated at this operating point")
            continue
        streak = torch.ones(1) if last is None or pred != last else streak + 1
        last, measure = pred, spec.measure(conf, probs, streak).item()
        fires = bool(spec.fires(conf, probs, streak, threshold))
        verdict = ("(not run: the question had left)" if left
                   else "leaves here" if fires else "goes on")
        mark = sign if fires else {">=": "<", "<=": ">"}[sign]
        lines.append(
            f"{name:<26} {answers[pred.item()]:<10} {measure:.3f} {mark} {threshold:g}  {verdict}")
        left = left or fires
    conf, pred = out["final"].float().softmax(dim=1).max(dim=1)
    lines.append(f"  {'final layer:':<24} {answers[pred.item()]:<10} {conf.item():.3f}"
                 + ("" if left else "  answers (no exit fired)"))
    return lines
