"""A pretrained-style frozen timm ViT (--vit, --vit-weights, --freeze-vit) with its tokens cached on disk."""
import json
import os

import numpy as np
import pytest
import timm
import torch

import data
import train
from free_min import build_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "vqa")
VQA = ["--data", "vqa2", "--vqa-questions", os.path.join(FIXTURE, "questions.json"), "--vqa-annotations",
       os.path.join(FIXTURE, "annotations.json"), "--vqa-images", os.path.join(FIXTURE, "images")]
VIT = "vit_tiny_patch16_224"


def vit_file(path, seed: int, img_size: int = 32, name: str = VIT):
    """A small timm ViT with random weights, saved as a local weights file (what --vit-weights reads)."""
    torch.manual_seed(seed)
    torch.save(timm.create_model(name, num_classes=0, img_size=img_size).state_dict(), path)
    return str(path)


def run(out, weights, *extra):
    train.main(["--preset", "tiny", "--threads", "1", "--stage", "backbone", "--epochs", "2", "--out", str(out), *VQA,
                "--vit", VIT, "--vit-weights", weights, "--vit-image-size", "32", "--merge", "1", "--freeze-vit", *extra])


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frozen")
    weights = vit_file(tmp / "vit.pth", seed=0)
    run(tmp / "out", weights)
    return tmp, weights


def test_frozen_encoder_weights_are_unchanged(frozen_run):
    tmp, weights = frozen_run
    trained = torch.load(tmp / "out" / "ckpt.pt", weights_only=False)["model"]
    original = torch.load(weights)
    assert all(torch.equal(trained["vit." + k], v) for k, v in original.items())


def test_cached_tokens_equal_freshly_computed_ones(frozen_run):
    tmp, _ = frozen_run
    state = torch.load(tmp / "out" / "ckpt.pt", weights_only=False)
    model, _, tokenizer, answers, dcfg = build_from_checkpoint(state)
    splits, _, _ = data.load_data(dcfg, tokenizer, answers)
    cache = np.load(tmp / "out" / "features.npy")
    record = json.loads((tmp / "out" / "features.npy.json").read_text())
    assert record["identity"]["encoder"] == VIT and record["identity"]["input_size"] == 32
    for split in splits.values():
        ids = train.image_ids(split)
        with torch.no_grad():
            fresh = model.patch_features(split.images.float() / 255.0)                  # (n_img, P, Dv)
        cached = torch.from_numpy(cache[[record["rows"][str(i)] for i in ids]]).float()
        assert cached.shape == fresh.shape and torch.allclose(cached, fresh, atol=2e-3, rtol=1e-3)


def test_a_changed_input_size_or_encoder_rebuilds_the_cache(frozen_run, capsys):
    tmp, weights = frozen_run
    capsys.readouterr()
    run(tmp / "out", weights, "--vit-image-size", "48")                              # the same weights, 48 px
    assert "rebuilding" in capsys.readouterr().out
    assert json.loads((tmp / "out" / "features.npy.json").read_text())["identity"]["input_size"] == 48
    before = json.loads((tmp / "out" / "features.npy.json").read_text())["identity"]["weights_sha1"]
    run(tmp / "out", vit_file(tmp / "other.pth", seed=1), "--vit-image-size", "48")   # another encoder
    assert "rebuilding" in capsys.readouterr().out
    assert json.loads((tmp / "out" / "features.npy.json").read_text())["identity"]["weights_sha1"] != before


@pytest.mark.parametrize("case", ["unknown name", "weights of another model", "cache of another encoder"])
def test_bad_encoder_input_is_one_line_and_exit_2_before_training(frozen_run, tmp_path, capsys, case):
    tmp, weights = frozen_run
    args = ["--vit", VIT, "--vit-weights", weights, "--vit-image-size", "32", "--merge", "1", "--freeze-vit"]
    if case == "unknown name":
        args[1], message = "vit_no_such_model", "--vit vit_no_such_model: not a timm model name"
    elif case == "weights of another model":
        args[3], message = vit_file(tmp_path / "small.pth", 0, name="vit_small_patch16_224"), "does not fit --vit"
    else:
        args += ["--feature-cache", str(tmp / "out" / "features.npy")]      # made for a 32 or 48 px input
        args[5] = "16"
        message = "holds the tokens of"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--threads", "1", "--out", str(out), *VQA] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (out / "ckpt.pt").exists()
