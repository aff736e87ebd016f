"""The backbone the repo ships (backbones/): it loads with today's model.py and still reaches the accuracy
it was exported with. This fails the day a change to model.py or data.py breaks the file."""
import os

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
    res = train.evaluate(model, splits["test"], torch.device("cpu"), torch.float32, 256)
    assert res["accuracy"] == pytest.approx(state["test_accuracy"], abs=1.0)
    for family, acc in state["test_per_family"].items():
        assert res["per_family"][family] == pytest.approx(acc, abs=3.0), family
