"""experiments/compare.py: the comparison table, checked by hand on made-up runs."""
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import data
import free_min
from util import checkpoints, config, shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402


def fake_run(folder, config: dict, exits: list[float], final: float, hard: list[float], crisis: float,
             fixable: float, calibrated: dict):
    """A finished run folder as compare.py reads it: ckpt.pt (configs) and report.json, with exits after layers
    1, 2 and 4 and `hard` the accuracy of each hard family at those three exits."""
    folder.mkdir(parents=True)
    torch.save({"model": {}, "model_config": {}, "data_config": {}, "exit_config": asdict(free_min.ExitConfig(**config))},
               folder / "ckpt.pt")
    report = {"exits": [{"layer": l, "accuracy": a} for l, a in zip((1, 2, 4), exits)], "full": {"accuracy": final},
              "per_family": {f: {"exits": hard} for f in compare.HARD}, "mid_crisis": {"free_exits": {"drop": crisis}},
              "overthinking": {"fixable_pct": fixable}, "calibrated": {"rule": "maxprob"} | calibrated}
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder)


def test_table_averages_seeds_by_hand(tmp_path):
    cal = lambda t, drop, layers, speedup: {"threshold": t, "accuracy_drop": drop, "avg_layers": layers,
                                            "predicted_speedup": speedup, "exit_layers": [2]}
    runs = [fake_run(tmp_path / "a0", {}, [40, 50, 70], 60, [30, 40, 80], 0.0, 1.0, cal(0.9, 0.5, 3.0, 1.5)),
            fake_run(tmp_path / "kd", {"exit_method": "kd"}, [41, 58, 71], 60, [30, 45, 90], 2.0, 0.5,
                     {"threshold": None}),
            fake_run(tmp_path / "a1", {}, [42, 54, 72], 62, [32, 50, 84], 1.0, 2.0, cal(0.95, 1.0, 3.2, 1.7)),
            fake_run(tmp_path / "gan", {"adv_loss": "gan", "label_fraction": 0.1}, [30, 40, 60], 60, [20, 30, 60], 0.5,
                     1.5, cal(0.8, 0.2, 2.0, 2.0))]
    lines = compare.table(runs).splitlines()
    assert lines[0] == ("| method | labels F | n | exit L1 | exit L2 | exit L4 | final | compare L2/L4 | relate L2/L4 "
                        "| mid-crisis | overthinking % | guaranteed point: drop, layers, predicted speedup |")
    # two seeds of one setting: mean ± sample std, e.g. std(50, 54) = 2.83, std(1.5, 1.7) = 0.14, std(40, 50) = 7.07
    assert lines[2] == ("| free | 1 | 2 | 41.0 ± 1.4 | 52.0 ± 2.8 | 71.0 ± 1.4 | 61.0 ± 1.4 | 45 ± 7 / 82 ± 3 "
                        "| 45 ± 7 / 82 ± 3 | 0.5 ± 0.7 | 1.50 ± 0.71 "
                        "| maxprob 0.9/0.95 (exits 2): drop +0.75 ± 0.35, 3.10 ± 0.14 layers, 1.60 ± 0.14x |")
    assert lines[4] == "| kd | 1 | 1 | 41.0 | 58.0 | 71.0 | 60.0 | 45 / 90 | 45 / 90 | 2.0 | 0.50 | none certified (1 of 1) |"
    assert lines[3] == ("| free (adv_loss=gan) | 0.1 | 1 | 30.0 | 40.0 | 60.0 | 60.0 | 30 / 60 | 30 / 60 | 0.5 | 1.50 "
                        "| maxprob 0.8 (exits 2): drop +0.20, 2.00 layers, 2.00x |")


def test_a_broken_run_is_named(tmp_path):
    folder = fake_run(tmp_path / "run", {}, [50, 50, 50], 60, [50, 50, 50], 0.0, 0.0, {"threshold": None})
    (tmp_path / "run" / "report.json").write_text("{truncated")
    with pytest.raises(config.CheckpointError, match="run: not a finished run"):
        compare.table([folder])
    with pytest.raises(config.CheckpointError, match="checkpoint not found"):
        compare.table([str(tmp_path / "nothing")])


# --------------------------------------------------------------------------------------------------
# experiments/screen.py: the proxies' diagnostics and baselines
# --------------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402

import screen  # noqa: E402


def test_blind_score_by_hand():
    objs = [shapes.Obj("red", "circle", 10, 10, 6), shapes.Obj("blue", "square", 50, 50, 6),
            shapes.Obj("blue", "circle", 20, 40, 6), shapes.Obj("green", "triangle", 40, 10, 6)]
    # the reference is the red object; the others are blue, blue, green
    assert screen.blind_score(objs, "what color is the object closest to the red object?", "blue") == pytest.approx(2 / 3)
    assert screen.blind_score(objs, "the thing farthest from the red object has what color?", "green") == pytest.approx(1 / 3)
    assert screen.blind_score(objs, "what shape is the object closest to the red object?", "red") == 0.0
    # "square" names the blue square alone; the others are two circles and a triangle
    assert screen.blind_score(objs, "what shape is the object farthest from the square?", "circle") == pytest.approx(2 / 3)


def test_more_only_never_asks_fewer():
    rng, asked = np.random.default_rng(0), []
    for _ in range(200):
        qa = screen.more_only(shapes.make_scene(rng), rng)
        if qa is not None:
            asked.append(qa)
    assert len(asked) > 50 and not any("fewer" in q for q, _, _ in asked)
    assert {a for _, a, _ in asked} == {"yes", "no"}


def test_the_side_question_is_answered_by_where_the_named_object_is():
    """screen.ask_side: "is the X on the left?" says yes exactly when X's centre is in that half; both
    answers come up; no object within 4 px of the middle is asked about; a scene with none nameable there asks
    nothing."""
    rng, asked = np.random.default_rng(0), []
    for _ in range(300):
        objs = shapes.make_scene(rng)
        qa = screen.ask_side(objs, rng)
        if qa is None:
            continue
        name, side = re.fullmatch(r"is the (.+) on the (\w+)\?", qa[0]).groups()
        o = dict(shapes.reference_names(objs))[name]
        axis, beyond = screen.SIDES[side]
        assert min(abs(o.x - 32), abs(o.y - 32)) >= 4
        assert qa[1] == ("yes" if (getattr(o, axis) > 32) == beyond else "no")
        asked.append(qa[1])
    assert len(asked) > 150 and asked.count("yes") > 50 and asked.count("no") > 50
    middle = [shapes.Obj("red", "circle", 30, 40, 6), shapes.Obj("blue", "square", 34, 10, 6), shapes.Obj("red", "square", 40, 34, 6)]
    assert screen.ask_side(middle, rng) is None


def test_oracle_patches_are_each_patchs_fractions():
    images, records, labels = shapes.generate_shapes_split(3, 1, seed=0)
    split = screen.oracle_patches(data.make_split(images, records, labels, data.train_tokenizer(
        [r["question"] for r in records], 100, 24), {}), patch_size=8, width=64)
    assert split.patches.shape == (3, 64, 64)                        # (images, 8 x 8 patches, ViT width)
    colour, shape, rest = split.patches[..., :7].float(), split.patches[..., 7:12].float(), split.patches[..., 12:]
    assert torch.allclose(colour.sum(-1), torch.ones(3, 64), atol=1e-2) and torch.allclose(shape.sum(-1), torch.ones(3, 64), atol=1e-2)
    assert not rest.any()
    # patch (row 0, col 0) of image 0: its colour fractions are those of its 8 x 8 pixels' labels
    corner = torch.bincount(torch.as_tensor(labels[0, 0, :8, :8]).flatten().long(), minlength=7).float() / 64
    assert torch.allclose(colour[0, 0], corner, atol=1e-2)


def test_a_proxy_run_trains_one_family_and_restores_the_generator(tmp_path):
    flags = ["--preset", "tiny", "--train-images", "32", "--val-images", "16", "--test-images", "1",
             "--questions-per-image", "1", "--threads", "1"]
    result = screen.screen(["count"], steps=2, seed=0, out=str(tmp_path), flags=flags, only_more=True)
    assert set(result["accuracy"]) == set(result["majority"]) == {"count"}
    assert data.FAMILIES == ["exist", "query_color", "query_shape", "count", "compare", "relate"]
    assert shapes.GENERATORS["compare"] is screen.ASK_COMPARE
    assert "side" not in shapes.GENERATORS and "side" not in shapes.ANSWER_TYPES


def test_find_objects_recovers_the_generators_objects():
    rng = np.random.default_rng(5)
    scenes = [shapes.make_scene(rng) for _ in range(20)]
    found = screen.find_objects(torch.from_numpy(np.stack([shapes.scene_labels(objs) for objs in scenes])))
    for objs, recovered in zip(scenes, found):
        assert len(recovered) == len(objs)
        for o in objs:   # each object found once, with its colour and shape, its centre within a pixel
            c, s, x, y = min(recovered, key=lambda t: (t[2] - o.x) ** 2 + (t[3] - o.y) ** 2)
            assert (list(shapes.COLORS)[c], shapes.SHAPES[s]) == (o.color, o.shape)
            assert abs(x - o.x) < 1 and abs(y - o.y) < 1


def test_object_patches_put_one_object_in_each_visual_token():
    images, records, labels = shapes.generate_shapes_split(2, 1, seed=0)
    split = screen.object_patches(data.make_split(images, records, labels, data.train_tokenizer(
        [r["question"] for r in records], 100, 24), {}), patch_size=8, width=64)
    x = split.patches.float().view(2, 8, 8, 64)                      # (images, rows, cols, ViT width)
    for i, objs in enumerate(screen.find_objects(torch.from_numpy(labels))):
        used = x[i].abs().sum(-1) > 0                                 # (8, 8): the patches that hold an object
        assert int(used.sum()) == len(objs) and not used[1::2].any() and not used[:, 1::2].any()
        first = x[i, 0, 0]                                            # object 0: colour, shape one-hot, then x
        assert first[:6].argmax() == objs[0][0] and first[6:10].argmax() == objs[0][1]
        assert abs(float(first[10]) - (objs[0][2] / 32 - 1)) < 1e-2


def test_the_gpu_check_runs_every_step_in_its_cpu_dry_run(tmp_path):
    """experiments/gpu_check.sh with DRY_RUN=1, on the CPU with tiny settings: the all-reduce over two processes
    (gloo here), both stages under torchrun (their batches leaving a last global batch of one question, which
    both stages leave out), fp16 with the grad scaler forced and resumed after a stop, the report of the exits
    torchrun trained, and the main command with its peak memory each run to the end, and the checks pass (the
    report's accuracy against the CPU's is skipped, and says why)."""
    proc = subprocess.run(["bash", "experiments/gpu_check.sh", str(tmp_path), "400"], cwd=ROOT, capture_output=True,
                          text=True, timeout=500, env=dict(os.environ, DRY_RUN="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    steps = [line for line in summary if ": exit " in line]
    assert [line.split(":")[0] for line in steps] == ["nccl", "torchrun", "fp16_resume", "report", "main"]
    assert all(": exit 0," in line for line in steps), steps
    assert "all_reduce over gloo on cpu gave 3, as it should" in (tmp_path / "nccl.log").read_text()
    checks = [line for line in summary if line.startswith("check ")]
    assert [c.split(":")[0] for c in checks] == ["check torchrun", "check fp16", "check fp16 path", "check resume",
                                                  "check report accuracy"]
    assert all(": ok (" in c for c in checks[:4]) and "skipped" in checks[4]
    assert re.search(r"peak memory: GPU 0.00 GiB .*; host \d+\.\d+ GiB", (tmp_path / "main.log").read_text())
    assert json.loads((tmp_path / "report.json").read_text())["device"] == "cpu"


# --------------------------------------------------------------------------------------------------
# experiments/batch1_costs.py: the calibrated point against its own best case
# --------------------------------------------------------------------------------------------------
import batch1_costs  # noqa: E402
import infer  # noqa: E402


def test_the_best_case_does_the_work_early_exit_did_and_nothing_more(monkeypatch, capsys):
    """known_exits runs each question's layers and evaluates the exits early exit evaluated for it, and no other;
    layers_only the same layers and no exit; the script prints the five forwards."""
    free, tokenizer, answers, dcfg, state = checkpoints.load_free(infer.InferConfig(ckpt=checkpoints.SHIPPED_EXITS))
    cal, test = state["calibrated"], data.load_data(dcfg, tokenizer, answers, only=("test",))[0]["test"]
    exits, calls = infer.exit_indices(free, cal), []
    layer, exit_logits = free.backbone.layer, free.exit_logits
    monkeypatch.setattr(free.backbone, "layer", lambda i, *a: calls.append(("layer", i)) or layer(i, *a))
    monkeypatch.setattr(free, "exit_logits", lambda k, *a: calls.append(("exit", k)) or exit_logits(k, *a))
    left = set()
    for x in infer.timing_batches(free, test, torch.arange(40), 1):
        calls.clear()
        out = free_min.early_exit_predict(free, x, cal["rule"], cal["threshold"], exits)
        done, k = list(calls), int(out["exit"])
        left.add(k)
        calls.clear()
        batch1_costs.known_exits(free, x, exits, k)
        assert calls == done
        calls.clear()
        batch1_costs.layers_only(free, x, int(out["layers"]))
        assert calls == [c for c in done if c[0] == "layer"]
    assert len(left) > 1                                                    # questions left at different exits
    batch1_costs.main(["--questions", "4", "--rounds", "2", "--threads", "1"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split("  ")[1].strip() for r in rows] == ["full", "early exit", "known exits", "layers only", "embedding"]


def test_by_question_type_reads_the_shapes_families_back_from_vqa_files(tmp_path, capsys):
    """A model trained on shapes written as VQA files groups its questions by answer type; by_question_type.py
    reads each question's family back from the annotations and scores the split per family, the final
    layer's figure over all of them equal to train.evaluate's."""
    import by_question_type
    import train
    from util.checkpoints import build_from_checkpoint
    data.write_vqa_format(data.DataConfig(train_images=32, val_images=4, test_images=4), str(tmp_path / "set"))
    files = ["--data", "vqa2", "--vqa-questions", str(tmp_path / "set" / "questions.json"), "--vqa-annotations",
             str(tmp_path / "set" / "annotations.json"), "--vqa-images", str(tmp_path / "set" / "images")]
    train.main(["--preset", "tiny", "--epochs", "1", "--threads", "1", "--stage", "backbone", "--out", str(tmp_path / "run"),
                *files])
    capsys.readouterr()
    by_question_type.main([str(tmp_path / "run" / "ckpt.pt"), "--threads", "1"])
    rows = dict(re.findall(r"^\| (\w+) \| \**([\d.]+)\**", capsys.readouterr().out, flags=re.M))
    assert set(rows) == set(data.FAMILIES) | {"all"}, rows
    model, _, tok, answers, dcfg = build_from_checkpoint(checkpoints.load_checkpoint(str(tmp_path / "run" / "ckpt.pt")))
    test = data.load_data(dcfg, tok, answers, only=("test",))[0]["test"]
    assert float(rows["all"]) == pytest.approx(train.evaluate(model, test, torch.device("cpu"))["accuracy"], abs=0.05)
    assert set(test.families) <= {"yes/no", "number", "other"}                 # what train.py and infer.py group by


def test_scene_rate_draws_whole_epochs_and_prints_a_rate_per_setting(capsys):
    import scene_rate
    scene_rate.main(["--workers", "0", "--images", "12", "--epochs", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cores:") and re.fullmatch(r"0 drawing processes: [\d,]+ scenes/s", lines[1])


def test_the_gan_remedies_change_the_discriminator_as_their_papers_say(monkeypatch):
    """experiments/gan_remedies.py: `sn` puts spectral norm on D's three linear layers; `smooth` trains D towards
    0.9 on real features and 0 on fakes; `noise` adds noise to what D reads in training, none once the run's D
    steps are done (and none in eval)."""
    from types import SimpleNamespace
    import gan_remedies
    import train
    for obj, name in ((train, "discriminator_loss"), (free_min.Discriminator, "forward"),
                      (free_min.Discriminator, "__init__")):
        monkeypatch.setattr(obj, name, getattr(obj, name))                 # each put back after the test
    gan_remedies.patch("sn", 1)
    torch.manual_seed(0)
    d = free_min.Discriminator(8, 16)
    assert all(torch.nn.utils.parametrize.is_parametrized(m) for m in (d.body[0], d.body[2], d.out))
    free = SimpleNamespace(backbone=SimpleNamespace(norm=lambda x: x), disc=d)
    real, fakes = torch.randn(5, 8), [torch.randn(5, 8), torch.randn(5, 8)]
    gan_remedies.patch("smooth", 1)
    d.eval()
    loss, _ = train.discriminator_loss(free, real, fakes)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(d(real), torch.full((5,), 0.9)) + bce(d(torch.cat(fakes)), torch.zeros(10))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    gan_remedies.patch("noise", 3)
    x = torch.randn(4, 8)
    d.train()
    # (spectral norm's power iteration moves the weights a little at every forward in training)
    assert not torch.allclose(d(x), d(x), atol=1e-3)                                      # noisy while training
    for _ in range(3):
        train.discriminator_loss(free, real, fakes)
    assert torch.allclose(d(x), d(x), atol=1e-3)                                 # the noise annealed to 0


def test_the_kept_remedy_is_the_screened_one(tmp_path, monkeypatch):
    """--disc-noise 1.0, the instance noise free-min kept, trains the same exits, bit for bit, as the noise
    remedy that gan_remedies.py screened (its patch over free_min), on a tiny run."""
    import gan_remedies
    import train
    flags = ["--preset", "tiny", "--train-images", "12", "--val-images", "4", "--test-images", "4", "--calib-images",
             "4", "--threads", "1", "--scene-workers", "0", "--epochs", "1", "--exit-epochs", "2", "--no-final-eval"]
    train.main(flags + ["--stage", "backbone", "--out", str(tmp_path / "backbone")])
    stage2 = flags + ["--stage", "exits", "--backbone", str(tmp_path / "backbone" / "ckpt.pt"), "--adv-loss", "gan",
                      "--label-fraction", "0"]
    train.main(stage2 + ["--disc-noise", "1.0", "--out", str(tmp_path / "core")])
    for obj, name in ((train, "discriminator_loss"), (free_min.Discriminator, "forward")):
        monkeypatch.setattr(obj, name, getattr(obj, name))                 # each put back after the test
    gan_remedies.one("noise", stage2 + ["--out", str(tmp_path / "patched")])
    core, patched = (torch.load(tmp_path / name / "ckpt.pt", weights_only=False)["exits"] for name in ("core", "patched"))
    assert core.keys() == patched.keys() and all(torch.equal(core[k], patched[k]) for k in core)
    plain = tmp_path / "plain"
    train.main(stage2 + ["--out", str(plain)])
    assert not torch.equal(torch.load(plain / "ckpt.pt", weights_only=False)["exits"]["disc.out.weight"],
                           core["disc.out.weight"])


# --------------------------------------------------------------------------------------------------
# What experiments may use: the names each module's docstring lists as public
# --------------------------------------------------------------------------------------------------
import ast  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402

MODULES = ("data", "model", "free_min", "train", "infer", "util.config", "util.runtime", "util.checkpoints",
           "util.report", "util.stand_ins", "util.shapes", "util.scenes", "util.vqa")


def public_names(module: str) -> set[str]:
    """The names after 'Public:' in the module's docstring (what is in parentheses names attributes)."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, module.replace(".", "/") + ".py")).read()))
    listed = re.sub(r"\([^)]*\)", "", doc.split("Public:")[1])
    return set(re.findall(r"[A-Za-z_]\w*", listed))


def names_used(source: str) -> dict[str, set[str]]:
    """Module -> the names a script takes from it (from M import x; M.x; from util import M, then M.x)."""
    tree, alias, used = ast.parse(source), {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias |= {a.asname or a.name: a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            used.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "util":
            alias |= {a.asname or a.name: "util." + a.name for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias:
            used.setdefault(alias[node.value.id], set()).add(node.attr)
    return used


def test_experiments_use_only_what_the_modules_name_public():
    """Every name an experiment takes from free-min's modules (the Python of gpu_check.sh's here-documents
    included) is listed in that module's docstring after 'Public:'."""
    scripts = {path: open(path).read() for path in glob.glob(os.path.join(ROOT, "experiments", "*.py"))}
    shell = open(os.path.join(ROOT, "experiments", "gpu_check.sh")).read()
    scripts["gpu_check.sh"] = "\n".join(re.findall(r"<<'EOF'\n(.*?)\nEOF", shell, re.S))
    assert len(scripts) >= 10 and "import" in scripts["gpu_check.sh"]
    private = {f"{os.path.basename(path)}: {module}.{name}"
               for path, source in scripts.items() for module, names in names_used(source).items()
               for name in names - public_names(module)}
    assert not private, sorted(private)
