"""model.py: shapes of every stage, the padding mask, the transformer layer against timm's, local ViT weights."""
import pytest
import torch
from timm.models.vision_transformer import Block as TimmBlock

from model import VLM, Block, ModelConfig, make_vit, soft_cross_entropy

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


def test_block_equals_timms_vit_block_with_the_same_weights():
    """model.Block is timm's ViT Block (pre-norm, GELU MLP, eps 1e-6) under the same parameter names: timm's
    loads its state dict strictly and gives the same output, padded rows masked or not."""
    torch.manual_seed(0)
    ours, theirs = Block(32, 4).eval(), TimmBlock(32, 4, qkv_bias=True).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.3)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 9, 32)
    mask = (torch.arange(9)[None] < torch.tensor([9, 5, 7])[:, None])[:, None, None, :]     # (B, 1, 1, S)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    assert torch.allclose(ours(x, mask), theirs(x, attn_mask=mask), atol=1e-5)


def test_cls_only_block_equals_row_0_of_the_full_block_in_training_too():
    """cls_only computes the [CLS] row alone (queries for it, keys/values for all rows), equal to row 0 of the
    full layer, with and without a padding mask, in train mode as in eval (the block has no dropout)."""
    torch.manual_seed(0)
    block = Block(32, 4).train()
    x = torch.randn(3, 9, 32)
    mask = (torch.arange(9)[None] < torch.tensor([9, 5, 7])[:, None])[:, None, None, :]
    for m in (None, mask):
        assert block(x, m, cls_only=True).shape == (3, 1, 32)
        assert torch.allclose(block(x, m, cls_only=True)[:, 0], block(x, m)[:, 0], atol=1e-6)


def test_soft_cross_entropy_leaves_out_rows_without_a_target():
    """Rows with all-zero targets (no answer in the vocabulary) neither count nor dilute the mean."""
    logits = torch.randn(4, 5)
    targets = torch.zeros(4, 5)
    targets[0, 1], targets[2, 3], targets[2, 4] = 1.0, 0.3, 0.9
    by_hand = -(torch.log_softmax(logits[0], 0)[1] + (0.25 * torch.log_softmax(logits[2], 0)[3]
                                                      + 0.75 * torch.log_softmax(logits[2], 0)[4])) / 2
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert soft_cross_entropy(logits, torch.zeros(4, 5)).item() == 0.0


def test_vit_loads_a_local_weights_file(tmp_path):
    """--vit-weights: a timm ViT built from a local file (no network) holds exactly that file's weights."""
    torch.manual_seed(0)
    reference = make_vit(tiny_cfg(vit="vit_tiny_patch16_224", image_size=32, patch_size=16, merge=1))
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)
    loaded = make_vit(tiny_cfg(vit="vit_tiny_patch16_224", image_size=32, patch_size=16, merge=1, vit_weights=str(path)))
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of"):
        VLM(cfg=tiny_cfg(image_size=36))
    with pytest.raises(ValueError, match="num_answers"):
        VLM(cfg=tiny_cfg(num_answers=0))
