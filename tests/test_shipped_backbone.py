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
import infer
import report
import train
from prepare import build_from_checkpoint
from runtime import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import probe_tokens  # noqa: E402

SHIPPED = os.path.join(ROOT, train.SHIPPED_BACKBONE)


def test_shipped_backbone_is_small():
    assert os.path.getsize(SHIPPED) <= 10 * 1024 * 1024


def test_shipped_backbone_reaches_its_stated_accuracy_on_a_regenerated_test_split():
    state = load_checkpoint(SHIPPED)
    model, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    assert free is None and "optimizer" not in state                      # a backbone, nothing else
    splits, _, _ = data.load_data(dcfg, tokenizer, answers, only=("test",))  # generated again, from its seed
    res = train.evaluate(model, splits["test"], torch.device("cpu"))
    assert res["accuracy"] == pytest.approx(state["test_accuracy"], abs=1.0)
    for family, acc in state["test_per_family"].items():
        assert res["per_family"][family] == pytest.approx(acc, abs=3.0), family


def test_token_probe_reads_colour_and_shape_from_the_shipped_encoder_but_not_from_a_random_one(capsys):
    """experiments/probe_tokens.py (the README's "does the encoder see shapes?" check): the trained encoder's
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


def test_shipped_exits_keep_their_promise_on_the_test_split():
    """The certified point (calibrated on val) is at most 1 point below the full model on test."""
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
    small = replace(dcfg, val_images=60, test_images=60)
    splits = data.load_data(small, tokenizer, answers, only=("val", "test"))[0]
    cfg = infer.InferConfig(timing=False, max_drop=5)
    r = infer.build_report(free, splits, "test", cfg)
    report.write_report(r, free, str(tmp_path / "report.json"), str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 0 and "per family" in capsys.readouterr().out
    written = json.loads((tmp_path / "report.json").read_text())["per_family"]
    for family in ("compare", "relate"):
        assert written[family]["final"] - written[family]["exits"][0] >= 10, written[family]


def test_a_fresh_clone_answers_with_the_shipped_exits(tmp_path):
    image, _, qas = data.make_image_with_questions(np.random.default_rng(3), ["query_color"])
    Image.fromarray(image).save(tmp_path / "scene.png")
    proc = subprocess.run([sys.executable, "infer.py", "--ckpt", SHIPPED_EXITS, "--image", str(tmp_path / "scene.png"),
                           "--question", qas[0][1], "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"answer: {qas[0][2]}" in proc.stdout and "(calibrated, guaranteed)" in proc.stdout, proc.stdout
