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
import free_min
from free_min import early_exit_predict
import train
import infer
from util import checkpoints, runtime, shapes
from util.checkpoints import build_from_checkpoint
from util.report import explain, flop_costs, layer_costs, mid_crisis, overthinking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (--scene-workers 0: each epoch's scenes drawn in the test's own process, not a second interpreter's;
# test_devices.py covers the drawing processes)
SMALL = ["--preset", "tiny", "--train-images", "120", "--val-images", "20", "--test-images", "20", "--calib-images", "20",
         "--threads", "1", "--scene-workers", "0"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    # enough epochs that the micro backbone's final layer depends on the input (6: the tests that need it pass)
    train.main(SMALL + ["--out", str(out), "--stage", "backbone", "--epochs", "6"])
    return out / "ckpt.pt"


def exits_run(backbone, out, *extra):
    """Stage 2 on the micro backbone; one exit, after layer 2, unless `extra` names the exits."""
    layers = [] if "--exit-layers" in extra else ["--exit-layers", "2"]
    train.main(SMALL + ["--out", str(out), "--stage", "exits", "--backbone", str(backbone), "--no-final-eval",
                        "--exit-epochs", "2", *layers, *extra])
    return torch.load(out / "ckpt.pt", weights_only=False)


def test_stage2_keeps_backbone_bit_identical_and_stores_exits(backbone, tmp_path):
    before = torch.load(backbone, weights_only=False)["model"]
    train.main(SMALL + ["--out", str(tmp_path), "--stage", "exits", "--backbone", str(backbone), "--no-final-eval",
                        "--exit-epochs", "1", "--exit-method", "free"])           # the default exits
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert all(torch.equal(before[k], state["model"][k]) for k in before)
    _, free, _, _, _ = build_from_checkpoint(state)
    assert free is not None and free.exit_layers == [1, 2]  # 4 layers: layer 1 and every second one before the last
    assert state["exit_config"]["exit_layers"] == "1,2"      # written out, so a later default cannot misread it
    assert state["exit_config"]["exit_method"] == "free"
    assert not any(k.startswith("backbone.") for k in state["exits"])


def scrambled_loader(monkeypatch, rows):
    """Make the run's load_data (data.load_data) shuffle the training targets of the train-split questions `rows` among
    themselves (every other question keeps its own)."""
    real_load = data.load_data

    def load(*args, **kw):
        splits, tok, answers = real_load(*args, **kw)
        tr, idx = splits["train"], rows(len(splits["train"]))
        perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(1))]
        for name in ("answer_idx", "answer_score"):
            t = getattr(tr, name).clone()
            t[idx] = getattr(tr, name)[perm]
            setattr(tr, name, t)
        assert not torch.equal(tr.answer_idx, real_load(*args, **kw)[0]["train"].answer_idx)
        return splits, tok, answers
    monkeypatch.setattr(train, "load_data", load)


def same_exits(a, b) -> bool:
    return all(torch.equal(a["exits"][k], b["exits"][k]) for k in a["exits"])


@pytest.mark.parametrize("method, fraction", [("free", 0.0), ("kd", 1.0)])
def test_label_free_methods_never_read_a_label(backbone, tmp_path, monkeypatch, method, fraction):
    """free at F = 0 and kd at any F: scrambling every training label changes nothing in the exits."""
    args = ["--exit-method", method, "--label-fraction", str(fraction), "--exit-epochs", "1"]
    a = exits_run(backbone, tmp_path / "a", *args)
    scrambled_loader(monkeypatch, lambda n: torch.arange(n))
    assert same_exits(a, exits_run(backbone, tmp_path / "b", *args))


def test_label_fraction_selects_round_f_n_fixed_questions():
    for n, f in [(1000, 0.1), (999, 0.01), (37, 0.5), (10, 0.0), (10, 1.0)]:
        mask = train.labelled_mask(n, f, seed=0)
        assert mask.sum().item() == round(f * n)
        assert torch.equal(mask, train.labelled_mask(n, f, seed=0))                   # fixed for a seed
    assert not torch.equal(train.labelled_mask(1000, 0.1, 0), train.labelled_mask(1000, 0.1, 1))
    assert (train.labelled_mask(1000, 0.1, 0) <= train.labelled_mask(1000, 0.2, 0)).all()  # nested as F grows


@pytest.mark.parametrize("method", ["free", "ce"])
def test_cross_entropy_reads_only_the_labelled_fraction(backbone, tmp_path, monkeypatch, method):
    """At 0 < F < 1 the exits depend on the labels of the round(F n) labelled questions and on no other."""
    args = ["--exit-method", method, "--label-fraction", "0.25", "--exit-epochs", "1"]
    a = exits_run(backbone, tmp_path / "a", *args)
    labelled = lambda n: torch.nonzero(train.labelled_mask(n, 0.25, seed=0)).squeeze(1)
    unlabelled = lambda n: torch.nonzero(~train.labelled_mask(n, 0.25, seed=0)).squeeze(1)
    with monkeypatch.context() as m:
        scrambled_loader(m, unlabelled)
        assert same_exits(a, exits_run(backbone, tmp_path / "b", *args))
    scrambled_loader(monkeypatch, labelled)
    assert not same_exits(a, exits_run(backbone, tmp_path / "c", *args))


def test_stage2_checkpoint_holds_only_its_own_run(backbone, tmp_path):
    """Nothing of another run leaks in: not the backbone run's calibrated threshold, probe, optimizer or
    training config (only the backbone weights, what rebuilds them, and where they came from)."""
    foreign = torch.load(backbone, weights_only=False) | {"calibrated": {"rule": "maxprob", "threshold": 0.123}}
    torch.save(foreign, tmp_path / "foreign.pt")
    state = exits_run(tmp_path / "foreign.pt", tmp_path / "run", "--batch-size", "16")
    assert set(state) == {"model", "model_config", "data_config", "answers", "tokenizer", "backbone_source", "exits",
                          "exit_config", "train_config", "test_accuracy", "test_per_family"}
    assert state["test_accuracy"] == foreign["test_accuracy"]         # the backbone's, carried along
    assert state["train_config"]["batch_size"] == 16 and state["train_config"]["stage"] == "exits"
    assert state["backbone_source"] == {"path": str(tmp_path / "foreign.pt"), "train_config": foreign["train_config"]}
    assert not (tmp_path / "run" / "report.json").exists()


def test_stage2_resumes_after_a_crash_and_matches_an_uninterrupted_run(backbone, tmp_path, monkeypatch):
    args = ["--exit-method", "free", "--exit-epochs", "3"]
    full = exits_run(backbone, tmp_path / "full", *args)
    real_save = checkpoints.save_atomic

    def save_then_crash(path, state):
        real_save(path, state)
        if state["exit_progress"]["epoch"] == 1:
            raise KeyboardInterrupt                          # dies right after stage-2 epoch 2 was saved
    monkeypatch.setattr(checkpoints, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        exits_run(backbone, tmp_path / "cut", *args)
    monkeypatch.setattr(checkpoints, "save_atomic", real_save)
    assert "exit_progress" in torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    resumed = exits_run(backbone, tmp_path / "cut", *args, "--resume")
    assert same_exits(full, resumed) and "exit_progress" not in resumed
    epochs = [r["epoch"] for r in map(json.loads, open(tmp_path / "cut" / "log.jsonl")) if "val_exits" in r]
    assert epochs == [1, 2, 3]
    with pytest.raises(SystemExit) as e:                     # now finished: nothing left to resume
        exits_run(backbone, tmp_path / "cut", *args, "--resume")
    assert e.value.code == 2


def test_fp16_stage2_goes_through_the_grad_scaler_outside_autocast(backbone, tmp_path, monkeypatch):
    """The path of a GPU without bf16 (fp16 autocast + grad scaler), run on the CPU, which supports both:
    every optimizer step goes through the scaler, and backward/step run outside autocast."""
    monkeypatch.setattr(runtime, "pick_dtype", lambda device: (torch.float16, "fp16 (test)"))
    monkeypatch.setitem(runtime.RUN, "dtype", torch.float32)                # restored after the test
    steps = []
    real_step = torch.amp.GradScaler.step

    def step(self, optimizer, *args, **kw):
        assert self.is_enabled() and not torch.is_autocast_enabled("cpu")
        steps.append(optimizer)
        return real_step(self, optimizer, *args, **kw)
    monkeypatch.setattr(torch.amp.GradScaler, "step", step)
    state = exits_run(backbone, tmp_path, "--exit-method", "free", "--exit-epochs", "1")
    assert len(steps) == 2 * 15 and len({id(o) for o in steps}) == 2      # D and G step on each of 15 batches
    assert all(torch.isfinite(v).all() for v in state["exits"].values())


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
                "--timing-samples", "16", "--repeats", "1", "--threads", "1", "--max-drop", "50", "--rule", "patience"])
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
    assert cal["exit_layers"] == [2] and {"embed", "layer", "exit", "head"} <= set(cal["cost_model"])
    assert (cal["calibration"], cal["risk"], cal["max_drop"], cal["delta"]) == ("guaranteed", "harm", 50.0, 0.1)
    assert cal["p_value"] <= 0.1 and r["empirical"]["calibration"] == "empirical"
    assert all(cal["cost_model"][k] > 0 for k in ("embed", "layer", "exit", "head"))   # measured seconds
    assert {"overthinking", "mid_crisis", "per_family"} <= set(r)
    assert set(r["per_family"]) == set(data.FAMILIES)
    for fam, d in r["per_family"].items():                          # accuracy at every exit, the calibrated depth
        assert len(d["exits"]) == 1 and 0 <= d["final"] <= 100 and 2 <= d["avg_layers"] <= 4, (fam, d)
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
        real = early_exit_predict(free, test.batch(torch.arange(len(test))), rule=rule, threshold=thr)
        assert torch.equal(sim["exit"], real["exit"]) and torch.equal(sim["pred"], real["pred"])


def test_timing_interleaves_full_and_early_exit_batch_by_batch(report, monkeypatch):
    """Every batch runs through both models back to back, who goes first alternating, in the warm-up and
    in each of the `repeats` rounds; the spread of the per-round ratios is reported."""
    out, _ = report
    _, free, tok, answers, dcfg = build_from_checkpoint(torch.load(out / "ckpt.pt", weights_only=False))
    test = data.load_data(dcfg, tok, answers, only=("test",))[0]["test"]
    calls, real_early, real_full = [], infer.early_exit_predict, type(free.backbone).forward
    monkeypatch.setattr(infer, "early_exit_predict", lambda *a, **kw: calls.append(("early", len(a[1]["tokens"]))) or real_early(*a, **kw))
    monkeypatch.setattr(type(free.backbone), "forward",
                        lambda self, *a, **kw: calls.append(("full", len(kw["tokens"]))) or real_full(self, *a, **kw))
    t = infer.time_speedup(free, infer.timing_batches(free, test, torch.arange(10), 4), {"rule": "maxprob", "threshold": 0.5},
                           repeats=3)
    assert len(calls) == 2 * 3 * (1 + 3)                     # 2 models x 3 batches (4, 4, 2) x (warm-up + 3 rounds)
    pairs = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert all({p[0][0], p[1][0]} == {"full", "early"} and p[0][1] == p[1][1] for p in pairs)   # same batch, both models
    assert [p[0][0] for p in pairs[:4]] == ["full", "early", "full", "full"]     # alternating, per batch and per round
    assert [p[0][1] for p in pairs[:3]] == [4, 4, 2]
    assert t["rounds"] == 3 and 0 < t["round_speedup_min"] <= t["round_speedup_max"] and t["samples"] == 10


def test_one_question_round_trip(report, tmp_path):
    out, _ = report
    rng = np.random.default_rng(5)
    image, objs, qas = shapes.make_image_with_questions(rng, ["query_color"])
    Image.fromarray(image).save(tmp_path / "img.png")
    proc = subprocess.run([sys.executable, "infer.py", "--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "img.png"),
                           "--question", qas[0][1], "--threshold", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "left at exit 1 of 1 (after layer 2 of 4)" in proc.stdout


def test_a_missing_image_is_one_line_and_exit_2(report, tmp_path, capsys):
    out, _ = report
    with pytest.raises(SystemExit) as e:
        infer.main(["--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "nope.png"), "--question", "what?"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: --image {tmp_path / 'nope.png'}: file not found\n", err


def test_explain_shows_every_exit_against_its_threshold(report, tmp_path, capsys):
    """--explain: one line per exit with its answer and the rule's measure against the threshold, the exit
    the question left at marked as the answer line says, and the final layer's answer."""
    out, _ = report
    image, _, qas = shapes.make_image_with_questions(np.random.default_rng(5), ["query_color"])
    Image.fromarray(image).save(tmp_path / "img.png")
    for threshold, leaves in (("0", True), ("1", False)):
        capsys.readouterr()
        infer.main(["--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "img.png"), "--question", qas[0][1],
                    "--threshold", threshold, "--explain", "--threads", "1"])
        lines = capsys.readouterr().out.splitlines()
        exit_line = next(l for l in lines if l.strip().startswith("exit 1 (after layer 2)"))
        assert ("leaves here" in exit_line) == leaves and ("goes on" in exit_line) == (not leaves), lines
        assert (">= " + threshold if leaves else "< " + threshold) in exit_line
        assert any(l.strip().startswith("final layer:") for l in lines)
        assert ("left at exit 1 of 1" in lines[0]) == leaves, lines[0]
    capsys.readouterr()
    infer.main(["--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "img.png"), "--question", qas[0][1],
                "--rule", "entropy", "--threshold", "0.5", "--explain", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "entropy / log A <= 0.5" in printed


def test_explain_marks_the_exits_an_operating_point_skips():
    """At a point that evaluates exit 2 alone, exit 1 is shown with its answer but 'not evaluated'; at a
    point that evaluates none (calibration found none), the final layer answers."""
    free = tiny_free()
    inputs = {"images": torch.rand(1, 3, 32, 32), "tokens": torch.tensor([[2, 5, 3]]),
              "text_mask": torch.ones(1, 3, dtype=torch.bool)}
    answers = [f"a{i}" for i in range(free.backbone.cfg.num_answers)]
    lines = explain(free, answers, inputs, "maxprob", 0.0, [1])
    assert "not evaluated" in lines[1] and "leaves here" in lines[2] and lines[-1].strip().startswith("final layer:")
    lines = explain(free, answers, inputs, "maxprob", 0.0, [])
    assert all("not evaluated" in line for line in lines[1:3]) and "answers (no exit fired)" in lines[-1]


def test_an_image_unlike_the_training_ones_gets_a_note(report, tmp_path, capsys):
    out, _ = report
    Image.fromarray(np.full((100, 150), 128, dtype=np.uint8)).save(tmp_path / "grey.png")      # grayscale, 150 x 100
    infer.main(["--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "grey.png"), "--question", "what color is the circle?",
                "--threads", "1"])
    assert "note: the image is 150 x 100 L; the model sees it as 64 x 64 RGB" in capsys.readouterr().out


def test_notes_name_unseen_words_once_and_a_cut_question(report, tmp_path, capsys):
    """Words no training question had are named once each, punctuation left out; a question longer than
    the model reads is said to be cut, with what it reads."""
    out, _ = report
    image, _, _ = shapes.make_image_with_questions(np.random.default_rng(5), ["query_color"])
    Image.fromarray(image).save(tmp_path / "img.png")
    question = "zzz, and zzz and " + "what color is the circle " * 6 + "?"
    infer.main(["--ckpt", str(out / "ckpt.pt"), "--image", str(tmp_path / "img.png"), "--question", question,
                "--threads", "1"])
    printed = capsys.readouterr().out
    assert "no training question had the words zzz, and:" in printed
    assert "longer than the 24 tokens the model reads" in printed


def test_eval_writes_its_report_beside_the_checkpoint(report, tmp_path):
    out, _ = report
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((out / "ckpt.pt").read_bytes())
    infer.main(["--ckpt", str(ckpt), "--eval", "--no-timing", "--threads", "1", "--rule", "patience"])
    assert json.loads((tmp_path / "report.json").read_text())["split"] == "test"
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_without_ckpt_the_run_in_out_or_else_the_shipped_exits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoints.default_checkpoint() == checkpoints.SHIPPED_EXITS and os.path.isfile(checkpoints.SHIPPED_EXITS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"")
    assert checkpoints.default_checkpoint() == "out/ckpt.pt"


# ---------------------------------------------------------------- the analyses, on hand-made inputs
class GoldSplit:
    """A stand-in split whose questions have one right answer each: score 1 if pred == gold, else 0; each
    question about an image of its own, unless `image_index` says which image each is about."""

    def __init__(self, gold, image_index=None):
        self.gold = torch.as_tensor(gold)
        self.image_index = torch.arange(len(self.gold)) if image_index is None else torch.as_tensor(image_index)

    def __len__(self):
        return len(self.gold)

    def score(self, ids, pred):
        return (self.gold[ids] == pred).float()


def hand_made_probs():
    """4 questions, 3 answers, exits after layers 2 and 4 of 6; the final layer is right on every question.
    Exit confidences (right/wrong): q0 .95 R then 1.0 R; q1 .6 W then .8 R; q2 1.0 R at both; q3 .7 W then .55 R."""
    e0 = torch.tensor([[.95, .05, 0], [.6, .4, 0], [0, 0, 1], [.2, .7, .1]])
    e1 = torch.tensor([[1, 0, 0], [0, .8, .2], [0, 0, 1], [.55, .45, 0]])
    final = torch.eye(3)[[0, 1, 2, 0]]
    return GoldSplit([0, 1, 2, 0]), {"exits": torch.stack([e0, e1]), "final": final, "raw": torch.stack([e0, e1]),
                                     "seq_len": 10.0}


def tiny_free():
    from test_free_min import make_free
    return make_free(exit_layers="2,4")        # D = 32, A = 6, mlp hidden 128, depth 6


def test_layer_costs_by_hand():
    layer, exit_ = layer_costs(tiny_free(), seq_len=10)
    # layer: 2 x (qkv 10*32*96 + scores and mix 2*10*10*32 + proj 10*32*32 + MLP 2*10*32*128)
    assert layer == 2 * (30720 + 6400 + 10240 + 81920)
    # exit ([CLS] row only): 2 x (qkv 10*32*96 + scores and mix 2*10*32 + proj 32*32 + MLP 2*32*128 + head 32*6)
    assert exit_ == 2 * (30720 + 640 + 1024 + 8192 + 192)


def test_simulate_calibrate_and_layer_speedup_by_hand():
    free, (val, probs) = tiny_free(), hand_made_probs()
    sim = infer.simulate(probs, "maxprob", 0.8)
    assert sim["exit"].tolist() == [0, 1, 0, 2] and sim["pred"].tolist() == [0, 1, 2, 0]
    assert sim["evaluated"].tolist() == [1, 2, 1, 2]
    e = layer_costs(free, 10.0)[1] / layer_costs(free, 10.0)[0]
    avg_layers, speedup = infer.layer_speedup(free, sim, 10.0)
    assert avg_layers == pytest.approx((2 + 4 + 2 + 6) / 4)
    assert speedup == pytest.approx(6 / ((14 + 6 * e) / 4))
    # thresholds 0.5-0.6 let q1 and q3 leave wrong at layer 2 (50 %), 0.7 lets q3 (75 %); from 0.8 on all are
    # right, and 0.8 is the cheapest of those: 14 layers in all (0.85-0.95: 16; 0.98 and up: 18)
    assert infer.accuracy(val, infer.simulate(probs, "maxprob", 0.6)["pred"]) == 50.0
    assert infer.accuracy(val, infer.simulate(probs, "maxprob", 0.7)["pred"]) == 75.0
    flops = flop_costs(free, 10.0)
    assert flops["exit"] == pytest.approx(e) and infer.predicted_speedup(free, sim, flops) == pytest.approx(speedup)
    cal = infer.calibrate(free, val, probs, flops, infer.InferConfig(rule="maxprob", max_drop=1.0, calibration="empirical", risk="harm"))
    assert (cal["threshold"], cal["exit_layers"], cal["calib_drop"]) == (0.8, [2, 4], 0.0)
    assert infer.calibrate(free, val, probs, flops, infer.InferConfig(rule="maxprob", max_drop=30.0, calibration="empirical", risk="harm"))["threshold"] == 0.7
    # 0.5 and 0.6 let the same questions leave: of equal points the more conservative threshold is kept
    assert infer.calibrate(free, val, probs, flops, infer.InferConfig(rule="maxprob", max_drop=50.0, calibration="empirical", risk="harm"))["threshold"] == 0.6
    # Exit choice. Only the exit after layer 2 at 0.8: q1 and q3 run to the final layer (right): 16 layers, 4
    # exits evaluated, against 14 layers and 6 exits with both. At a FLOP exit cost (0.24 layer) both exits
    # are cheaper; if an exit costs 1.5 layers (as measured costs can say), the exit after layer 4 does not pay.
    assert infer.predicted_speedup(free, infer.simulate(probs, "maxprob", 0.8, [0]), flops) == pytest.approx(6 / ((16 + 4 * e) / 4))
    dear = {"embed": 0.0, "layer": 1.0, "exit": 1.5, "head": 0.0, "unit": "seconds at batch 1"}
    cal = infer.calibrate(free, val, probs, dear, infer.InferConfig(rule="maxprob", max_drop=1.0, calibration="empirical", risk="harm"))
    # (with that exit alone, 0.8 to 0.95 let the same questions leave: the most conservative is kept)
    assert (cal["threshold"], cal["exit_layers"]) == (0.95, [2]) and cal["predicted_speedup"] == pytest.approx(6 / ((16 + 6) / 4))
    assert infer.simulate(probs, "maxprob", 0.8, [0])["evaluated"].tolist() == [1, 1, 1, 1]


def test_overthinking_by_hand():
    val, probs = hand_made_probs()
    probs["final"] = torch.eye(3)[[0, 0, 1, 0]]          # the final layer now gets q1 and q2 wrong
    o = overthinking(val, probs)
    # q1 and q2 are right at an exit but wrong at the end; of the two the final layer gets right (q0, q3),
    # both were right at an exit before it
    assert o["fixable_pct"] == 50.0 and o["early_right_pct_of_final_right"] == 100.0


def test_mid_crisis_by_hand():
    profile = {"exits": [{"layer": 2, "accuracy": 50.0, "raw_accuracy": 30.0}, {"layer": 4, "accuracy": 42.0, "raw_accuracy": 35.0},
                         {"layer": 6, "accuracy": 47.0, "raw_accuracy": 40.0}], "final": 49.0}
    assert mid_crisis(profile) == {"drop": 8.0, "from_layer": 2, "to_layer": 4}
    assert mid_crisis(profile, "raw_accuracy") == {"drop": 0.0, "from_layer": None, "to_layer": None}
    profile["final"] = 40.0
    assert mid_crisis(profile) == {"drop": 10.0, "from_layer": 2, "to_layer": "final"}


def test_infer_errors_are_one_line(backbone, tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ckpt.pt").write_bytes(b"not a checkpoint")
    cases = [(["--ckpt", str(backbone), "--eval"], "has a backbone but no exits"),
             (["--ckpt", str(tmp_path / "nope.pt"), "--eval"], "nope.pt: checkpoint not found"),
             (["--ckpt", str(backbone), "--eval", "--threshold", "5"], "--threshold 5: maxprob takes a number from 0 to 1"),
             (["--ckpt", str(backbone), "--eval", "--rule", "patience", "--threshold", "1.5"], "patience takes a whole number"),
             (["--ckpt", str(backbone)], "nothing to do"),
             (["--ckpt", str(backbone), "--eval", "--delta", "0"], "--delta must be a probability in (0, 1)"),
             (["--ckpt", str(backbone), "--eval", "--delta", "1.5"], "--delta must be a probability in (0, 1)"),
             (["--ckpt", str(backbone), "--eval", "--max-drop", "0"], "--max-drop in (0, 100)"),
             (["--ckpt", str(backbone), "--eval", "--risk", "loss"], "invalid choice: 'loss'"),
             (["--ckpt", str(backbone), "--eval", "--calibration", "lucky"], "invalid choice: 'lucky'"),
             (["--ckpt", str(tmp_path / "broken" / "ckpt.pt"), "--eval"], "--ckpt"),
             (["--ckpt", str(backbone), "--eval", "--threshold", "-3"], "--threshold -3"),
             (["--ckpt", str(backbone), "--image", "x.png"], "--image needs a question"),
             (["--ckpt", str(backbone), "--image", "x.png", "--question", " "], "--image needs a question"),
             (["--ckpt", str(backbone), "--question", "what?"], "--question needs --image"),
             (["--ckpt", str(backbone), "--eval", "--image", "x.png", "--question", "what?"], "give one of them"),
             (["--ckpt", str(backbone), "--eval", "--explain"], "--explain goes with --image")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            infer.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, (args, err)


def test_data_command_line_exits_2_on_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["--write", str(tmp_path), "--train-images", "0"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --train-images must be at least 1 (got 0)\n"


def test_frozen_states_are_the_live_states_and_train_the_same_exits(backbone):
    """Stage 2's states, computed once per question (fp16): the exit reads them as it reads a live batch (its
    [CLS] output within fp16 rounding), batch by batch with the unused columns cut, and h_L is the live one."""
    model, _, tok, answers, dcfg = build_from_checkpoint(torch.load(backbone, weights_only=False))
    free = train.FREE(model, train.ExitConfig(exit_layers="1,2")).eval()
    split = data.load_data(dcfg, tok, answers, only=("train", "val"))[0]["train"]
    states = train.frozen_states(free, split)
    ids = torch.tensor([3, 0, 17, 42, 5])
    cached = train.states_batch(states, ids, torch.device("cpu"))
    live = train.live_states(free, split, ids, torch.device("cpu"))     # what stage 2 reads without a cache
    assert torch.allclose(cached["real"], live["real"], atol=1e-5)
    for k in range(free.num_exits):
        assert torch.allclose(free.exit_feature(k, cached["inputs"][k], cached["mask"]),
                              free.exit_feature(k, live["inputs"][k], live["mask"]), rtol=5e-3, atol=5e-3)


def test_stage2_without_room_for_the_cache_computes_the_states_batch_by_batch(backbone, tmp_path, monkeypatch, capsys):
    """Where the frozen states would pass STATE_CACHE_GB of host memory (base: 10 GB), stage 2 keeps none and runs
    the frozen backbone on every batch: it says so, and trains exits as good as the cached run's."""
    cached = exits_run(backbone, tmp_path / "cached", "--exit-epochs", "1")
    monkeypatch.setattr(train, "STATE_CACHE_GB", 0.0)
    capsys.readouterr()
    live = exits_run(backbone, tmp_path / "live", "--exit-epochs", "1")
    assert "computed batch by batch instead" in capsys.readouterr().out
    a, b = (log for log in (json.loads(l) for name in ("cached", "live")
                           for l in open(tmp_path / name / "log.jsonl")) if "test_exits" in log)
    assert abs(a["test_exits"][0]["accuracy"] - b["test_exits"][0]["accuracy"]) <= 5.0
    assert all(torch.equal(cached["model"][k], live["model"][k]) for k in cached["model"])


def test_empirical_calibration_is_one_flag_away_and_picks_without_a_test(report, tmp_path):
    """--calibration empirical: the old rule (the fastest point within --max-drop on val, no p-value), and the
    report then holds no second point to compare with."""
    out, r = report
    path = tmp_path / "empirical.json"
    infer.main(["--ckpt", str(out / "ckpt.pt"), "--eval", "--no-timing", "--json", str(path), "--max-drop", "50",
                "--calibration", "empirical", "--threads", "1", "--rule", "patience"])
    plain = json.loads(path.read_text())
    assert plain["calibrated"]["calibration"] == "empirical" and "p_value" not in plain["calibrated"]
    assert "empirical" not in plain and plain["calibrated"]["calib_drop"] <= 50
    assert plain["calibrated"]["threshold"] == r["empirical"]["threshold"]     # the comparison point of the default


def test_a_label_free_run_is_calibrated_without_reading_a_label(backbone, tmp_path, monkeypatch):
    """Exits trained with --label-fraction 0 are calibrated with risk 'disagree' by default, and the report
    reads no label of the calibration split (only the eval split's, to report accuracy)."""
    exits_run(backbone, tmp_path, "--exit-method", "free", "--label-fraction", "0", "--exit-epochs", "1")
    _, free, tok, answers, dcfg = build_from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    splits, _, _ = data.load_data(dcfg, tok, answers, only=("calib", "test"))
    monkeypatch.setattr(splits["calib"], "score", lambda *a: pytest.fail("a calibration label was read"))
    r = infer.build_report(free, splits, "test", infer.InferConfig(timing=False, max_drop=50, rule="patience"))
    assert r["calibrated"]["risk"] == r["empirical"]["risk"] == "disagree" and r["calibrated"]["threshold"] is not None
    assert infer.build_report(free, splits | {"calib": splits["test"]}, "test", infer.InferConfig(
        timing=False, max_drop=50, rule="patience", risk="harm"))["calibrated"]["risk"] == "harm"   # --risk harm


@pytest.fixture(scope="module")
def finished(backbone, tmp_path_factory):
    """Stage 2 run to its end: the final evaluation, its report, and --export."""
    out = tmp_path_factory.mktemp("finished")
    train.main(SMALL + ["--out", str(out / "run"), "--stage", "exits", "--backbone", str(backbone), "--exit-epochs",
                        "1", "--exit-layers", "2", "--final-eval", "--export", str(out / "shipped.pt")])
    return out


def test_image_answers_with_the_stored_calibrated_point_or_the_full_model(finished):
    """The training run's report stores its calibrated (guaranteed) point in the checkpoint, and infer.py
    --image uses it; where calibration found none, the full model answers (no exit), never an uncalibrated
    threshold; --threshold overrides both."""
    state = torch.load(finished / "run" / "ckpt.pt", weights_only=False)
    report = json.loads((finished / "run" / "report.json").read_text())
    stored, free, cfg = state["calibrated"], build_from_checkpoint(state)[1], infer.InferConfig()
    assert stored == {k: report["calibrated"].get(k) for k in stored} and stored["calibration"] == "guaranteed"
    found = stored | {"threshold": 0.7, "exit_layers": [2]}
    assert infer.pick_threshold(free, cfg, found)[:2] == (0.7, [0])
    threshold, exits, how = infer.pick_threshold(free, cfg, stored | {"threshold": None})
    assert exits == [] and "no exit" in how
    assert infer.pick_threshold(free, infer.InferConfig(threshold=0.3), stored)[:2] == (0.3, None)


def test_export_after_stage_2_holds_the_exits_and_their_point_in_fp16(finished, tmp_path, capsys):
    """--export after stage 2: backbone and exits in fp16, the calibrated point, the backbone's test accuracy,
    no optimizer state; infer.py answers from it alone, and names the words it never saw."""
    state = torch.load(finished / "shipped.pt", weights_only=False)
    assert {"exits", "calibrated", "test_accuracy", "exit_config"} <= set(state) and "exit_progress" not in state
    assert all(v.dtype == torch.float16 for d in (state["model"], state["exits"]) for v in d.values() if v.is_floating_point())
    rng = np.random.default_rng(5)
    image, _, qas = shapes.make_image_with_questions(rng, ["query_color"])
    Image.fromarray(image).save(tmp_path / "img.png")
    capsys.readouterr()
    infer.main(["--ckpt", str(finished / "shipped.pt"), "--image", str(tmp_path / "img.png"), "--question", "zzz qqq circle?"])
    out = capsys.readouterr().out
    assert "answer:" in out and "no training question had the words zzz, qqq" in out and "circle" not in out.split("words")[1]


def test_the_main_command_keeps_the_backbone_stage_2_started_from(tmp_path):
    """Stage 2 writes OUT/ckpt.pt over stage 1's checkpoint; the main command (both stages) keeps stage 1's
    as OUT/backbone.pt, names it as the exits' source, and a backbone exported from it is the one the exits
    sit on."""
    train.main(SMALL + ["--out", str(tmp_path), "--epochs", "1", "--exit-epochs", "1", "--exit-layers", "2",
                        "--no-final-eval"])
    kept, final = (torch.load(tmp_path / name, weights_only=False) for name in ("backbone.pt", "ckpt.pt"))
    assert "exits" not in kept and "exits" in final
    assert final["backbone_source"]["path"] == str(tmp_path / "backbone.pt")
    checkpoints.export_checkpoint(str(tmp_path / "shipped.pt"), str(tmp_path / "backbone.pt"))
    shipped = torch.load(tmp_path / "shipped.pt", weights_only=False)
    assert all(torch.equal(shipped["model"][k], final["model"][k].half()) for k in final["model"]
               if final["model"][k].is_floating_point())
