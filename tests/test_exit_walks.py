"""The exit walk exists once, in free_min.early_exit_predict; every other walk of the exits (the
simulation behind the sweep and the calibration, --explain, the batch-1 best case) is held equal to it on
every question of a split, for each rule, on all exits and on a subset."""
import os
import sys

import pytest
import torch

import data
from model import VLM, ModelConfig
from free_min import FREE, RULES, ExitConfig, early_exit_predict
import infer
from util import report

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import batch1_costs  # noqa: E402


@pytest.fixture(scope="module")
def walk():
    """A random 6-layer VLM with four exits (each nudged off the layer it was copied from, so that they
    disagree) and the whole test split of a small shapes set (40 questions)."""
    splits, tok, answers = data.load_data(data.DataConfig(image_size=32, train_images=10, val_images=1,
                                                          test_images=10), only=("train", "test"))
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vit_dim=32, vit_heads=2, dim=32, depth=6, heads=2,
                      max_text_len=24, vocab_size=tok.get_vocab_size(), num_answers=len(answers))
    free = FREE(VLM(cfg=cfg), ExitConfig(exit_layers="1,2,3,4")).eval()
    with torch.no_grad():
        for p in free.exits.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return free, splits["test"], answers


def thresholds(free, split, rule: str, exits) -> float:
    """A threshold at which the questions leave at different places: 2 for patience, else the median of the
    first evaluated exit's measure."""
    if rule == "patience":
        return 2
    probs = infer.collect(free, split, 64)["exits"][0 if exits is None else exits[0]]
    measure = RULES[rule].measure(probs.max(1).values, probs, None)
    return measure.median().item()


CASES = [(rule, exits) for rule in ("maxprob", "entropy", "patience") for exits in (None, [1, 2, 3])]


@pytest.mark.parametrize("rule, exits", CASES)
def test_every_walk_of_the_exits_agrees_with_early_exit_predict(walk, rule, exits):
    free, split, answers = walk
    threshold, ids = thresholds(free, split, rule, exits), torch.arange(len(split))
    with torch.no_grad():
        out = early_exit_predict(free, split.batch(ids), rule, threshold, exits)
    assert len(set(out["exit"].tolist())) >= 2                          # questions leave at different places
    assert torch.equal(out["layers"], torch.tensor(free.depths())[out["exit"]])
    # the simulation (infer.simulate): where each question leaves, its answer, the exits evaluated
    sim = infer.simulate(infer.collect(free, split, 64), rule, threshold, exits)
    assert torch.equal(sim["exit"], out["exit"]) and torch.equal(sim["pred"], out["pred"])
    # --explain (util/report.py), question by question
    for i in ids.tolist():
        lines = report.explain(free, answers, split.batch(torch.tensor([i])), rule, threshold, exits)
        leaves = [k for k, line in enumerate(lines[1:-1]) if "leaves here" in line]
        k = leaves[0] if leaves else free.num_exits
        line = lines[1 + k] if leaves else lines[-1]
        assert k == out["exit"][i].item(), (i, lines)
        assert line.split()[5 if leaves else 2] == answers[out["pred"][i]], (i, line)


@pytest.mark.parametrize("exits", [None, [1, 2, 3]])
def test_the_batch1_best_case_runs_what_early_exit_ran(walk, exits, monkeypatch):
    """experiments/batch1_costs.py's known_exits, told where each question leaves, runs the layers and
    evaluates the exits early_exit_predict ran for it at batch 1, in the same order, on every question."""
    free, split, _ = walk
    calls, layer, exit_logits = [], free.backbone.layer, free.exit_logits
    monkeypatch.setattr(free.backbone, "layer", lambda i, *a: calls.append(("layer", i)) or layer(i, *a))
    monkeypatch.setattr(free, "exit_logits", lambda k, *a: calls.append(("exit", k)) or exit_logits(k, *a))
    threshold = thresholds(free, split, "maxprob", exits)
    with torch.no_grad():
        for i in range(len(split)):
            x = split.batch(torch.tensor([i]))
            calls.clear()
            k = int(early_exit_predict(free, x, "maxprob", threshold, exits)["exit"])
            done = list(calls)
            calls.clear()
            batch1_costs.known_exits(free, x, exits if exits is not None else list(range(4)), k)
            assert calls == done, i
