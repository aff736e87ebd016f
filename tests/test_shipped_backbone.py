"""The backbone the repo ships (backbones/): it loads with today's model.py and still reaches the accuracy
it was exported with. This fails the day a change to model.py or data.py breaks the file."""
import os
import subprocess
import sys

import pytest
import torch

import data
import train
from free_min import build_from_checkpoint, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, train.SHIPPED_BACKBONE)


def test_shipped_backbone_is_small():
    assert os.path.getsize(SHIPPED) <= 10 * 1024 * 1024


def test_shipped_backbone_reaches_its_stated_accuracy_on_a_regenerated_test_split():
    state = load_checkpoint(SHIPPED)
    model, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    assert free is None and "optimizer" not in state                      # a backbone, nothing else
    splits, _, _ = data.load_data(dcfg, tokenizer, answers, only=("test",))  # generated again, from its seed
    res = train.evaluate(model, splits["test"], torch.device("cpu"), torch.float32)
    assert res["accuracy"] == pytest.approx(state["test_accuracy"], abs=1.0)
    for family, acc in state["test_per_family"].items():
        assert res["per_family"][family] == pytest.approx(acc, abs=3.0), family


def test_token_probe_reads_colour_and_shape_from_the_shipped_encoder_but_not_from_a_random_one():
    """experiments/probe_tokens.py (the README's "does the encoder see shapes?" check): the trained encoder's
    object tokens say their colour and shape; the same encoder at random init does not say the shape."""
    def probe(*flags):
        out = subprocess.run([sys.executable, "experiments/probe_tokens.py", SHIPPED, "--images", "120", "--threads", "1",
                              *flags], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
        return {line.split(":")[0]: float(line.split(":")[1].split("%")[0]) for line in out.splitlines()}
    trained, random = probe(), probe("--random")
    assert trained["colour"] > 95 and trained["shape"] > 95, trained
    assert random["shape"] < 60, random
