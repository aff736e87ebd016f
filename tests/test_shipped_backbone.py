"""The backbone the repo ships (backbones/): it loads with today's model.py and still reaches the accuracy
it was exported with. This fails the day a change to model.py or data.py breaks the file."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import free_min
import train
import infer
from util import report, shapes
from util.checkpoints import build_from_checkpoint, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import probe_tokens  # noqa: E402

SHIPPED = os.path.join(ROOT, train.SHIPPED_BACKBONE)


def test_shipped_backbone_is_small():
    assert os.path.getsize(SHIPPED) <= 10 * 1024 * 1024


# The floors the shipped files are held to, on the whole test split (400 questions a family):
# every family at >= 99.5 % from the final layer, >= 98 % from the last exit (after layer 6), and the hard
# families >= 30 points above the first exit; at the certified point they run >= 1.5 layers deeper than the
# easy ones.
FINAL_FLOOR, LAST_EXIT_FLOOR, DEPTH_GAIN, DEEPER = 99.5, 98.0, 30.0, 1.5
HARD, EASY = ("compare", "relate"), ("exist", "query_color", "query_shape")


def by_family(split, values: torch.Tensor) -> dict:
    """Family -> the mean of per-question `values` over its questions."""
    families = split.families
    return {f: values[[i for i, g in enumerate(families) if g == f]].mean().item() for f in sorted(set(families))}


def test_shipped_backbone_reaches_its_stated_floors_on_a_regenerated_test_split():
    state = load_checkpoint(SHIPPED)
    model, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    assert free is None and "optimizer" not in state                      # a backbone, nothing else
    splits, _, _ = data.load_data(dcfg, tokenizer, answers, only=("test",))  # generated again, from its seed
    res = train.evaluate(model, splits["test"], torch.device("cpu"))
    assert len(res["per_family"]) == 6 and min(res["per_family"].values()) >= FINAL_FLOOR, res["per_family"]


def test_token_probe_reads_colour_and_shape_from_the_shipped_encoder_but_not_from_a_random_one(capsys):
    """experiments/probe_tokens.py ("does the encoder see shapes?"): the trained encoder's
    object tokens say their colour and shape; the same encoder at random init does not say the shape. The
    position probe reads from the visual token under each object its cell of the 8 x 8 grid, finer than
    the token (the token must say where in it the object is: a probe reading any other token is far
    below)."""
    threads = torch.get_num_threads()

    def probe(*flags):
        probe_tokens.main([SHIPPED, "--images", "120", "--threads", "1", *flags])
        out = capsys.readouterr().out
        read = re.findall(r"^(\w+): ([\d.]+) % of object tokens read right", out, flags=re.M)
        read += re.findall(r"^position, (cell) of 8x8: ([\d.]+) % of objects read right", out, flags=re.M)
        assert len(read) == 3, out                                  # colour, shape, position cell: a line each
        return {name: float(acc) for name, acc in read}
    try:
        with torch.random.fork_rng():                             # probe_tokens seeds torch's generator
            trained, random = probe(), probe("--random")
    finally:
        torch.set_num_threads(threads)
    assert trained["colour"] > 95 and trained["shape"] > 95, trained
    assert trained["cell"] > 85, trained
    assert random["shape"] < 60, random


# The same backbone with its FREE exits and their calibrated point, for a demo without training:
# python infer.py --ckpt backbones/shapes-default-free.pt --image ... --question ...
SHIPPED_EXITS = os.path.join(ROOT, "backbones", "shapes-default-free.pt")


def test_shipped_exits_sit_on_the_shipped_backbone_and_carry_a_certified_point():
    state, backbone = load_checkpoint(SHIPPED_EXITS), load_checkpoint(SHIPPED)
    assert os.path.getsize(SHIPPED_EXITS) <= 10 * 1024 * 1024 and "optimizer" not in state
    assert state["model"].keys() == backbone["model"].keys()
    assert all(torch.equal(state["model"][k], backbone["model"][k]) for k in backbone["model"])
    assert state["calibrated"]["calibration"] == "guaranteed" and state["calibrated"]["threshold"] is not None


@pytest.fixture(scope="module")
def shipped_on_test():
    """The shipped exits, the regenerated test split, and every exit's and the final layer's answers on it."""
    state = load_checkpoint(SHIPPED_EXITS)
    _, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    test = data.load_data(dcfg, tokenizer, answers, only=("test",))[0]["test"]
    return state, free, test, infer.collect(free, test, 256)


def test_shipped_exits_reach_their_floors(shipped_on_test):
    """Per family on test: the final layer >= 99.5 %, the last exit >= 98 %, and compare and relate >= 30
    points above the first exit (the depth result, on 400 questions a family)."""
    _, free, test, probs = shipped_on_test
    every = torch.arange(len(test))
    right = lambda p: 100 * test.score(every, p.argmax(1))
    final, first, last = by_family(test, right(probs["final"])), by_family(test, right(probs["exits"][0])), \
        by_family(test, right(probs["exits"][-1]))
    assert free.exit_layers == [1, 2, 4, 6] and len(final) == 6
    assert min(final.values()) >= FINAL_FLOOR, final
    assert min(last.values()) >= LAST_EXIT_FLOOR, last
    for family in HARD:
        assert final[family] - first[family] >= DEPTH_GAIN, (family, first[family], final[family])


def test_at_the_certified_point_the_hard_families_run_deeper(shipped_on_test):
    """The layers each family runs at the shipped certified point: compare and relate >= 1.5 layers deeper
    than every easy family."""
    state, free, test, probs = shipped_on_test
    c = state["calibrated"]
    layers = by_family(test, infer.layers_run(free, infer.simulate(probs, c["rule"], c["threshold"],
                                                                     infer.exit_indices(free, c))))
    assert min(layers[f] for f in HARD) >= max(layers[f] for f in EASY) + DEEPER, layers


def test_later_layers_run_on_fewer_rows(shipped_on_test):
    """early_exit_predict removes the rows that leave: counted at every layer of a batch of 256 test
    questions, the rows never grow, and after the first exit evaluated (layer 2) they are fewer."""
    state, free, test, _ = shipped_on_test
    c, rows, layer = state["calibrated"], [], free.backbone.layer

    def counting(i, h, mask):
        rows.append(len(h))
        return layer(i, h, mask)
    free.backbone.layer = counting                                   # this instance only
    try:
        out = free_min.early_exit_predict(free, test.batch(torch.arange(256)), c["rule"], c["threshold"],
                                          infer.exit_indices(free, c))
    finally:
        del free.backbone.layer
    assert rows[:2] == [256, 256] and rows == sorted(rows, reverse=True), rows
    assert rows[2] < 256 and rows[2] == 256 - int((out["exit"] == 1).sum()), rows
    assert sum(rows) == int(out["layers"].sum())                        # a row's layers, as reported


def test_shipped_exits_keep_their_promise_on_the_test_split():
    """The certified point is at most 1 point below the full model on test."""
    state = load_checkpoint(SHIPPED_EXITS)
    _, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    test = data.load_data(dcfg, tokenizer, answers, only=("test",))[0]["test"]
    c = state["calibrated"]
    exits = infer.exit_indices(free, c)
    full, early = [], []
    with torch.no_grad():
        for ids in data.batches(len(test), 256):
            batch = test.batch(ids)
            out = free_min.early_exit_predict(free, batch, c["rule"], c["threshold"], exits=exits)
            early.append(test.score(ids, out["pred"]))
            full.append(test.score(ids, free.backbone(**batch).argmax(dim=1)))
    full, early = torch.cat(full).mean().item(), torch.cat(early).mean().item()
    assert 100 * (full - early) <= 1.0, (full, early)
    assert 100 * full == pytest.approx(state["test_accuracy"], abs=1.0)


def test_the_report_of_the_shipped_exits_shows_where_depth_matters(tmp_path, capsys):
    """infer.py's report (what --eval prints and writes) on the shipped fp16 exits, on a few hundred
    regenerated questions: it is written, and `compare` and `relate` gain >= 10 points from the first exit to
    the final layer."""
    state = load_checkpoint(SHIPPED_EXITS)
    _, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    small = replace(dcfg, calib_images=60, test_images=60)
    splits = data.load_data(small, tokenizer, answers, only=("calib", "test"))[0]
    cfg = infer.InferConfig(timing=False, max_drop=5)
    r = infer.build_report(free, splits, "test", cfg)
    report.write_report(r, free, str(tmp_path / "report.json"), str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 0 and "per family" in capsys.readouterr().out
    written = json.loads((tmp_path / "report.json").read_text())["per_family"]
    for family in ("compare", "relate"):
        assert written[family]["final"] - written[family]["exits"][0] >= 10, written[family]


def test_a_fresh_clone_answers_with_the_shipped_exits(tmp_path):
    image, _, qas = shapes.make_image_with_questions(np.random.default_rng(3), ["query_color"])
    Image.fromarray(image).save(tmp_path / "scene.png")
    proc = subprocess.run([sys.executable, "infer.py", "--ckpt", SHIPPED_EXITS, "--image", str(tmp_path / "scene.png"),
                           "--question", qas[0][1], "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"answer: {qas[0][2]}" in proc.stdout and "(calibrated, guaranteed)" in proc.stdout, proc.stdout


def test_the_calibrated_point_does_not_read_the_test_labels():
    """The report's point comes from the calib split alone: the same point when the test split's answers are
    shuffled among its questions (while the test accuracy it reports changes)."""
    state = load_checkpoint(SHIPPED_EXITS)
    _, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    splits = data.load_data(replace(dcfg, calib_images=150, test_images=30), tokenizer, answers,
                            only=("calib", "test"))[0]
    cfg = infer.InferConfig(timing=False, max_drop=5)
    honest = infer.build_report(free, splits, "test", cfg)
    test, order = splits["test"], torch.randperm(len(splits["test"]), generator=torch.Generator().manual_seed(0))
    shuffled = replace(test, answer_idx=test.answer_idx[order], answer_score=test.answer_score[order])
    blind = infer.build_report(free, splits | {"test": shuffled}, "test", cfg)
    assert honest["calibrated"]["threshold"] is not None
    for key in ("threshold", "exit_layers", "calib_risk", "p_value", "calibration_images"):
        assert blind["calibrated"][key] == honest["calibrated"][key], key
    assert blind["full"]["accuracy"] < honest["full"]["accuracy"] - 30


@pytest.mark.parametrize("rule, threshold, exits", [("maxprob", None, None), ("patience", 2, None),
                                                    ("entropy", 0.05, [0, 2])])
def test_explain_agrees_with_early_exit_on_every_question(shipped_on_test, rule, threshold, exits):
    """infer.py --explain (report.explain) walks the exits question by question; on 96 test questions it
    names the exit and the answer that early_exit_predict gives each (the shipped certified point, and two
    other rules)."""
    state, free, test, _ = shipped_on_test
    c, answers = state["calibrated"], state["answers"]
    if threshold is None:
        threshold, exits = c["threshold"], infer.exit_indices(free, c)
    ids = torch.arange(96)
    out = free_min.early_exit_predict(free, test.batch(ids), rule, threshold, exits)
    assert len(set(out["exit"].tolist())) >= 2                           # questions leave at different places
    for i in ids.tolist():
        lines = report.explain(free, answers, test.batch(torch.tensor([i])), rule, threshold, exits)
        leaves = [k for k, line in enumerate(lines[1:-1]) if "leaves here" in line]
        k = leaves[0] if leaves else free.num_exits
        line = lines[1 + k] if leaves else lines[-1]
        assert k == out["exit"][i].item(), (i, lines, out["exit"][i])
        assert line.split()[5 if leaves else 2] == answers[out["pred"][i]], (i, line)
