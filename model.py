"""The plain vision-language model: a BLIP-2 in miniature, with no exits and no training code.

Paper: FREE (Bajpai & Hanawal, ACL Findings 2025) adds early exits to a frozen BLIP-2, whose image goes
through a ViT, is compressed by a Q-Former into a few visual tokens, and is read by a language model.
Our miniature keeps that shape, trained from scratch on VQA-as-classification (train.py, stage 1):

    image (B, 3, H, W) --timm ViT--> patch tokens (B, P, Dv) --merge k x k + linear--> visual tokens (B, N, D)
    [CLS] + question tokens (B, T, D) ++ visual tokens          --> sequence h_0 (B, S = T + N, D)
    h_l = Block_l(h_{l-1}) for l = 1..L   (the "language model": timm pre-norm transformer blocks)
    logits = head(norm(h_L[:, 0]))        (the answer classifier reads the [CLS] feature)

NOTE (deviation): BLIP-2's language model is a causal LLM that *generates* answers; ours is a bidirectional
encoder that *classifies* them over a fixed answer vocabulary, as VQA classification baselines do. The
[CLS] feature plays the role of the LLM's answer-token state, and `head` plays the frozen LM head.
NOTE (deviation): the Q-Former is replaced by a learned k x k patch merge (concatenate neighbours, project),
which also shrinks the visual tokens the language model must read (64 -> 16 at the defaults).

The language model dominates the compute (the ViT is one narrow block), because exits can only skip
language-model layers, as in the paper. `embed`, `layer` and `head` are what free_min.py builds exits on.
"""
import math
import os
from dataclasses import dataclass, field
from functools import partial

import timm
import torch
import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models.vision_transformer import Block


@dataclass
class ModelConfig:
    image_size: int = field(default=64, metadata={"help": "input image side in pixels (set from the data config)", "flag": False})
    patch_size: int = field(default=8, metadata={"help": "pixels per side of one ViT token (the stem's stride)"})
    stem: str = field(default="conv", metadata={"help": "ViT token embedding: conv (a small strided conv stem, which "
                                                        "trains much faster) or patch (the plain linear patch embedding)",
                                                "choices": ["conv", "patch"]})
    vit_dim: int = field(default=64, metadata={"help": "ViT width"})
    vit_depth: int = field(default=1, metadata={"help": "ViT blocks (kept light: exits cannot skip them)"})
    vit_heads: int = field(default=2, metadata={"help": "ViT attention heads"})
    vit: str = field(default="", metadata={"help": "a timm ViT by name (e.g. vit_tiny_patch16_224) in place of the built-in "
                                               "small one; its input size and normalisation come from timm's data config"})
    vit_weights: str = field(default="", metadata={"help": "local weights file for the ViT (never downloaded)"})
    vit_pretrained: bool = field(default=False, metadata={"help": "with --vit: let timm download its pretrained weights "
                                                                   "(the one flag that reaches the network)"})
    vit_image_size: int = field(default=0, metadata={"help": "with --vit: input size in pixels (0 = the encoder's own; "
                                                             "timm resamples its position embeddings)"})
    freeze_vit: bool = field(default=False, metadata={"help": "freeze the image encoder: stage 1 trains the bridge and the "
                                                               "language model only, and its tokens are computed once per "
                                                               "image and cached on disk"})
    merge: int = field(default=2, metadata={"help": "merge k x k neighbouring patch tokens into one visual token"})
    dim: int = field(default=128, metadata={"help": "language-model width D"})
    depth: int = field(default=8, metadata={"help": "language-model layers L (the layers exits can skip)"})
    heads: int = field(default=4, metadata={"help": "language-model attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden size / D in every block"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the language-model blocks"})
    max_text_len: int = field(default=24, metadata={"help": "question tokens (set from the data config)", "flag": False})
    vocab_size: int = field(default=0, metadata={"help": "tokenizer vocabulary (set from the tokenizer)", "flag": False})
    num_answers: int = field(default=0, metadata={"help": "answer vocabulary A (set from the data)", "flag": False})
    pixel_mean: tuple = field(default=(0.5, 0.5, 0.5), metadata={"help": "image normalisation (from timm with --vit)",
                                                                 "flag": False})
    pixel_std: tuple = field(default=(0.25, 0.25, 0.25), metadata={"help": "image normalisation (from timm with --vit)",
                                                                   "flag": False})


def check_model_config(cfg: ModelConfig) -> None:
    """Refuse an architecture that cannot be built, naming the flag at fault (ValueError). Called by VLM and,
    before any data is made, by train.py, so a bad flag costs seconds, not a training run."""
    for name in ("patch_size", "vit_dim", "vit_heads", "merge", "dim", "depth", "heads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.vit_depth < 0:
        raise ValueError(f"--vit-depth must be >= 0 (0 = the stem's tokens only; got {cfg.vit_depth})")
    if not cfg.vit and cfg.stem == "conv" and cfg.patch_size != 2 ** round(math.log2(cfg.patch_size)):
        raise ValueError(f"--patch-size {cfg.patch_size}: the conv stem halves the image log2(patch size) times, "
                         f"so it needs a power of two (2, 4, 8, 16)")
    if cfg.image_size % (cfg.patch_size * cfg.merge):
        what = f"the {cfg.image_size} px input of --vit {cfg.vit}" if cfg.vit else f"--image-size {cfg.image_size}"
        raise ValueError(f"{what} is not a multiple of patch size x --merge = {cfg.patch_size} x {cfg.merge}: "
                         f"the token grid must split into {cfg.merge} x {cfg.merge} groups")
    if cfg.dim % cfg.heads or cfg.vit_dim % cfg.vit_heads:
        bad = ("--dim", cfg.dim, "--heads", cfg.heads) if cfg.dim % cfg.heads else ("--vit-dim", cfg.vit_dim, "--vit-heads", cfg.vit_heads)
        raise ValueError(f"{bad[0]} {bad[1]} is not divisible by {bad[2]} {bad[3]}")
    if cfg.mlp_ratio <= 0 or not 0 <= cfg.dropout < 1:
        raise ValueError(f"--mlp-ratio must be > 0 and --dropout in [0, 1) (got {cfg.mlp_ratio}, {cfg.dropout})")
    if cfg.vit_weights and not os.path.isfile(cfg.vit_weights):
        raise ValueError(f"--vit-weights {cfg.vit_weights}: file not found")
    if (cfg.vit_pretrained or cfg.vit_image_size) and not cfg.vit:
        raise ValueError("--vit-pretrained and --vit-image-size go with --vit NAME (a timm ViT)")
    if cfg.vit_pretrained and cfg.vit_weights:
        raise ValueError("give --vit-pretrained (download) or --vit-weights FILE (local), not both")
    if cfg.vit_image_size < 0:
        raise ValueError(f"--vit-image-size must be >= 0 (got {cfg.vit_image_size})")


def conv_stem(patch_size: int, width: int) -> nn.Module:
    """log2(patch_size) stride-2 3x3 conv + BN + ReLU layers: (B, 3, H, W) -> (B, width, H/p, W/p).
    NOTE (deviation): BLIP-2's ViT embeds linear patches; a conv stem (Xiao et al. 2021, "Early convolutions
    help transformers see better") makes a tiny ViT trained from scratch learn shapes in minutes, not hours."""
    layers, c_in = [], 3
    for i in range(int(math.log2(patch_size))):
        c_out = width if i == int(math.log2(patch_size)) - 1 else max(16, width // 2)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers)


def make_vit(cfg: ModelConfig) -> nn.Module:
    """The image encoder, a timm ViT without a head: the built-in small one (random init, or --vit-weights),
    or the timm model --vit names (random init, --vit-weights, or timm's download with --vit-pretrained)."""
    if cfg.vit:
        kwargs = dict(num_classes=0, img_size=cfg.image_size)
        name = cfg.vit
    else:
        # fc_norm=False: the final LayerNorm is applied to every token in forward_features (not after pooling)
        kwargs = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_dim, depth=cfg.vit_depth,
                      num_heads=cfg.vit_heads, num_classes=0, class_token=False, global_pool="avg", fc_norm=False)
        if cfg.stem == "conv":
            # timm's HybridEmbed runs the CNN, then a 1x1 projection to the ViT width: one token per stem output pixel
            kwargs |= dict(patch_size=1, embed_layer=partial(HybridEmbed, backbone=conv_stem(cfg.patch_size, cfg.vit_dim)))
        name = "vit_tiny_patch16_224"
    if cfg.vit_weights:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=cfg.vit_weights), **kwargs)
    return timm.create_model(name, pretrained=cfg.vit_pretrained, **kwargs)


def describe_timm_vit(name: str, image_size: int = 0) -> dict:
    """What the pipeline needs to know of timm ViT `name`, from timm itself (a randomly initialised instance:
    nothing is downloaded): its input size (or `image_size`), patch size, width, and its data config's
    normalisation, resize interpolation and crop."""
    vit = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": image_size} if image_size else {}))
    data = timm.data.resolve_data_config({}, model=vit)
    size = image_size or data["input_size"][-1]
    return {"image_size": size, "patch_size": vit.patch_embed.patch_size[0], "vit_dim": vit.embed_dim,
            "pixel_mean": tuple(data["mean"]), "pixel_std": tuple(data["std"]), "crop_pct": data["crop_pct"],
            "interpolation": data["interpolation"]}


class VLM(nn.Module):
    def __init__(self, *, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        if cfg.vocab_size < 1 or cfg.num_answers < 1:
            raise ValueError("ModelConfig.vocab_size and num_answers must be set from the data")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size            # patches per side
        self.num_visual = (self.grid // cfg.merge) ** 2          # N visual tokens
        self.vit = make_vit(cfg)
        if cfg.freeze_vit:
            self.vit.requires_grad_(False)
        self.visual_proj = nn.Linear(self.vit.embed_dim * cfg.merge ** 2, cfg.dim)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.dim))
        self.visual_pos = nn.Parameter(torch.zeros(1, self.num_visual, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads, cfg.mlp_ratio, qkv_bias=True, proj_drop=cfg.dropout,
                                           attn_drop=cfg.dropout) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.classifier = nn.Linear(cfg.dim, cfg.num_answers)
        self.init_language_model()
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        """A frozen image encoder stays in eval mode (its BatchNorm/dropout must not change either)."""
        super().train(mode)
        if self.cfg.freeze_vit:
            self.vit.eval()
        return self

    def init_language_model(self) -> None:
        """Init of everything but the (timm-initialised) ViT: unit-scale input tokens, GPT-2 style blocks.

        Blocks: N(0, 0.02) weights, zero biases, residual output projections scaled by 1/sqrt(2L), so that at
        init every block adds a small update to the residual stream. Input tokens: word embeddings N(0, 1)
        and visual tokens projected to unit scale (the ViT's output is layer-normed, so a projection with
        std 1/sqrt(fan_in) keeps it at ~1 per dimension); position embeddings stay small (0.02).

        Why unit-scale tokens (the cause of a slow start we measured): a pre-norm block normalises its
        input, so its update has a fixed size (~0.01-0.03 per dimension here) whatever the size of the
        token. With tokens as small as that update (N(0, 0.02) embeddings, as in GPT-2), the first blocks'
        attention, which at init averages over all tokens, washes out what each token is, and the layers
        above see nearly identical tokens: grounding a word in the image then waits for the blocks to
        learn to preserve the tokens first. With ground-truth colour/shape features in place of the ViT,
        `query_color` questions alone reach 98-100 % val accuracy in 300 steps with unit-scale tokens,
        and 38-43 % after 400 steps with 0.02-scale tokens."""
        for module in [self.visual_proj, self.classifier, *self.blocks]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.fc2):
                nn.init.trunc_normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        nn.init.trunc_normal_(self.visual_proj.weight, std=1.0 / math.sqrt(self.visual_proj.in_features))
        nn.init.trunc_normal_(self.text_pos, std=0.02)
        nn.init.trunc_normal_(self.visual_pos, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> ViT tokens (B, P, Dv), P = (H / patch_size)^2 (a timm ViT's class
        or register tokens, if it has any, are dropped: the language model reads the patch grid)."""
        tokens = self.vit.forward_features((images - self.pixel_mean) / self.pixel_std)   # (B, prefix + P, Dv)
        return tokens[:, self.vit.num_prefix_tokens:]                                       # (B, P, Dv)

    def encode_image(self, images: torch.Tensor | None, patches: torch.Tensor | None = None) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1], or their ViT tokens `patches` (B, P, Dv) (e.g. cached ones of a
        frozen encoder; then images may be None) -> visual tokens (B, N, D)."""
        x = self.patch_features(images) if patches is None else patches  # (B, P, Dv)
        B, _, Dv = x.shape
        g, k = self.grid, self.cfg.merge
        x = x.view(B, g // k, k, g // k, k, Dv)                     # (B, g/k, k, g/k, k, Dv)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, self.num_visual, k * k * Dv)  # (B, N, k*k*Dv)
        return self.visual_proj(x) + self.visual_pos                 # (B, N, D)

    def embed(self, images: torch.Tensor | None, tokens: torch.Tensor, text_mask: torch.Tensor, patches=None):
        """Initial hidden states of the language model.

        images (B, 3, H, W) (or None with patches (B, P, Dv), their ViT tokens), tokens (B, T) with [CLS]
        first, text_mask (B, T) bool (True = real token).
        Returns h_0 (B, S, D) and attn_mask (B, 1, 1, S) bool, True = may be attended (timm's convention), or
        None when no token of the batch is padding (always at batch 1).
        Text is cut to the longest question in the batch, so padding costs nothing when it is not needed;
        and with no padding left there is nothing to mask: every layer then runs unmasked attention, the
        same result for less work (a masked call first turns the boolean mask into an additive one).
        """
        shortest, longest = text_mask.sum(dim=1).aminmax()         # real tokens of the shortest / longest question
        t = int(longest)
        tokens, text_mask = tokens[:, :t], text_mask[:, :t]          # (B, T')
        text = self.tok_emb(tokens) + self.text_pos[:, :t]           # (B, T', D)
        visual = self.encode_image(images, patches)                  # (B, N, D)
        h = torch.cat([text, visual], dim=1)                         # (B, S, D), S = T' + N
        if int(shortest) == t:
            return h, None
        visual_mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=h.device)
        mask = torch.cat([text_mask, visual_mask], dim=1)            # (B, S)
        return h, mask[:, None, None, :]                             # (B, 1, 1, S)

    def layer(self, i: int, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Language-model layer i (0-based): (B, S, D) -> (B, S, D)."""
        return self.blocks[i](h, attn_mask=attn_mask)

    def head(self, h_cls: torch.Tensor) -> torch.Tensor:
        """Final norm + answer classifier on [CLS] features: (B, D) -> logits (B, A)."""
        return self.classifier(self.norm(h_cls))

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor, text_mask: torch.Tensor, patches=None) -> torch.Tensor:
        """The full model: logits (B, A). `patches` = precomputed patch_features(images), if at hand."""
        h, attn_mask = self.embed(images, tokens, text_mask, patches)
        for i in range(self.depth):
            h = self.layer(i, h, attn_mask)
        return self.head(h[:, 0])

    def hidden_states(self, images: torch.Tensor | None, tokens: torch.Tensor, text_mask: torch.Tensor, patches=None):
        """Every layer's hidden states: list of L+1 tensors (B, S, D) (h_0..h_L) and the attention mask (or None)."""
        h, attn_mask = self.embed(images, tokens, text_mask, patches)
        states = [h]
        for i in range(self.depth):
            h = self.layer(i, h, attn_mask)
            states.append(h)
        return states, attn_mask


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d (the conv stem's) into that convolution, in place, and
    return the model. For inference copies only (eval mode; never train the result).

    In eval mode BN(conv(x)) = g * (w * x + c - mean) / sqrt(var + eps) + b = w' * x + c', with
    w' = w * g / sqrt(var + eps) and c' = b + (c - mean) * g / sqrt(var + eps): the same outputs (up to float
    rounding) for one operation instead of two. This trims the image encoder, a fixed cost that early exit
    cannot skip, for the full model and the early-exit model alike."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)                      # (C_out,)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True).to(conv.weight.device)
            fused.weight.copy_(conv.weight * scale[:, None, None, None])                 # (C_out, C_in, k, k)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
            seq[i], seq[i + 1] = fused, nn.Identity()
    return model.eval()
