"""infer.calibrate: the guaranteed rule (Learn-then-Test) keeps its promise where the risk is known; the
empirical rule does not; the p-value on hand-computed cases; monotone in eps and delta; no label read."""
import math
from fractions import Fraction

import pytest
import torch

import infer
from util import report
from test_exits_and_report import GoldSplit
from test_free_min import make_free

EPS, DELTA = 0.02, 0.1                     # the promise: risk <= 2 % with probability >= 90 %
FLOPS = {"embed": 0.0, "layer": 1.0, "exit": 0.2, "head": 0.0, "unit": "layers"}


def synthetic(n: int, seed: int, changed: float = 0.11):
    """n questions, one exit. The full model answers 0, which is right; the exit is confident c ~ U(0.5, 1)
    and gives another (wrong) answer with probability `changed`, whatever c. So at threshold t the risk (harm
    = disagree = accuracy drop) is changed * P(c >= t) = 0.22 (1 - t): 0.022 > EPS at t = 0.9, 0.011 at 0.95."""
    g = torch.Generator().manual_seed(seed)
    c = 0.5 + 0.5 * torch.rand(n, generator=g)
    wrong = torch.rand(n, generator=g) < changed
    exit_probs = torch.stack([torch.where(wrong, 1 - c, c), torch.where(wrong, c, 1 - c)], dim=1)   # (n, 2)
    final = torch.tensor([[1.0, 0.0]]).expand(n, 2)
    return GoldSplit(torch.zeros(n, dtype=torch.long)), {"exits": exit_probs[None], "final": final}


def true_risk(t: float) -> float:
    return 0.22 * (1 - t)


def test_hb_pvalue_on_hand_computed_cases():
    # no loss in 100 questions, eps 0.05: Hoeffding exp(-100 log(1/0.95)) = 0.95^100 = 0.005921 beats
    # Bentkus e * 0.95^100 = 0.016095
    assert report.hb_pvalue(0.0, 100, 0.05) == pytest.approx(0.95 ** 100, rel=1e-9)
    # 30 losses in 1000, eps 0.05: Hoeffding exp(-1000 (0.03 ln 0.6 + 0.97 ln(0.97/0.95))) = 0.00757; Bentkus
    # e * P(Bin(1000, 0.05) <= 30), the binomial sum computed here with exact integers
    bentkus = math.e * float(Fraction(sum(math.comb(1000, i) * 5 ** i * 95 ** (1000 - i) for i in range(31)), 100 ** 1000))
    hoeffding = math.exp(-1000 * (0.03 * math.log(0.6) + 0.97 * math.log(0.97 / 0.95)))
    assert hoeffding == pytest.approx(0.007570, rel=1e-3) and bentkus < hoeffding
    assert report.hb_pvalue(0.03, 1000, 0.05) == pytest.approx(bentkus, rel=1e-6)
    assert report.hb_pvalue(0.05, 1000, 0.05) == report.hb_pvalue(0.2, 1000, 0.05) == 1.0     # no evidence at all
    assert report.binomial_cdf(3, 10, 0.5) == pytest.approx(176 / 1024, rel=1e-12)


def test_guaranteed_rule_keeps_its_promise_and_the_empirical_rule_does_not():
    """Over 200 draws of 2,000 calibration questions, the threshold each rule picks has true risk > EPS in at
    most DELTA of the draws for the guaranteed rule (it is far below: the bound is conservative), and in
    many of them for the empirical rule, which picks the fastest threshold that merely looked good enough."""
    free = make_free(exit_layers="2")
    violated = {"guaranteed": 0, "empirical": 0}
    for seed in range(200):
        val, probs = synthetic(2000, seed)
        for mode in violated:
            cal = infer.calibrate(free, val, probs, FLOPS, infer.InferConfig(rule="maxprob", max_drop=100 * EPS, calibration=mode, delta=DELTA, risk="harm"))
            violated[mode] += cal["threshold"] is not None and true_risk(cal["threshold"]) > EPS
    assert violated["guaranteed"] / 200 <= DELTA                          # expected about 0: HB is conservative
    assert violated["empirical"] / 200 > 0.15                             # about 30 %: t = 0.9 passes by luck


def test_calibration_is_monotone_in_eps_and_delta():
    """A looser promise (larger eps or delta) never picks a more conservative point."""
    free = make_free(exit_layers="2")
    val, probs = synthetic(2000, seed=7)
    pick = lambda eps, delta: infer.calibrate(free, val, probs, FLOPS, infer.InferConfig(rule="maxprob", max_drop=100 * eps, calibration="guaranteed", delta=delta, risk="harm"))
    by_eps = [pick(eps, DELTA) for eps in (0.005, 0.01, 0.02, 0.04, 0.08)]
    by_delta = [pick(0.08, delta) for delta in (0.001, 0.01, 0.05, 0.1, 0.3)]
    for points in (by_eps, by_delta):
        speed = [1.0 if c["threshold"] is None else c["predicted_speedup"] for c in points]
        assert speed == sorted(speed) and speed[-1] > speed[0], speed


def test_disagree_reads_no_label_and_harm_does():
    """risk 'disagree' calibrates from the model's own answers: a split whose labels cannot be read is no
    obstacle (and scrambled labels change nothing); risk 'harm' and the empirical rule read them."""
    free = make_free(exit_layers="2")
    val, probs = synthetic(2000, seed=3)

    class NoLabels(GoldSplit):
        def score(self, ids, pred):
            raise AssertionError("a label was read")

    blind = infer.calibrate(free, NoLabels(val.gold), probs, FLOPS, infer.InferConfig(rule="maxprob", max_drop=2.0, calibration="guaranteed", delta=DELTA, risk="disagree"))
    assert blind["threshold"] is not None
    assert blind == infer.calibrate(free, GoldSplit(torch.randint(0, 2, (2000,))), probs, FLOPS,
                                    infer.InferConfig(rule="maxprob", max_drop=2.0, calibration="guaranteed", delta=DELTA, risk="disagree"))
    for mode, risk in (("guaranteed", "harm"), ("empirical", "harm")):
        with pytest.raises(AssertionError, match="a label was read"):
            infer.calibrate(free, NoLabels(val.gold), probs, FLOPS, infer.InferConfig(rule="maxprob", max_drop=2.0, calibration=mode, delta=DELTA, risk=risk))


def test_several_exit_sets_share_delta():
    """With two exits (three sets of exits to search) each set is tested at delta / 3. Seed 2 is a draw where
    the Bonferroni branch decides: the one-exit point's p-value lies between delta / 3 and delta, so it is
    certified with one exit and not with two identical ones (testing each set at delta would certify both)."""
    val, probs = synthetic(2000, seed=2)
    one = infer.calibrate(make_free(exit_layers="2"), val, probs, FLOPS, infer.InferConfig(rule="maxprob", max_drop=2.0, calibration="guaranteed", delta=DELTA, risk="harm"))
    two_probs = {"exits": probs["exits"].expand(2, -1, -1), "final": probs["final"]}
    two = infer.calibrate(make_free(exit_layers="2,4"), val, two_probs, FLOPS,
                          infer.InferConfig(rule="maxprob", max_drop=2.0, calibration="guaranteed", delta=DELTA, risk="harm"))
    losses = lambda t: infer.risk_losses(val, probs["final"].argmax(1), infer.simulate(probs, "maxprob", t)["pred"], "harm")
    p = report.hb_pvalue(losses(one["threshold"]).mean().item(), 2000, EPS)
    assert DELTA / 3 < p <= DELTA                                            # the branch is reached
    assert one["threshold"] == 0.95 and two["threshold"] is None and two["exit_sets"] == 3


def test_the_guarantee_counts_images_not_questions():
    """Four questions about one image are one draw, not four. 500 images with four copies of one question each
    certify what 500 single questions certify (n = 500 images), not what 2,000 independent questions do: on this
    draw, counted as questions they would certify threshold 0.9, whose true risk (0.022) breaks the promise."""
    free, cfg = make_free(exit_layers="2"), infer.InferConfig(rule="maxprob", max_drop=2.0, calibration="guaranteed", delta=DELTA, risk="harm")
    single, probs = synthetic(500, seed=8)
    four = lambda t: t.repeat_interleave(4, dim=-2 if t.dim() > 1 else 0)
    grouped = GoldSplit(four(single.gold), torch.arange(500).repeat_interleave(4))
    grouped_probs = {"exits": four(probs["exits"]), "final": four(probs["final"])}
    by_image = infer.calibrate(free, grouped, grouped_probs, FLOPS, cfg)
    assert (by_image["calibration_images"], by_image["calibration_questions"]) == (500, 2000)
    alone = infer.calibrate(free, single, probs, FLOPS, cfg)
    for key in ("threshold", "exit_layers", "calib_risk", "p_value", "calibration_images"):
        assert by_image[key] == pytest.approx(alone[key]), key
    as_questions = infer.calibrate(free, GoldSplit(grouped.gold), grouped_probs, FLOPS, cfg)      # each its own image
    assert by_image["threshold"] == 0.95 and true_risk(0.95) <= EPS
    assert as_questions["threshold"] == 0.9 and true_risk(0.9) > EPS
