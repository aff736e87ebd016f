"""experiments/compare.py: the comparison table, checked by hand on made-up runs."""
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

import data
import free_min

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import compare  # noqa: E402


def fake_run(folder, config: dict, exit_acc: float, agree: float, final: float, calibrated: dict):
    """A finished run folder as compare.py reads it: ckpt.pt (configs), log.jsonl, report.json."""
    folder.mkdir(parents=True)
    torch.save({"model": {}, "model_config": {}, "data_config": {}, "exit_config": asdict(free_min.ExitConfig(**config))},
               folder / "ckpt.pt")
    line = {"stage": "exits", "split": "test", "test_final": final,
            "test_exits": [{"layer": 2, "accuracy": exit_acc, "agreement": agree}]}
    (folder / "log.jsonl").write_text(json.dumps(line) + "\n")
    (folder / "report.json").write_text(json.dumps({"calibrated": {"rule": "maxprob"} | calibrated}))
    return str(folder)


def test_table_averages_seeds_by_hand(tmp_path):
    cal = lambda t, drop, layer: {"threshold": t, "accuracy_drop": drop, "layer_speedup": layer, "exit_layers": [2]}
    runs = [fake_run(tmp_path / "a0", {}, 50.0, 80.0, 60.0, cal(0.9, 0.5, 1.5)),
            fake_run(tmp_path / "kd", {"exit_method": "kd"}, 58.0, 95.0, 60.0, {"threshold": None}),
            fake_run(tmp_path / "a1", {}, 54.0, 90.0, 62.0, cal(0.95, 1.0, 1.7)),
            fake_run(tmp_path / "gan", {"adv_loss": "gan", "label_fraction": 0.1}, 40.0, 70.0, 60.0, cal(0.8, 0.2, 2.0))]
    lines = compare.table(runs).splitlines()
    assert lines[0] == "| method | labels F | n | exit L2 (agree %) | final | calibrated early exit (test) |"
    # two seeds of one setting: mean ± sample std, e.g. std(50, 54) = 2.83, std(1.5, 1.7) = 0.14
    assert lines[2] == "| free | 1 | 2 | 52.0 ± 2.8 (85) | 61.0 ± 1.4 | maxprob 0.9/0.95 (exits 2): drop +0.75 ± 0.35, 1.60 ± 0.14x layers |"
    assert lines[3] == "| kd | 1 | 1 | 58.0 (95) | 60.0 | - |"
    assert lines[4] == "| free (adv_loss=gan) | 0.1 | 1 | 40.0 (70) | 60.0 | maxprob 0.8 (exits 2): drop +0.20, 2.00x layers |"


def test_a_broken_run_is_named(tmp_path):
    folder = fake_run(tmp_path / "run", {}, 50.0, 80.0, 60.0, {"threshold": None})
    (tmp_path / "run" / "report.json").write_text("{truncated")
    with pytest.raises(data.DataError, match="run: not a finished run"):
        compare.table([folder])
    with pytest.raises(data.DataError, match="checkpoint not found"):
        compare.table([str(tmp_path / "nothing")])
