"""model.py: shapes of every stage, the padding mask, local ViT weights."""
import pytest
import torch

from model import VLM, ModelConfig, make_vit

B, T, A = 3, 10, 7


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**(dict(image_size=32, patch_size=8, vit_dim=32, vit_depth=1, vit_heads=2, merge=2, dim=32,
                               depth=3, heads=2, max_text_len=T, vocab_size=50, num_answers=A) | kw))


def inputs(lengths=(10, 4, 7)):
    torch.manual_seed(0)
    tokens = torch.randint(4, 50, (len(lengths), T))
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]   # (B, T)
    tokens[~mask] = 0
    tokens[:, 0] = 2  # [CLS]
    return torch.rand(len(lengths), 3, 32, 32), tokens, mask


def test_shapes_of_each_stage():
    model = VLM(cfg=tiny_cfg()).eval()
    images, tokens, mask = inputs()
    assert model.num_visual == 4  # (32/8/2)^2
    assert model.encode_image(images).shape == (B, 4, 32)
    h, attn_mask = model.embed(images, tokens, mask)
    assert h.shape == (B, T + 4, 32) and attn_mask.shape == (B, 1, 1, T + 4) and attn_mask.dtype == torch.bool
    assert model.layer(0, h, attn_mask).shape == h.shape
    assert model.head(h[:, 0]).shape == (B, A)
    assert model(images, tokens, mask).shape == (B, A)
    states, _ = model.hidden_states(images, tokens, mask)
    assert len(states) == model.depth + 1
    assert torch.allclose(model.head(states[-1][:, 0]), model(images, tokens, mask), atol=1e-6)


def test_padded_batch_equals_unpadded_single_samples():
    """The padding mask works: padding a question changes nothing (True = attend, timm's convention)."""
    model = VLM(cfg=tiny_cfg()).eval()
    images, tokens, mask = inputs()
    with torch.no_grad():
        batched = model(images, tokens, mask)
        for i, n in enumerate(mask.sum(1).tolist()):
            single = model(images[i:i + 1], tokens[i:i + 1, :n], mask[i:i + 1, :n])  # no padding at all
            assert torch.allclose(batched[i], single[0], atol=1e-5), i


def test_a_batch_without_padding_runs_unmasked():
    """With no padding left after the cut to the longest question (always so at batch 1) embed gives no mask,
    and the result is that of an all-True mask; a padded batch keeps its mask."""
    model = VLM(cfg=tiny_cfg()).eval()
    images, tokens, mask = inputs((6, 6, 6))
    with torch.no_grad():
        h, attn_mask = model.embed(images, tokens, mask)
        assert attn_mask is None and h.shape[1] == 6 + model.num_visual
        masked, every = h, torch.ones(3, 1, 1, h.shape[1], dtype=torch.bool)
        for i in range(model.depth):
            masked = model.layer(i, masked, every)
        assert torch.allclose(model.head(masked[:, 0]), model(images, tokens, mask), atol=1e-6)
        assert model.embed(*inputs())[1] is not None


def test_padding_tokens_are_really_ignored():
    """Changing the ids under padding must not change the output (an inverted mask would fail this)."""
    model = VLM(cfg=tiny_cfg()).eval()
    images, tokens, mask = inputs()
    other = tokens.clone()
    other[~mask] = 17
    with torch.no_grad():
        assert torch.allclose(model(images, tokens, mask), model(images, other, mask), atol=1e-6)
        other[1, 1] = 17 if tokens[1, 1] != 17 else 18  # a real token does matter
        assert not torch.allclose(model(images, tokens, mask)[1], model(images, other, mask)[1], atol=1e-6)


def test_vit_loads_a_local_weights_file(tmp_path):
    cfg = tiny_cfg()
    vit = make_vit(cfg)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    loaded = make_vit(tiny_cfg(vit_weights=str(path)))
    for (name, a), (_, b) in zip(vit.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of"):
        VLM(cfg=tiny_cfg(image_size=36))
    with pytest.raises(ValueError, match="num_answers"):
        VLM(cfg=tiny_cfg(num_answers=0))
