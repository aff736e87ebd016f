"""Stage 2 (train.py) and the evaluation report (infer.py) on a micro backbone trained once."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import infer
import train
import free_min
from free_min import build_from_checkpoint, early_exit_predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--train-images", "120", "--val-images", "20", "--test-images", "20", "--threads", "1"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    # enough epochs that the micro backbone fits its train split: its final layer then depends on the input
    train.main(SMALL + ["--out", str(out), "--stage", "backbone", "--epochs", "15"])
    return out / "ckpt.pt"


def exits_run(backbone, out, *extra):
    train.main(SMALL + ["--out", str(out), "--stage", "exits", "--backbone", str(backbone), "--no-final-eval",
                        "--exit-epochs", "2", *extra])
    return torch.load(out / "ckpt.pt", weights_only=False)


def test_stage2_keeps_backbone_bit_identical_and_stores_exits(backbone, tmp_path):
    before = torch.load(backbone, weights_only=False)["model"]
    state = exits_run(backbone, tmp_path, "--exit-method", "free")
    assert all(torch.equal(before[k], state["model"][k]) for k in before)
    _, free, _, _, _ = build_from_checkpoint(state)
    assert free is not None and free.exit_layers == [2]
    assert state["exit_config"]["exit_method"] == "free"
    assert not any(k.startswith("backbone.") for k in state["exits"])


def test_label_free_training_ignores_labels(backbone, tmp_path, monkeypatch):
    """With --label-fraction 0, scrambling every training label changes nothing in the exits."""
    a = exits_run(backbone, tmp_path / "a", "--label-fraction", "0")
    real_load = data.load_data

    def scrambled(*args, **kw):
        splits, tok, answers = real_load(*args, **kw)
        tr = splits["train"]
        g = torch.Generator().manual_seed(1)
        tr.target_idx = tr.target_idx[torch.randperm(len(tr), generator=g)]
        return splits, tok, answers

    monkeypatch.setattr(train, "load_data", scrambled)
    b = exits_run(backbone, tmp_path / "b", "--label-fraction", "0")
    assert all(torch.equal(a["exits"][k], b["exits"][k]) for k in a["exits"])


def test_ce_needs_labels(backbone, tmp_path):
    with pytest.raises(SystemExit) as e:
        exits_run(backbone, tmp_path, "--exit-method", "ce", "--label-fraction", "0")
    assert e.value.code == 2


@pytest.mark.parametrize("method", ["free", "kd"])
def test_stage2_raises_agreement_with_the_final_layer(backbone, tmp_path, method):
    state = exits_run(backbone, tmp_path, "--exit-method", method, "--label-fraction", "0", "--exit-epochs", "4",
                      "--exit-lr", "2e-3", "--exit-layers", "1")
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    _, free, _, answers, dcfg = build_from_checkpoint(torch.load(backbone, weights_only=False) | {
        "exits": state["exits"], "exit_config": state["exit_config"]})
    splits, _, _ = data.load_data(dcfg, answers=answers)
    # distance of the exit's answer distribution to the final layer's, untrained exit vs trained exit, on val
    fresh = train.FREE(free.backbone, free.cfg).eval()

    def kd_to_final(model):
        with torch.no_grad():
            out = model.all_outputs(**splits["val"].batch(torch.arange(len(splits["val"]))))
        return free_min.distillation_loss(out["exits"][0], out["final"], 1.0).item()

    assert kd_to_final(free) < 0.9 * kd_to_final(fresh)
    assert [r["epoch"] for r in log if r.get("stage") == "exits" and "val_exits" in r] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def report(backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    exits_run(backbone, out)
    path = out / "report.json"
    infer.main(["--ckpt", str(out / "ckpt.pt"), "--eval", "--json", str(path), "--plot", str(out / "plot.png"),
                "--timing-samples", "16", "--repeats", "1", "--threads", "1"])
    return out, json.loads(path.read_text())


def test_report_json_has_the_promised_keys_and_sane_values(report):
    out, r = report
    assert 0 <= r["full"]["accuracy"] <= 100
    assert [e["layer"] for e in r["exits"]] == [2] and all(0 <= e["accuracy"] <= 100 for e in r["exits"])
    for s in r["sweep"]:
        assert set(s) >= {"rule", "threshold", "accuracy", "avg_layers", "layer_speedup", "wallclock_speedup"}
        assert 2 <= s["avg_layers"] <= 4 and s["wallclock_speedup"] > 0 and 0 < s["layer_speedup"] < 4
    cal = r["calibrated"]
    assert set(cal) >= {"rule", "threshold", "accuracy", "accuracy_drop", "layer_speedup", "wallclock_speedup_batch1",
                        "wallclock_speedup_batched"}
    assert {"overthinking", "mid_crisis", "per_family"} <= set(r)
    assert set(r["per_family"]) == set(data.FAMILIES)
    assert (out / "plot.png").stat().st_size > 1000


def test_sweep_simulation_matches_the_real_early_exit_forward(report):
    out, r = report
    state = torch.load(out / "ckpt.pt", weights_only=False)
    _, free, tok, answers, dcfg = build_from_checkpoint(state)
    splits, _, _ = data.load_data(dcfg, tok, answers)
    test = splits["test"]
    probs = infer.collect(free, test, 64)
    for rule, thr in [("maxprob", 0.7), ("entropy", 0.3), ("patience", 1)]:
        sim = infer.simulate(probs, rule, thr)
        real = early_exit_predict(free, **test.batch(torch.arange(len(test))), rule=rule, threshold=thr)
        assert torch.equal(sim["exit"], real["exit"]) and torch.equal(sim["pred"], real["pred"])


def test_one_question_round_trip(report, tmp_path):
    out, _ = report
    rng = np.random.default_rng(5)
    image, objs, qas = data.make_image_with_questions(rng, ["query_color"])
    Image.fromarray(image).save(tmp_path / "img.png")
    proc = subprocess.run([sys.executable, "infer.py", "--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "img.png"),
                           "--question", qas[0][1], "--threshold", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "left at exit 1 of 1 (after layer 2 of 4)" in proc.stdout
    bad = subprocess.run([sys.executable, "infer.py", "--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "nope.png"),
                          "--question", "what?"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.png" in bad.stderr and "Traceback" not in bad.stderr


def test_compare_table_puts_runs_side_by_side(report, tmp_path):
    out, r = report
    test_line = [json.loads(l) for l in open(out / "log.jsonl") if '"split": "test"' in l][-1]
    lines = infer.compare_table([str(out), str(out)]).splitlines()
    assert "exit L2" in lines[0] and "final" in lines[0] and len(lines) == 4
    assert lines[2] == lines[3] and f"| {out} | free | 1 |" in lines[2]
    e = test_line["test_exits"][0]
    assert f"| {e['accuracy']:.1f} ({e['agreement']:.0f}) | {test_line['test_final']:.1f} |" in lines[2]
    if r["calibrated"]["threshold"] is not None:
        assert f"{r['calibrated']['layer_speedup']:.2f}x layers" in lines[2]
    with pytest.raises(data.DataError, match="no exits"):
        infer.compare_table([str(tmp_path)])
