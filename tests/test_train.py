"""train.py, stage 1: learning, determinism, checkpoints, resume, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
from model import VLM
import train
from util import checkpoints, runtime, stand_ins
from util.checkpoints import build_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a micro configuration (smaller than the tiny preset) for tests that only need the machinery to run
# (--scene-workers 0: each epoch's scenes drawn in the test's own process, not a second interpreter's;
# test_devices.py covers the drawing processes)
MICRO = ["--preset", "tiny", "--train-images", "40", "--val-images", "8", "--test-images", "8", "--epochs", "2",
         "--threads", "1", "--stage", "backbone", "--scene-workers", "0"]


def run_main(args, capsys=None):
    train.main(args)
    return capsys.readouterr().out if capsys else None


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One micro run, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("micro")
    train.main(MICRO + ["--out", str(out)])
    return out


def family_majority_accuracy(train_records, records) -> float:
    """The best answer-prior guess, in %: every question gets its family's most common train answer."""
    majority = {}
    for fam in {r["family"] for r in train_records}:
        answers = [r["answers"][0] for r in train_records if r["family"] == fam]
        majority[fam] = max(sorted(set(answers)), key=answers.count)
    return 100 * sum(r["answers"][0] == majority.get(r["family"]) for r in records) / len(records)


def test_the_vlm_learns_to_read_the_image():
    """Stage 1's model and losses learn what only the image tells: on `query_color` questions ("what colour
    is the circle?"), held-out accuracy beats the family's majority answer. (A from-scratch run on all six
    families needs far more steps than a test can take before it leaves the answer priors; see README.)"""
    torch.manual_seed(0)
    splits, tok, answers = data.load_data(data.DataConfig(train_images=1200, val_images=300, test_images=1))
    cfg = train.ModelConfig(image_size=64, max_text_len=24, vocab_size=tok.get_vocab_size(), num_answers=len(answers),
                            dim=64, depth=2, heads=2)
    model, probe = VLM(cfg=cfg), stand_ins.PatchProbe(cfg.vit_dim)
    tcfg = train.TrainConfig(lr=2e-3, warmup_steps=30, epochs=1, batch_size=32)
    opt = torch.optim.AdamW(list(model.parameters()) + list(probe.parameters()), lr=tcfg.lr, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tr, va = splits["train"], splits["val"]
    pick = lambda split: torch.tensor([i for i, r in enumerate(split.records) if r["family"] == "query_color"])
    train_ids, val_ids = pick(tr), pick(va)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        for group in opt.param_groups:
            group["lr"] = train.get_lr(step, 150, tcfg)
        ids = train_ids[torch.randint(len(train_ids), (32,), generator=g)]
        batch = train.backbone_batch(model, tr, ids) | {"weight": 1.0}
        train.backbone_step(model, {"probe": (1.0, probe)}, batch, opt, scaler, tcfg.grad_clip)
    model.eval()
    with torch.no_grad():
        accuracy = 100 * va.score(val_ids, model(**va.batch(val_ids)).argmax(1)).mean().item()
    prior = family_majority_accuracy([tr.records[i] for i in train_ids], [va.records[i] for i in val_ids])
    assert accuracy > prior + 8, (accuracy, prior)


class FakeSplit:
    """What aux_heads reads of a split: whether it has pixel labels and scene facts."""

    def __init__(self, labels: bool, facts: bool):
        self.pixel_labels = torch.zeros(1) if labels else None
        self.facts = torch.zeros(1) if facts else None


def test_auxiliary_heads_follow_the_pixel_labels_and_scene_facts():
    """Stage 1's auxiliary heads: the pixel-label probe where the data has pixel labels and --aux-weight > 0;
    the label-free aids (answer shortcut, patch reconstruction) otherwise; none of these for a frozen
    encoder. The scene heads wherever the data has scene facts and --scene-weight > 0."""
    model = VLM(cfg=train.ModelConfig(vocab_size=20, num_answers=5, dim=32, depth=1, heads=2))
    heads = lambda labels, facts=False, **kw: set(stand_ins.aux_heads(model, FakeSplit(labels, facts), train.TrainConfig(**kw)))
    assert heads(True) == {"probe"} and heads(True, aux_weight=0) == heads(False) == {"shortcut", "decoder"}
    assert heads(True, True) == {"probe", "scene"} and heads(True, True, scene_weight=0) == {"probe"}
    assert heads(True, True, aux_weight=0, scene_weight=0) == {"shortcut", "decoder"}
    frozen = VLM(cfg=train.ModelConfig(vocab_size=20, num_answers=5, dim=32, depth=1, heads=2, freeze_vit=True))
    assert stand_ins.aux_heads(frozen, FakeSplit(False, False), train.TrainConfig()) == {}
    assert set(stand_ins.aux_heads(frozen, FakeSplit(True, True), train.TrainConfig())) == {"scene"}


def test_scene_facts_are_read_off_the_last_layer_for_the_questions_that_have_them():
    """The scene loss reads h_L's [CLS] alone: the batch mean of each question's summed cross-entropy over
    the facts it has (none for a question without facts), zero for a batch that has none."""
    torch.manual_seed(0)
    scene = stand_ins.SceneHeads(16)
    states = [torch.randn(3, 5, 16, requires_grad=True) for _ in range(9)]              # h_0..h_8
    facts = torch.tensor([[7, 9, -1, -1], [-1, -1, 2, -1], [-1, -1, -1, -1]])
    loss = scene.loss(None, {"states": states, "facts": facts})
    logits = scene.logits(states[-1][:, 0])
    expected = (torch.nn.functional.cross_entropy(logits["reference"][:1], facts[:1, 0])
                + torch.nn.functional.cross_entropy(logits["target"][:1], facts[:1, 1])
                + torch.nn.functional.cross_entropy(logits["first_count"][1:2], facts[1:2, 2])) / 3   # 3 questions
    assert torch.allclose(loss, expected)
    loss.backward()
    assert [i for i, h in enumerate(states) if h.grad is not None] == [8]
    assert states[8].grad[:, 1:].abs().sum() == 0 and states[8].grad[2].abs().sum() == 0
    assert scene.loss(None, {"states": states, "facts": torch.full((3, 4), -1)}).item() == 0.0


def test_the_scene_loss_fits_where_things_are():
    """Trained on 32 `relate` questions, stage 1's step with the scene heads learns to read off [CLS] where
    each question's reference object and target are (64 cells each): a small batch is fitted."""
    torch.manual_seed(0)
    saved = list(data.FAMILIES)
    data.FAMILIES[:] = ["relate"]
    try:
        splits, tok, answers = data.load_data(data.DataConfig(train_images=32, val_images=1, test_images=1,
                                                              questions_per_image=1))
    finally:
        data.FAMILIES[:] = saved
    cfg = train.ModelConfig(image_size=64, max_text_len=24, vocab_size=tok.get_vocab_size(), num_answers=len(answers),
                            dim=64, depth=2, heads=2)
    model, tcfg = VLM(cfg=cfg), train.TrainConfig(lr=3e-3, weight_decay=0.0)
    heads = stand_ins.aux_heads(model, splits["train"], tcfg)
    opt, scaler = train.stage1_optimizer(model, heads, tcfg), torch.amp.GradScaler("cpu", enabled=False)
    tr, ids = splits["train"], torch.arange(32)
    for _ in range(150):
        batch = train.backbone_batch(model, tr, ids) | {"weight": 1.0}
        train.backbone_step(model, heads, batch, opt, scaler, tcfg.grad_clip)
    model.eval()
    with torch.no_grad():
        states, _ = model.hidden_states(**tr.batch(ids))
        read = heads["scene"][1].logits(states[-1][:, 0])
    for j, name in enumerate(("reference", "target")):
        assert (read[name].argmax(1) == tr.facts[:, j]).float().mean().item() > 0.9, name


def test_label_free_stage1_trains_the_encoders_blocks_slower():
    """With the label-free aids, the image encoder's transformer blocks and final norm form their own optimizer
    group at LABEL_FREE['vit_blocks_lr'] x the rate; with pixel labels, everything is one group."""
    model = VLM(cfg=train.ModelConfig(vocab_size=20, num_answers=5, dim=32, depth=1, heads=2))
    tcfg = train.TrainConfig()
    assert len(train.stage1_optimizer(model, stand_ins.aux_heads(model, FakeSplit(True, False), tcfg), tcfg).param_groups) == 1
    opt = train.stage1_optimizer(model, stand_ins.aux_heads(model, FakeSplit(False, False), tcfg), tcfg)
    slow = {id(p) for m in (model.vit.blocks, model.vit.norm) for p in m.parameters()}
    assert [g.get("lr_scale", 1.0) for g in opt.param_groups] == [1.0, stand_ins.LABEL_FREE["vit_blocks_lr"]]
    assert {id(p) for p in opt.param_groups[1]["params"]} == slow
    assert not slow & {id(p) for p in opt.param_groups[0]["params"]}


def test_patch_decoder_targets_are_each_tokens_own_patch():
    """The label-free reconstruction loss asks token p (row-major over the patch grid, as the ViT orders its
    tokens) for the pixels of patch p, averaged down to r x r: zero for exactly those, not for swapped ones."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)                                     # a 2 x 2 grid of 8-pixel patches
    decoder = stand_ins.PatchDecoder(vit_dim=48, patch_size=8)                 # r = 4: 3 x 4 x 4 = 48 values a patch
    with torch.no_grad():
        decoder.pixels.weight.copy_(torch.eye(48))
        decoder.pixels.bias.zero_()                                        # the decoder passes tokens through
    patch = lambda b, i, j: images[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8]                 # (3, 8, 8)
    right = torch.stack([torch.stack([torch.nn.functional.avg_pool2d(patch(b, i, j), 2).flatten()
                                      for i in range(2) for j in range(2)]) for b in range(2)])   # (2, P=4, 48)
    batch = {"pixels": images, "patch_size": 8}
    assert decoder.loss(right, batch).item() < 1e-10 < decoder.loss(right[:, [1, 0, 2, 3]], batch).item()


def test_reconstruction_alone_teaches_the_encoder_its_patches():
    """With no answers and no labels, the reconstruction loss trains the image encoder's tokens to describe
    their own patches: after 60 steps the decoder explains three quarters of the pixels' variance."""
    torch.manual_seed(0)
    splits, tok, answers = data.load_data(data.DataConfig(train_images=64, val_images=4, test_images=1))
    cfg = train.ModelConfig(image_size=64, max_text_len=24, vocab_size=tok.get_vocab_size(), num_answers=len(answers),
                            dim=32, depth=1, heads=2)
    model, decoder = VLM(cfg=cfg), stand_ins.PatchDecoder(cfg.vit_dim, cfg.patch_size)
    opt = torch.optim.AdamW(list(model.vit.parameters()) + list(decoder.parameters()), lr=3e-3)
    images = splits["train"].batch(torch.arange(0, 256, 4))["images"]     # the 64 images, one question each
    pixels = (images - model.pixel_mean) / model.pixel_std
    for _ in range(60):
        loss = decoder.loss(model.patch_features(images), {"pixels": pixels, "patch_size": cfg.patch_size})
        opt.zero_grad()
        loss.backward()
        opt.step()
    variance = ((pixels - pixels.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean().item()
    assert loss.item() < 0.25 * variance, (loss.item(), variance)           # at init: 3x the variance


def test_answer_shortcut_ignores_padding_and_learns_from_the_tokens():
    """stand_ins.AnswerShortcut: the question's padding changes nothing; and from answers alone it learns an
    answer that only the tokens' content tells (here: whether feature 0 is, on average, positive)."""
    torch.manual_seed(0)
    head = stand_ins.AnswerShortcut(vit_dim=8, vocab_size=20, num_answers=2, hidden=32)
    patches, tokens = torch.randn(4, 16, 8), torch.randint(1, 20, (4, 5))
    mask = torch.ones(4, 5, dtype=torch.bool)
    padded = torch.cat([tokens, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    assert torch.allclose(head(patches, tokens, mask), head(patches, padded, padded_mask), atol=1e-6)

    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x = torch.randn(256, 16, 8)
    x[:, :, 0] += torch.randn(256, 1)                               # the per-image offset decides the answer
    y = (x[:, :, 0].mean(dim=1) > 0).long()
    words, words_mask = torch.randint(1, 20, (256, 5)), torch.ones(256, 5, dtype=torch.bool)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(head(x, words, words_mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_new = torch.randn(256, 16, 8)
    x_new[:, :, 0] += torch.randn(256, 1)
    right = (head(x_new, words, words_mask).argmax(1) == (x_new[:, :, 0].mean(dim=1) > 0).long()).float().mean()
    assert right > 0.9, right


def test_overfits_a_small_batch():
    """A real optimisation check: 32 questions are memorised in 100 full-batch steps."""
    torch.manual_seed(0)
    splits, tok, answers = data.load_data(data.DataConfig(train_images=8, val_images=1, test_images=1))
    cfg = train.ModelConfig(image_size=64, max_text_len=24, vocab_size=tok.get_vocab_size(), num_answers=len(answers),
                            dim=64, depth=2, heads=2)
    model = VLM(cfg=cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids = torch.arange(32)
    batch, targets = splits["train"].batch(ids), splits["train"].soft_targets(ids, len(answers))
    for _ in range(100):
        loss = train.soft_cross_entropy(model(**batch), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = splits["train"].score(ids, model(**batch).argmax(1)).mean().item()
    assert accuracy == 1.0 and loss.item() < 0.05


def test_save_load_gives_identical_predictions(micro_run):
    state = checkpoints.load_checkpoint(str(micro_run / "ckpt.pt"))
    model, _, tokenizer, answers, dcfg = build_from_checkpoint(state)
    splits, _, _ = data.load_data(dcfg, tokenizer, answers)
    model.eval()
    ids = torch.arange(len(splits["test"]))
    res = train.evaluate(model, splits["test"], torch.device("cpu"))
    test = [r for r in map(json.loads, open(micro_run / "log.jsonl")) if "test_accuracy" in r][-1]
    assert res["accuracy"] == pytest.approx(test["test_accuracy"])
    with torch.no_grad():
        assert torch.equal(model(**splits["test"].batch(ids)).argmax(1), res["pred"])


def test_same_seed_same_weights_on_cpu(tmp_path):
    train.main(MICRO + ["--out", str(tmp_path / "a")])
    train.main(MICRO + ["--out", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("aux", [["--aux-weight", "1", "--sample-families", "by-error"],
                                 ["--aux-weight", "0", "--scene-weight", "0", "--sample-families", "uniform"]],
                         ids=["pixel-labels", "label-free"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, aux):
    """Interrupted after epoch 2 and resumed: the same weights as a run that never stopped, with the pixel-label
    and scene heads and families sampled by their error, or (--aux-weight 0 --scene-weight 0, families in
    turn) the label-free heads that turn on then (their optimizer state and weights, and the scenes'
    weights, travel in the checkpoint)."""
    args = MICRO + ["--epochs", "3"] + aux
    train.main(args + ["--out", str(tmp_path / "full")])

    saves = []
    real_save = checkpoints.save_atomic

    def save_then_crash(path, state):
        real_save(path, state)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the run dies right after epoch 2 was checkpointed

    monkeypatch.setattr(checkpoints, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(checkpoints, "save_atomic", real_save)
    train.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])

    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert resumed["step"] == full["step"] and resumed["epoch"] == 2
    assert set(full["aux"]) == ({"shortcut", "decoder"} if aux[1] == "0" else {"probe", "scene"})
    assert all(torch.equal(full["aux"][h][k], resumed["aux"][h][k]) for h in full["aux"] for k in full["aux"][h])
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    epochs = [json.loads(l)["epoch"] for l in open(tmp_path / "resumed" / "log.jsonl") if "val_accuracy" in l]
    assert epochs == [1, 2, 3]
    weights = [json.loads(l)["family_weights"] for l in open(tmp_path / "resumed" / "log.jsonl") if "val_accuracy" in l]
    assert all(w is not None for w in weights) == (aux[1] == "1")


def test_a_checkpoint_without_loss_scaling_resumes_with_fp16_loss_scaling(tmp_path, monkeypatch, capsys):
    """A CPU or bf16 run saves an empty grad-scaler state. Continued where fp16 runs (a T4, a V100), the
    scaler starts afresh instead of failing; and an fp16 run's state continues where no scaler is needed."""
    args = MICRO + ["--epochs", "2", "--stage", "backbone", "--out", str(tmp_path)]
    real_save = checkpoints.save_atomic

    def save_then_crash(path, state):
        real_save(path, state)
        raise KeyboardInterrupt                                # the run dies after epoch 1 was checkpointed
    monkeypatch.setattr(checkpoints, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(checkpoints, "save_atomic", real_save)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["scaler"] == {}
    fp16 = torch.amp.GradScaler("cpu", enabled=True)          # what an fp16 device's run makes
    monkeypatch.setattr(train, "grad_scaler", lambda: fp16)
    train.main(args + ["--resume"])
    assert "starts afresh" in capsys.readouterr().out
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["epoch"] == 1 and state["scaler"]["scale"] > 0      # epoch 2 ran with loss scaling
    runtime.load_scaler(torch.amp.GradScaler("cpu", enabled=False), state["scaler"])   # and back: nothing to do


def test_resume_refuses_a_different_model(tmp_path):
    train.main(MICRO + ["--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        train.main(MICRO + ["--out", str(tmp_path), "--resume", "--dim", "32"])
    assert e.value.code == 2


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    train.main(MICRO + ["--out", str(tmp_path), "--epochs", "1"])
    good = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    monkeypatch.setattr(train, "soft_cross_entropy", lambda logits, targets: logits.float().sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main(MICRO + ["--out", str(tmp_path), "--epochs", "1"])       # a new run into the same folder
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_a_non_finite_stage2_loss_stops_at_its_check_and_keeps_the_backbone(tmp_path, monkeypatch):
    """Stage 2 reads its losses back every CHECK_EVERY steps and at the end of an epoch, before the epoch's
    checkpoint: a NaN stops the run there, in one line, and OUT/ckpt.pt is still stage 1's."""
    train.main(MICRO + ["--out", str(tmp_path), "--epochs", "1"])
    good = (tmp_path / "ckpt.pt").read_bytes()
    real = train.generator_loss
    monkeypatch.setattr(train, "generator_loss", lambda *a: (lambda loss, stats: (loss * float("nan"), stats))(*real(*a)))
    with pytest.raises(SystemExit, match=r"non-finite loss \(.*'g_loss': nan.*\) in stage 2"):
        train.main(MICRO + ["--out", str(tmp_path), "--stage", "exits", "--exit-epochs", "1"])
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_resume_refuses_a_changed_schedule(tmp_path, capsys):
    train.main(MICRO + ["--out", str(tmp_path)])
    before = (tmp_path / "ckpt.pt").read_bytes()
    for flag, value in [("--epochs", "3"), ("--batch-size", "16"), ("--lr", "1e-3")]:
        with pytest.raises(SystemExit) as e:
            train.main(MICRO + ["--out", str(tmp_path), "--resume", flag, value])
        assert e.value.code == 2
        assert f"{flag} " in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_run_from_before_scene_facts_resumes_only_as_it_was_trained(tmp_path, capsys):
    """A stage-1 checkpoint written before --scene-weight and --sample-families existed trained without them:
    resuming it with today's defaults is refused in one line naming both; with the old values it resumes."""
    old = MICRO + ["--scene-weight", "0", "--sample-families", "uniform", "--out", str(tmp_path)]
    train.main(old + ["--epochs", "1"])                       # one epoch of a three-epoch run, then stopped
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for key in ("scene_weight", "sample_families"):
        del state["train_config"][key]
    state["train_config"]["epochs"] = 3
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        train.main(MICRO + ["--epochs", "3", "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--scene-weight 0.0 -> 1.0" in err and "--sample-families 'uniform' -> 'by-error'" in err, err
    train.main(old + ["--epochs", "3", "--resume"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 2


def test_a_backbone_built_while_the_position_options_existed_loads_and_one_built_with_them_is_refused(tmp_path, capsys):
    """--position and --coord-conv were removed after they lost. A checkpoint written while they existed names
    them at today's values (learned positions, no coordinates): it is rebuilt and resumed as today's model. One
    built with --position sincos is refused in one line that names the option and the commit that has it."""
    train.main(MICRO + ["--out", str(tmp_path), "--epochs", "1"])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    state["model_config"] |= {"position": "learned", "coord_conv": False}
    state["train_config"]["epochs"] = 2
    torch.save(state, tmp_path / "ckpt.pt")
    assert not hasattr(build_from_checkpoint(state)[0].cfg, "position")
    train.main(MICRO + ["--out", str(tmp_path), "--epochs", "2", "--resume"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 1
    state["model_config"]["position"] = "sincos"
    torch.save(state, tmp_path / "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(MICRO + ["--out", str(tmp_path), "--epochs", "2", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--position 'sincos'" in err and "4a8b9d2" in err, err


FIXTURE = os.path.join(ROOT, "tests", "fixtures", "vqa")
VQA = ["--data", "vqa2", "--vqa-questions", os.path.join(FIXTURE, "questions.json"), "--vqa-annotations",
       os.path.join(FIXTURE, "annotations.json"), "--vqa-images", os.path.join(FIXTURE, "images"), "--image-size", "32"]


# Every bad flag: one line naming it, exit 2, before any data is made or any step is taken (nothing written).
@pytest.mark.parametrize("args, message", [
    (["--patch-size", "6"], "--patch-size 6"),
    (["--exit-layers", "9"], "--exit-layers: '9' is not a layer"),
    (["--exit-layers", "2,x"], "--exit-layers: 'x'"),
    (["--label-fraction", "1.5"], "--label-fraction must be between 0 and 1"),
    (["--exit-method", "ce", "--label-fraction", "0"], "--exit-method ce"),
    (["--dim", "100", "--heads", "3"], "--dim 100 is not divisible by --heads 3"),
    (["--image-size", "60"], "--image-size 60 is not a multiple"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--aux-weight", "-1"], "--aux-weight must be >= 0"),
    (["--adv-loss", "wgan"], "--adv-loss: invalid choice: 'wgan'"),
    (["--exit-method", "pabee"], "--exit-method: invalid choice: 'pabee'"),
    (["--vit-pretrained"], "--vit-pretrained and --vit-weights go with --vit NAME"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--questions-per-image", "9"], "--questions-per-image must be between 1 and 6"),
    (["--vit-weights", "/nope/vit.pth"], "--vit-weights /nope/vit.pth: file not found"),
    (["--backbone", "/nope/ckpt.pt"], "--backbone is read by --stage exits only"),
    (["--stage", "exits", "--backbone", "/nope/ckpt.pt"], "--backbone /nope/ckpt.pt: checkpoint not found"),
    (["--stage", "exits"], "ckpt.pt: checkpoint not found"),
    (["--resume"], "--resume"),
    (["--data", "vqa2"], "--data vqa2 needs --vqa-questions FILE"),
    (["--data", "vqa2", "--vqa-questions", "/nope/q.json", "--vqa-annotations", "/nope/a.json", "--vqa-images", "/nope"],
     "--vqa-questions /nope/q.json: file not found"),
    (VQA + ["--vqa-max-questions", "8"], "the val split is empty: 8 questions on 4 images"),
] + ([(["--device", "cuda"], "--device cuda: torch sees no CUDA device")] if not torch.cuda.is_available() else []))
def test_bad_flag_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path)] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []                          # no checkpoint, no log: nothing was trained


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_argparse_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path)] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_bad_input_on_the_command_line_exits_2_with_one_line(tmp_path):
    """The same as a user sees it: a new process, no usage text, no traceback (one case; the rest in-process above)."""
    proc = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path), "--exit-layers", "9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--exit-layers: '9' is not a layer" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr                  # one line: no usage text, no traceback


def test_patch_probe_targets_follow_the_pixels():
    """The auxiliary loss is lowest when the probe predicts the colour/shape covering each patch."""
    labels = torch.zeros(1, 2, 16, 16, dtype=torch.uint8)
    labels[0, 0, :8, :8], labels[0, 1, :8, :8] = 3, 2          # top-left patch: colour 3, shape 2
    labels[0, 0, 8:, 8:9], labels[0, 1, 8:, 8:9] = 5, 4        # a thin sliver (1/8 of a patch): background
    probe = stand_ins.PatchProbe(vit_dim=4)
    with torch.no_grad():
        for head in (probe.colour, probe.shape):
            head.weight.zero_()
            head.bias.zero_()
        # token features one-hot by patch: the probe maps patch 0 to (3, 2) and the rest to background
        probe.colour.weight[3, 0] = probe.shape.weight[2, 0] = 50.0
        probe.colour.weight[0, 1] = probe.shape.weight[0, 1] = 50.0
    right = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]])   # (1, P=4, Dv=4)
    wrong = right[:, [1, 0, 2, 3]]
    batch = {"pixel_labels": labels, "patch_size": 8}
    assert probe.loss(right, batch).item() < 1e-6 < probe.loss(wrong, batch).item()


def test_export_writes_an_fp16_backbone_that_scores_what_it_states(tmp_path):
    """--export: the backbone alone (fp16 weights, no optimizer, no exits) with the test accuracy it reached;
    loaded back (in float32) it gives the trained model's logits up to fp16 rounding, and its stated accuracy."""
    path = tmp_path / "exported.pt"
    train.main(MICRO + ["--out", str(tmp_path / "run"), "--export", str(path)])
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert "optimizer" not in state and "exits" not in state
    assert all(v.dtype == torch.float16 for v in state["model"].values() if v.is_floating_point())
    exported, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    trained = build_from_checkpoint(checkpoints.load_checkpoint(str(tmp_path / "run" / "ckpt.pt")))[0]
    assert free is None and next(exported.parameters()).dtype == torch.float32
    splits, _, _ = data.load_data(dcfg, tokenizer, answers, only=("test",))
    batch = splits["test"].batch(torch.arange(len(splits["test"])))
    with torch.no_grad():
        assert torch.allclose(exported(**batch), trained(**batch), atol=0.05)
    res = train.evaluate(exported, splits["test"], torch.device("cpu"))
    assert res["accuracy"] == pytest.approx(state["test_accuracy"], abs=7.0)   # 32 questions: a flip is 3 points


def test_the_ce_term_under_torchrun_averages_to_the_global_batchs_mean(monkeypatch):
    """With few labels, the halves of a global batch hold different numbers of labelled questions (here 3 and
    1): each process's CE mean, weighted by train.ce_weight and by shard's weight, averages over the
    processes to the mean over the global batch's labelled questions, as one process computes it."""
    answered = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    per_row = torch.arange(10, dtype=torch.float) + 1.0                  # each question's CE
    global_ids = torch.arange(10)
    want = per_row[answered].mean().item()
    monkeypatch.setitem(runtime.WORLD, "size", 2)
    total = 0.0
    for rank in (0, 1):
        monkeypatch.setitem(runtime.WORLD, "rank", rank)
        local, weight = runtime.shard(global_ids)
        mean = per_row[local][answered[local]].mean().item()                # what the process's CE term is
        total += weight * train.ce_weight(answered, global_ids, local) * mean
    assert total / 2 == pytest.approx(want)
    monkeypatch.setitem(runtime.WORLD, "size", 1)
    monkeypatch.setitem(runtime.WORLD, "rank", 0)
    assert runtime.shard(global_ids)[1] == 1.0 and train.ce_weight(answered, global_ids, global_ids) == 1.0


def test_stage1_batches_do_not_hang_on_the_global_rng(tmp_path, monkeypatch):
    """Every process of a torchrun must shard the same global batches. Process 0 alone evaluates between
    epochs, so a draw from the global RNG there must not change the next epoch's batches: the batches of two
    runs, one of them drawing from the global RNG in each evaluation, are the same. (Families drawn uniformly:
    by-error sampling follows the training, whose dropout the draw does change.)"""
    shard, evaluate = train.shard, train.evaluate

    def batches_of(out, draw: bool) -> list:
        seen = []
        monkeypatch.setattr(train, "shard", lambda ids: seen.append(ids.tolist()) or shard(ids))
        monkeypatch.setattr(train, "evaluate", lambda *a: (draw and torch.rand(5), evaluate(*a))[1])
        train.main(MICRO + ["--out", str(out), "--sample-families", "uniform"])
        return seen

    assert batches_of(tmp_path / "a", draw=True) == batches_of(tmp_path / "b", draw=False)
