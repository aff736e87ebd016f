"""A pretrained-style frozen timm ViT (--vit, --vit-weights, --freeze-vit), its tokens computed once per image."""
import os

import pytest
import timm
import torch

import data
import train
from util import runtime
from util.checkpoints import build_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "vqa")
VQA = ["--data", "vqa2", "--vqa-questions", os.path.join(FIXTURE, "questions.json"), "--vqa-annotations",
       os.path.join(FIXTURE, "annotations.json"), "--vqa-images", os.path.join(FIXTURE, "images")]
VIT = "vit_tiny_patch16_224"


def vit_file(path, seed: int, name: str = VIT):
    """A timm ViT with random weights, saved as a local weights file (what --vit-weights reads)."""
    torch.manual_seed(seed)
    torch.save(timm.create_model(name, num_classes=0).state_dict(), path)
    return str(path)


def run(out, weights, *extra):
    train.main(["--preset", "tiny", "--threads", "1", "--epochs", "2", "--exit-epochs", "1", "--no-final-eval",
                "--out", str(out), *VQA, "--vit", VIT, "--vit-weights", weights, "--freeze-vit", *extra])


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """Stage 1 and stage 2 with a frozen timm encoder read from a local file."""
    tmp = tmp_path_factory.mktemp("frozen")
    weights = vit_file(tmp / "vit.pth", seed=0)
    run(tmp / "out", weights)
    return tmp, weights


def test_frozen_encoder_weights_are_unchanged_after_both_stages(frozen_run):
    tmp, weights = frozen_run
    state = torch.load(tmp / "out" / "ckpt.pt", weights_only=False)
    original = torch.load(weights)
    assert "exits" in state and state["model_config"]["image_size"] == 224      # timm's own input size
    assert all(torch.equal(state["model"]["vit." + k], v) for k, v in original.items())


def test_cached_tokens_are_the_encoders_and_give_the_images_answers(frozen_run):
    """runtime.cache_patches: each split serves its images' encoder tokens (fp16) in place of the images, and
    the model answers from them as it does from the images."""
    tmp, _ = frozen_run
    model, _, tokenizer, answers, dcfg = build_from_checkpoint(torch.load(tmp / "out" / "ckpt.pt", weights_only=False))
    splits, _, _ = data.load_data(dcfg, tokenizer, answers)
    runtime.cache_patches(model, splits)
    split = splits["train"]
    with torch.no_grad():
        fresh = model.patch_features(split.images.float() / 255.0)                      # (n_img, P, Dv)
        assert split.patches.dtype == torch.float16 and torch.allclose(split.patches.float(), fresh, atol=2e-3, rtol=1e-3)
        ids = torch.arange(len(split))
        assert "patches" in split.batch(ids) and "patches" not in split.batch(ids, raw_images=True)
        from_tokens, from_images = model(**split.batch(ids)), model(**split.batch(ids, raw_images=True))
    assert torch.allclose(from_tokens, from_images, atol=2e-2)


@pytest.mark.parametrize("case", ["unknown name", "weights of another model"])
def test_bad_encoder_input_is_one_line_and_exit_2_before_training(frozen_run, tmp_path, capsys, case):
    _, weights = frozen_run
    name, message = ("vit_no_such_model", "--vit vit_no_such_model: not a timm model name") if case == "unknown name" \
        else (VIT, "does not fit --vit")
    if case != "unknown name":
        weights = vit_file(tmp_path / "small.pth", 0, name="vit_small_patch16_224")
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--out", str(tmp_path / "out"), *VQA, "--vit", name, "--vit-weights", weights,
                    "--freeze-vit"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
