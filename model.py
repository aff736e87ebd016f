"""The plain vision-language model: a BLIP-2 in miniature, with no exits and no training code.

Paper: FREE (Bajpai & Hanawal, ACL Findings 2025) adds early exits to a frozen BLIP-2, whose image
goes through a ViT, is compressed by a Q-Former into a few visual tokens, and is read by a language
model. Our miniature keeps that shape, trained from scratch on VQA-as-classification (train.py,
stage 1):

    image (B, 3, H, W) --timm ViT--> patch tokens (B, P, Dv)
                       --merge k x k + linear--> visual tokens (B, N, D)
    [CLS] + question tokens (B, T, D) ++ visual tokens          --> sequence h_0 (B, S = T + N, D)
    h_l = Block_l(h_{l-1}) for l = 1..L   (the "language model": pre-norm transformer layers)
    logits = head(norm(h_L[:, 0]))        (the answer classifier reads the [CLS] feature)

NOTE (deviation): BLIP-2's language model is a causal LLM that *generates* answers; ours is a
bidirectional encoder that *classifies* them over a fixed answer vocabulary, as VQA classification
baselines do. The [CLS] feature plays the role of the LLM's answer-token state, and `head` plays the
frozen LM head.
NOTE (deviation): the Q-Former is replaced by a learned k x k patch merge (concatenate neighbours,
project), which also shrinks the visual tokens the language model must read (64 -> 16 at the
defaults).

The language model dominates the compute (the ViT is one narrow block), because exits can only skip
language-model layers, as in the paper. `embed`, `layer` and `head` are what free_min.py builds
exits on.

Public: ModelConfig, check_model_config, VLM (patch_features, hidden_states, embed, layer, head,
text_pos, visual_pos), Block, soft_cross_entropy, make_vit, describe_timm_vit.
"""

import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.config import flag


@dataclass
class ModelConfig:
    # input side in pixels (from the data)
    image_size: int = field(default=64, metadata={"flag": False})
    patch_size: int = 8  # pixels per side of one ViT token (the conv stem's stride)
    vit_dim: int = 64  # ViT width
    vit_depth: int = 1  # ViT blocks (kept light: exits cannot skip them)
    vit_heads: int = 2  # ViT attention heads
    # a timm ViT by name (e.g. vit_small_patch16_224) in place of the built-in one; its input size
    # and normalisation come from timm
    vit: str = ""
    vit_weights: str = ""  # local weights file for --vit (never downloaded)
    # with --vit: let timm download its pretrained weights (the one flag that reaches the network)
    vit_pretrained: bool = False
    # freeze the image encoder (as BLIP-2 does): its tokens are computed once per image and stage 1
    # trains the rest
    freeze_vit: bool = False
    merge: int = 2  # merge k x k neighbouring ViT tokens into one visual token
    dim: int = 128  # language-model width D
    depth: int = 8  # language-model layers L (the layers exits can skip)
    heads: int = 4  # language-model attention heads
    # question tokens (from the data)
    max_text_len: int = field(default=24, metadata={"flag": False})
    # tokenizer vocabulary (from the data)
    vocab_size: int = field(default=0, metadata={"flag": False})
    # answer vocabulary A (from the data)
    num_answers: int = field(default=0, metadata={"flag": False})
    # image normalisation (mean and std)
    pixel_mean: tuple = field(default=(0.5, 0.5, 0.5), metadata={"flag": False})
    pixel_std: tuple = field(default=(0.25, 0.25, 0.25), metadata={"flag": False})


def check_model_config(cfg: ModelConfig) -> None:
    """Refuse an architecture that cannot be built, naming the flag at fault (ValueError)."""
    for name in ("patch_size", "vit_dim", "vit_heads", "merge", "dim", "depth", "heads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1 "
                             f"(got {getattr(cfg, name)})")
    if cfg.vit_depth < 0:
        raise ValueError(f"--vit-depth must be >= 0 (got {cfg.vit_depth})")
    if not cfg.vit and cfg.patch_size != 2 ** round(math.log2(cfg.patch_size)):
        raise ValueError(f"--patch-size {cfg.patch_size}: the conv stem halves the image "
                         f"log2(patch size) times, so it needs a power of two (2, 4, 8, 16)")
    if cfg.image_size % (cfg.patch_size * cfg.merge):
        what = f"--image-size {cfg.image_size}"
        if cfg.vit:
            what = f"the {cfg.image_size} px input of --vit {cfg.vit}"
        raise ValueError(f"{what} is not a multiple of patch size x --merge = {cfg.patch_size} x "
                         f"{cfg.merge}")
    for width, heads in (("dim", "heads"), ("vit_dim", "vit_heads")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise ValueError(f"{flag(width)} {getattr(cfg, width)} is not divisible "
                             f"by {flag(heads)} {getattr(cfg, heads)}")
    if cfg.vit_weights and not os.path.isfile(cfg.vit_weights):
        raise ValueError(f"--vit-weights {cfg.vit_weights}: file not found")
    if (cfg.vit_pretrained or cfg.vit_weights) and not cfg.vit:
        raise ValueError("--vit-pretrained and --vit-weights go with --vit NAME (a timm ViT)")
    if cfg.vit_pretrained and cfg.vit_weights:
        raise ValueError("give --vit-pretrained (download) or --vit-weights FILE (local), not both")


def conv_stem(patch_size: int, width: int) -> nn.Module:
    """log2(patch_size) stride-2 3x3 conv + BN + ReLU layers: (B, 3, H, W) -> (B, width, H/p, W/p).
    NOTE (deviation): BLIP-2's ViT embeds linear patches; a conv stem (Xiao et al. 2021, "Early
    convolutions help transformers see better") lets a tiny ViT trained from scratch learn shapes
    far sooner."""
    layers, c_in, n = [], 3, int(math.log2(patch_size))
    for i in range(n):
        c_out = width if i == n - 1 else max(16, width // 2)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers)


def make_vit(cfg: ModelConfig) -> nn.Module:
    """The image encoder, a timm ViT without a head: the built-in small one (conv stem, random
    init), or the timm model --vit names (random init, --vit-weights, or timm's download with
    --vit-pretrained)."""
    import timm                # here: its import takes seconds that -h and a bad flag need not wait
    from timm.layers import HybridEmbed
    if cfg.vit:
        pretrained = cfg.vit_pretrained or bool(cfg.vit_weights)
        overlay = dict(pretrained_cfg_overlay=dict(file=cfg.vit_weights)) if cfg.vit_weights else {}
        return timm.create_model(cfg.vit, pretrained=pretrained, num_classes=0,
                                 img_size=cfg.image_size, **overlay)
    # HybridEmbed runs the CNN, then a 1x1 projection to the ViT width: one token per stem output
    # pixel. fc_norm=False: the final LayerNorm is applied to every token in forward_features.
    stem = partial(HybridEmbed, backbone=conv_stem(cfg.patch_size, cfg.vit_dim))
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=cfg.image_size,
                             patch_size=1, embed_layer=stem, embed_dim=cfg.vit_dim,
                             depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0,
                             class_token=False, global_pool="avg", fc_norm=False)


def describe_timm_vit(name: str) -> dict:
    """What the pipeline needs to know of timm ViT `name`, from timm itself (a randomly
    initialised instance: nothing is downloaded): input size, patch size, width, and its data
    config's normalisation and resize."""
    import timm
    vit = timm.create_model(name, pretrained=False, num_classes=0)
    data = timm.data.resolve_data_config({}, model=vit)
    return {"image_size": data["input_size"][-1], "patch_size": vit.patch_embed.patch_size[0],
            "vit_dim": vit.embed_dim, "pixel_mean": tuple(data["mean"]),
            "pixel_std": tuple(data["std"]), "crop_pct": data["crop_pct"],
            "interpolation": data["interpolation"]}


class Block(nn.Module):
    """One pre-norm transformer layer of the language model:

        x = x + Attn(LN1(x), mask);    x = x + MLP(LN2(x))

    With cls_only=True it computes row 0 ([CLS]) alone: that row's query attends to every row's
    key and value, so the result equals row 0 of the full layer. An exit needs no more
    (free_min.ExitLayer), since the answer head reads [CLS] alone. Parameter names and arithmetic
    are those of timm's ViT Block without dropout (tests/test_model.py compares the two); timm's
    Block computes every row, hence this one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cls_only: bool = False) -> torch.Tensor:
        """x (B, S, D), attn_mask (B, 1, 1, S) bool (True = may be attended) or None
        -> (B, S, D), or (B, 1, D)."""
        B, S, D = x.shape
        # (B, S, 3, H, hd)
        qkv = self.attn["qkv"](self.norm1(x)).view(B, S, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                     # 3 x (B, H, S, hd)
        if cls_only:
            x, q = x[:, :1], q[:, :, :1]                                  # (B, 1, D), (B, H, 1, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)            # (B, H, S', hd)
        x = x + self.attn["proj"](a.transpose(1, 2).reshape(B, x.shape[1], D))          # (B, S', D)
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x))))              # (B, S', D)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft VQA targets (B, A), each row normalised to a distribution. Rows
    with no answer inside the vocabulary (all-zero targets) are left out of the mean, so they do not
    dilute it.
    NOTE (deviation): many VQA classifiers use per-answer BCE; a softmax suits single-answer
    shapes data and gives stage 2's CE term the shape of its distillation term."""
    mass = targets.sum(dim=1, keepdim=True)                                    # (B, 1)
    t = targets / mass.clamp_min(1e-12)                           # (B, A); rows without one stay 0
    per_row = -(t * F.log_softmax(logits.float(), dim=1)).sum(dim=1)           # (B,), 0 there
    # the mean over the rows with an answer (0, still backpropagating, where none has one); no
    # boolean index, so nothing waits for the device
    return per_row.sum() / (mass > 0).sum().clamp_min(1)


class VLM(nn.Module):
    def __init__(self, *, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        if cfg.vocab_size < 1 or cfg.num_answers < 1:
            raise ValueError("ModelConfig.vocab_size and num_answers must be set from the data")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size            # ViT tokens per side
        self.num_visual = (self.grid // cfg.merge) ** 2          # N visual tokens
        self.vit = make_vit(cfg)
        self.vit.requires_grad_(not cfg.freeze_vit)
        self.visual_proj = nn.Linear(self.vit.embed_dim * cfg.merge ** 2, cfg.dim)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.dim))
        self.visual_pos = nn.Parameter(torch.zeros(1, self.num_visual, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.classifier = nn.Linear(cfg.dim, cfg.num_answers)
        self.init_language_model()
        mean, std = torch.tensor(cfg.pixel_mean), torch.tensor(cfg.pixel_std)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        """A frozen image encoder stays in eval mode (its BatchNorm statistics must not move
        either)."""
        super().train(mode)
        if self.cfg.freeze_vit:
            self.vit.eval()
        return self

    def init_language_model(self) -> None:
        """Init of everything but the (timm-initialised) ViT: GPT-2 style blocks, unit-scale input
        tokens.

        Blocks: N(0, 0.02) weights, zero biases, residual output projections scaled by
        1/sqrt(2L), so that every block adds a small update to the residual stream. Input tokens:
        word embeddings N(0, 1), visual tokens projected to unit scale (the ViT's output is
        layer-normed, so std 1/sqrt(fan_in) keeps ~1 per dimension); position embeddings small
        (0.02). Why unit scale: a pre-norm block's update has a fixed size whatever the token's,
        and with tokens as small as that update, the first blocks' attention (which at init
        averages over all tokens) washes out what each token is (RESULTS.md, 2026-11-28)."""
        for module in [self.visual_proj, self.classifier, *self.blocks]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn["proj"], block.mlp["fc2"]):
                nn.init.trunc_normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        visual_std = 1.0 / math.sqrt(self.visual_proj.in_features)
        nn.init.trunc_normal_(self.visual_proj.weight, std=visual_std)
        nn.init.trunc_normal_(self.text_pos, std=0.02)
        nn.init.trunc_normal_(self.visual_pos, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> ViT tokens (B, P, Dv), P = (H / patch_size)^2 (a timm
        ViT's class or register tokens are dropped: the language model reads the patch grid)."""
        # (B, prefix + P, Dv)
        tokens = self.vit.forward_features((images - self.pixel_mean) / self.pixel_std)
        return tokens[:, self.vit.num_prefix_tokens:]                                   # (B, P, Dv)

    def encode_image(self, images: torch.Tensor | None,
                     patches: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W), or their ViT tokens `patches` (B, P, Dv) -> visual tokens (B, N,
        D)."""
        x = self.patch_features(images) if patches is None else patches     # (B, P, Dv)
        B, _, Dv = x.shape
        g, k = self.grid, self.cfg.merge
        x = x.view(B, g // k, k, g // k, k, Dv)                            # (B, g/k, k, g/k, k, Dv)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, self.num_visual, k * k * Dv)   # (B, N, k*k*Dv)
        return self.visual_proj(x) + self.visual_pos                          # (B, N, D)

    def embed(self, images, tokens: torch.Tensor, text_mask: torch.Tensor, patches=None):
        """h_0 (B, S, D) and attn_mask (B, 1, 1, S) bool (True = may be attended), or None when
        no token of the batch is padding (always so at batch 1). images (B, 3, H, W) or None with
        patches (B, P, Dv); tokens (B, T) with [CLS] first; text_mask (B, T) bool, True = real
        token. The text is cut to the batch's longest question, and with no padding left nothing
        needs masking: the same result for less work (a masked attention call first turns the
        boolean mask into an additive one)."""
        shortest, t = torch.stack(text_mask.sum(dim=1).aminmax()).tolist()   # one host read
        text = self.tok_emb(tokens[:, :t]) + self.text_pos[:, :t]           # (B, T', D)
        visual = self.encode_image(images, patches)                          # (B, N, D)
        h = torch.cat([text, visual], dim=1)                                 # (B, S, D), S = T' + N
        if shortest == t:
            return h, None
        mask = F.pad(text_mask[:, :t], (0, visual.shape[1]), value=True)    # (B, S)
        return h, mask[:, None, None, :]                                     # (B, 1, 1, S)

    def layer(self, i: int, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Language-model layer i (0-based): (B, S, D) -> (B, S, D)."""
        return self.blocks[i](h, attn_mask)

    def head(self, h_cls: torch.Tensor) -> torch.Tensor:
        """Final norm + answer classifier on [CLS] features: (B, D) -> logits (B, A)."""
        return self.classifier(self.norm(h_cls))

    def hidden_states(self, images, tokens: torch.Tensor, text_mask: torch.Tensor, patches=None):
        """Every layer's hidden states, h_0..h_L (L+1 tensors (B, S, D)), and the attention mask
        (or None)."""
        h, attn_mask = self.embed(images, tokens, text_mask, patches)
        states = [h]
        for i in range(self.depth):
            states.append(self.layer(i, states[-1], attn_mask))
        return states, attn_mask

    def forward(self, images, tokens: torch.Tensor, text_mask: torch.Tensor,
                patches=None) -> torch.Tensor:
        """The full model: logits (B, A). `patches` = patch_features(images), if at hand."""
        h, attn_mask = self.embed(images, tokens, text_mask, patches)
        for i in range(self.depth):
            h = self.layer(i, h, attn_mask)
        return self.head(h[:, 0])
