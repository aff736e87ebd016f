"""Everything FREE adds to the plain VLM: exits, the discriminator, the GAN + distillation losses, and
the early-exit forward. This file reads like the method section of the paper.

FREE (Bajpai & Hanawal, ACL Findings 2025), as this project implements it (see README "paper <-> code"):

* Exit k sits after language-model layer l_k. It is one transformer layer G_k (same block type and width
  as the language model) applied to the hidden states h_{l_k}, followed by the backbone's *frozen* final
  norm + answer head, shared by all exits (the paper reuses the frozen LM head). G_k is the *generator*:
  it should map h_{l_k} to a feature the frozen head can read, i.e. one that looks like the final
  layer's feature h_L.
* A discriminator D (small MLP on [CLS] features) tells real final-layer features h_L from exit features
  G_k(h_{l_k}). Training alternates a D step and a G step on every batch:

    L_D = BCE(D(h_L), 1) + (1/K) sum_k BCE(D(G_k(h_{l_k})), 0)     (real and fake halves weighted equally)
    L_G = sum_k [ lambda_adv * BCE(D(G_k(h_{l_k})), 1)                      (non-saturating GAN loss)
                  + lambda_kd * T^2 * KL(p_L^T || p_k^T)                    (distil the final layer)
                  + lambda_ce * CE(p_k, y) on labelled questions only ]     (semi-supervised setting)

  With no labels (label_fraction = 0) the frozen final layer is the only teacher: FREE is label-free.
* NOTE (deviation): the default adversarial term is feature matching (--adv-loss fm), not the paper's GAN
  loss above (--adv-loss gan). On a trained backbone D wins the paper's game from the start (generator
  loss ~4, D right on ~80 % of real and fake features) and its gradient pulls the exits away from the
  final layer: at the first exit it cost 2.2 points against distillation alone. Feature matching asks, per
  question, that the exit's feature and the final layer's look alike in D's hidden layer: it keeps the
  adversarially trained D but no longer fights distillation (scripts/select_variant.sh; README, Results).
* Inference is input-adaptive: a sample leaves at the first exit whose rule fires (max-prob >= threshold
  in the paper) and stops computing; the rest continue to the final layer.

The backbone (model.py) is frozen throughout: only G_k (and, for --exit-head own, per-exit heads) and D
are trained, in train.py's stage 2.
"""
import copy
import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from data import DataConfig, DataError
from model import VLM, ModelConfig, fold_batchnorm


@dataclass
class ExitConfig:
    exit_layers: str = field(default="", metadata={"help": "comma-separated language-model layers (1-based) that get "
                                                           "an exit; '' = layer 1 and every second layer before the "
                                                           "last (1,2,4,6 for 8 layers; see resolve_exit_layers)"})
    exit_head: str = field(default="shared", metadata={"help": "shared: the backbone's frozen norm + head (the paper); "
                                                                "own: a trainable copy per exit (for comparison)",
                                                        "choices": ["shared", "own"]})
    disc: str = field(default="shared", metadata={"help": "one discriminator for all exits (shared) or one per exit",
                                                   "choices": ["shared", "per-exit"]})
    disc_hidden: int = field(default=256, metadata={"help": "hidden width of the discriminator MLP"})
    disc_input: str = field(default="feature", metadata={"help": "what D judges: feature (the paper: a [CLS] feature, final "
                                                                  "layer = real, exit = fake) or pair (a conditional D: the "
                                                                  "exit's input feature together with the final or exit feature)",
                                                          "choices": ["feature", "pair"]})
    adv_loss: str = field(default="fm", metadata={"help": "generator's adversarial term: gan (non-saturating, the paper's) or "
                                                           "fm (feature matching: the exit and final features of the same "
                                                           "question should look alike in D's hidden layer; the default, "
                                                           "picked by scripts/select_variant.sh, see README)",
                                                    "choices": ["gan", "fm"]})
    disc_reg: str = field(default="none", metadata={"help": "keep D from winning: none, r1 (gradient penalty on real inputs) "
                                                             "or noise (Gaussian instance noise on D's inputs)",
                                                     "choices": ["none", "r1", "noise"]})
    disc_reg_weight: float = field(default=1.0, metadata={"help": "r1: the penalty weight gamma; noise: the noise std"})
    adv_warmup: int = field(default=0, metadata={"help": "stage-2 epochs of distillation/CE only before the adversarial "
                                                          "term is switched on (D trains from the start)"})
    exit_method: str = field(default="free", metadata={"help": "free: adversarial + KD (+ CE on labels); kd: self-"
                                                                "distillation only (FastBERT); ce: labels only (DeeBERT)",
                                                        "choices": ["free", "kd", "ce"]})
    label_fraction: float = field(default=1.0, metadata={"help": "fraction of training questions whose labels the exits "
                                                                  "may see (0 = label-free; ce needs > 0)"})
    lambda_adv: float = field(default=1.0, metadata={"help": "weight of the adversarial (generator) term (free only)"})
    lambda_kd: float = field(default=1.0, metadata={"help": "weight of the distillation term (free and kd)"})
    lambda_ce: float = field(default=1.0, metadata={"help": "weight of the cross-entropy term on labelled questions"})
    temperature: float = field(default=2.0, metadata={"help": "distillation temperature T"})
    exit_epochs: int = field(default=6, metadata={"help": "stage-2 (exit) epochs (on the shipped backbone the first "
                                                          "two exits gained 1.6-3.0 test points from 2 to 6)"})
    exit_lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the exit layers (generators)"})
    disc_lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the discriminator"})


def resolve_exit_layers(spec: str, depth: int) -> list[int]:
    """'2,4,6' -> [2, 4, 6]; '' -> layer 1 and every second layer before the last ([1, 2, 4, 6] for 8 layers).
    Layers are 1-based: exit after layer l.

    Why layer 1 by default: on the shipped backbone, trained for 6 stage-2 epochs, the exit after layer 1 (its
    own transformer layer on h_1, then the frozen head) is as accurate as the final layer (80.4 vs 80.5 % test),
    and at batch 1 a question that leaves there runs one language-model layer instead of two. The exits
    after 2, 4 and 6 catch the questions the first one is unsure of; calibration (infer.calibrate) drops
    the ones that do not pay on the machine at hand."""
    layers = [l for l in [1, *range(2, depth, 2)] if l < depth] if not spec.strip() else []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if not part.isdigit() or not 1 <= int(part) < depth:
            raise ValueError(f"--exit-layers: '{part}' is not a layer between 1 and {depth - 1} "
                             f"(the model has {depth} language-model layers; an exit after the last is the final head)")
        layers.append(int(part))
    if not layers:
        raise ValueError(f"--exit-layers: no exit layer (the model has {depth} language-model layers)")
    return sorted(set(layers))


def written_exit_layers(spec: str, depth: int) -> str:
    """--exit-layers written out ('' -> '1,2,4,6' for 8 layers): what a checkpoint records, so that a later
    change of the default cannot misread it."""
    return ",".join(map(str, resolve_exit_layers(spec, depth)))


def check_exit_config(cfg: ExitConfig, depth: int) -> None:
    """Refuse stage-2 settings that cannot work, naming the flag at fault (ValueError). train.py calls it
    before any data is made or any step is taken."""
    resolve_exit_layers(cfg.exit_layers, depth)
    if not 0.0 <= cfg.label_fraction <= 1.0:
        raise ValueError(f"--label-fraction must be between 0 and 1 (got {cfg.label_fraction})")
    if cfg.exit_method == "ce" and cfg.label_fraction <= 0:
        raise ValueError("--exit-method ce trains on labels only and needs --label-fraction > 0")
    for name in ("temperature", "exit_lr", "disc_lr"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(cfg, name)})")
    for name in ("lambda_adv", "lambda_kd", "lambda_ce"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.disc_reg_weight < 0 or cfg.adv_warmup < 0:
        raise ValueError(f"--disc-reg-weight and --adv-warmup must be >= 0 (got {cfg.disc_reg_weight}, {cfg.adv_warmup})")
    for name in ("exit_epochs", "disc_hidden"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")


def skip_identity(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), without the call where the module is an Identity (timm's blocks hold several): at batch 1 an
    exit costs what its calls cost more than its FLOPs, and an exit should be cheap."""
    return x if isinstance(module, nn.Identity) else module(x)


class ExitLayer(nn.Module):
    """G_k: one transformer block that only computes the [CLS] row.

    Only the [CLS] feature is read by the head, so the block needs queries for [CLS] alone while keys and
    values still come from every token. For a pre-norm block
        x = h_cls + Attn(q = LN1(h_cls), k, v = LN1(h));   out = x + MLP(LN2(x))
    which equals row 0 of the full block, for about (2/3 of qkv + 1/S of the rest) of its cost.

    Initialisation: a copy of the backbone layer that follows the exit (layer l_k + 1). Then at step 0
    G_k(h_{l_k}) = h_{l_k + 1}: the exit starts as "run one more backbone layer", a feature already closer
    to h_L than h_{l_k} is, and the GAN moves it the rest of the way.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = copy.deepcopy(block)
        self.block.requires_grad_(True)   # the copy of a frozen backbone layer is trainable

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """h (B, S, D), attn_mask (B, 1, 1, S) bool (True = attend) or None (no padding) -> [CLS] feature (B, D)."""
        blk, attn = self.block, self.block.attn
        B, S, D = h.shape
        H, hd = attn.num_heads, attn.head_dim
        x = blk.norm1(h)                                                           # (B, S, D)
        w_q, w_kv = attn.qkv.weight[:D], attn.qkv.weight[D:]                       # (D, D), (2D, D)
        b_q, b_kv = (attn.qkv.bias[:D], attn.qkv.bias[D:]) if attn.qkv.bias is not None else (None, None)
        q = F.linear(x[:, :1], w_q, b_q).view(B, 1, H, hd).transpose(1, 2)         # (B, H, 1, hd)
        kv = F.linear(x, w_kv, b_kv).view(B, S, 2, H, hd).permute(2, 0, 3, 1, 4)    # (2, B, H, S, hd)
        k, v = kv.unbind(0)                                                        # (B, H, S, hd) each
        q, k = skip_identity(attn.q_norm, q), skip_identity(attn.k_norm, k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)          # (B, H, 1, hd)
        o = attn.proj(skip_identity(attn.norm, o.transpose(1, 2).reshape(B, 1, D)))  # (B, 1, D)
        x_cls = h[:, :1] + skip_identity(blk.ls1, o)                               # (B, 1, D)
        mlp = blk.mlp                                                              # timm Mlp: fc1, act, (drop, norm,) fc2
        y = mlp.act(mlp.fc1(blk.norm2(x_cls)))                                     # (B, 1, hidden)
        y = mlp.fc2(skip_identity(mlp.norm, skip_identity(mlp.drop1, y)))
        x_cls = x_cls + skip_identity(blk.ls2, skip_identity(mlp.drop2, y))        # (B, 1, D)
        return x_cls[:, 0]                                                         # (B, D)


class Discriminator(nn.Module):
    """D: its input (B, D_in) -> logit (B,) of "this is real". D_in = D for the paper's D (a [CLS] feature
    after the frozen final norm, i.e. exactly what the shared head reads) or 2D for a conditional D (the
    exit's input feature, then the feature). `body` is the hidden layer that feature matching compares."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))[:, 0]


class FREE(nn.Module):
    """A frozen backbone VLM with K exits, their heads and the discriminator(s) that train them."""

    def __init__(self, backbone: VLM, cfg: ExitConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.exit_layers = resolve_exit_layers(cfg.exit_layers, backbone.depth)   # 1-based, K of them
        # layer l (1-based) is blocks[l - 1]; the layer after the exit is blocks[l]
        self.exits = nn.ModuleList([ExitLayer(backbone.blocks[l]) for l in self.exit_layers])
        self.heads = None
        if cfg.exit_head == "own":
            self.heads = nn.ModuleList([nn.Sequential(copy.deepcopy(backbone.norm), copy.deepcopy(backbone.classifier))
                                        for _ in self.exit_layers]).requires_grad_(True)
        n_disc = 1 if cfg.disc == "shared" else len(self.exit_layers)
        in_dim = backbone.cfg.dim * (2 if cfg.disc_input == "pair" else 1)
        self.discs = nn.ModuleList([Discriminator(in_dim, cfg.disc_hidden) for _ in range(n_disc)])

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def train(self, mode: bool = True):
        """The backbone stays in eval mode even while the exits train: it is frozen."""
        super().train(mode)
        self.backbone.eval()
        return self

    def exit_feature(self, k: int, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """G_k on the hidden states after layer l_k: (B, S, D) -> [CLS] feature (B, D)."""
        return self.exits[k](h, attn_mask)

    def exit_logits(self, k: int, feat: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, A) of exit k from its feature: the frozen shared head, or the exit's own."""
        return self.backbone.head(feat) if self.heads is None else self.heads[k](feat)

    def all_outputs(self, images: torch.Tensor | None, tokens: torch.Tensor, text_mask: torch.Tensor, patches=None) -> dict:
        """One backbone pass with every exit read (no early exit): 'states' (L+1 tensors (B, S, D)),
        'attn_mask', 'final' logits (B, A) and 'exits' = K exit logits (B, A). For evaluation and reports."""
        states, attn_mask = self.backbone.hidden_states(images, tokens, text_mask, patches)
        exits = [self.exit_logits(k, self.exit_feature(k, states[l], attn_mask)) for k, l in enumerate(self.exit_layers)]
        return {"states": states, "attn_mask": attn_mask, "final": self.backbone.head(states[-1][:, 0]), "exits": exits}

    def load_exits(self, exits: dict) -> None:
        """Load the exit layers, heads and discriminators train.py saved (everything but the backbone)."""
        missing, unexpected = self.load_state_dict(exits, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if unexpected or missing:
            raise ValueError(f"checkpoint exits do not match their config (exits after layers {self.exit_layers}): "
                             f"missing {missing[:4]}, unexpected {unexpected[:4]}")

    def disc(self, k: int) -> Discriminator:
        return self.discs[0 if len(self.discs) == 1 else k]

    def generator_parameters(self):
        """What the G step trains: the exit layers (and own heads). Never the backbone, never D."""
        params = list(self.exits.parameters())
        return params + (list(self.heads.parameters()) if self.heads is not None else [])


def disc_input(model: FREE, feat: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """What D sees of one [CLS] feature (B, D): the feature after the frozen final norm (the head's input),
    preceded, for a conditional D, by the exit's input feature h_{l_k}[CLS] (layer-normed: (B, 2D)).
    With --disc-reg noise, Gaussian instance noise is added while training (Sonderby et al. 2017)."""
    x = model.backbone.norm(feat)                                                           # (B, D)
    if model.cfg.disc_input == "pair":
        x = torch.cat([F.layer_norm(cond, cond.shape[-1:]), x], dim=1)                      # (B, 2D)
    if model.cfg.disc_reg == "noise" and model.training:
        x = x + model.cfg.disc_reg_weight * torch.randn_like(x)
    return x


def discriminator_loss(model: FREE, real: torch.Tensor, fakes: list[torch.Tensor],
                       conds: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """L_D = (1/K) sum_k [ BCE(D(h_L), 1) + BCE(D(G_k(h_{l_k})), 0) ] (+ R1), fakes detached.

    real (B, D) = h_L[CLS]; fakes = K exit features (B, D); conds = K exit inputs h_{l_k}[CLS] (B, D), read
    by a conditional D only. Each exit contributes one real and one fake term, and one shared D *averages*
    over the K exits, so real and fake weigh the same: summed, the K fake terms outweighed the real one K
    to 1 and D learned to call everything fake (real accuracy near 0), which gave the generators no useful
    signal. (For the paper's unconditional D the K real terms are identical: BCE(D(h_L), 1) + the mean
    fake term.) With one D per exit, D_k sees the real features and its own exit's fakes.
    R1 (--disc-reg r1, Mescheder et al. 2018): + gamma/2 * E ||grad_x D(x_real)||^2, so D stays smooth
    around real features instead of winning by a sharp boundary."""
    share = 1.0 if len(model.discs) > 1 else 1.0 / len(fakes)
    r1 = model.cfg.disc_reg == "r1"
    loss, real_acc, fake_acc = 0.0, 0.0, 0.0
    for k, fake in enumerate(fakes):
        d = model.disc(k)
        x_real, x_fake = disc_input(model, real, conds[k]), disc_input(model, fake.detach(), conds[k])
        if r1:
            x_real = x_real.detach().requires_grad_(True)
        d_real, d_fake = d(x_real), d(x_fake)                                                # (B,), (B,)
        term = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        if r1:
            grad, = torch.autograd.grad(d_real.float().sum(), x_real, create_graph=True)   # (B, D_in)
            term = term + model.cfg.disc_reg_weight / 2 * grad.float().pow(2).sum(dim=1).mean()
        loss = loss + share * term
        real_acc += (d_real > 0).float().mean().item() / len(fakes)
        fake_acc += (d_fake < 0).float().mean().item() / len(fakes)
    return loss, {"d_loss": loss.item(), "d_real_acc": real_acc, "d_fake_acc": fake_acc}


def distillation_loss(exit_logits: torch.Tensor, final_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_L^T || p_k^T): the exit matches the final layer's softened answer distribution."""
    log_p_exit = F.log_softmax(exit_logits.float() / temperature, dim=1)
    p_final = F.softmax(final_logits.float() / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_p_exit, p_final, reduction="batchmean")


def adversarial_term(model: FREE, k: int, fake: torch.Tensor, real: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss for exit k: gan = BCE(D(G_k), 1), the non-saturating GAN loss (the
    paper); fm = feature matching (Salimans et al. 2016), here per question: the mean squared distance
    between D's hidden features of the exit's feature and of the final layer's, for the same question."""
    d = model.disc(k)
    x_fake = disc_input(model, fake, cond)
    if model.cfg.adv_loss == "fm":
        with torch.no_grad():
            target = d.body(disc_input(model, real, cond))                                  # (B, hidden)
        return F.mse_loss(d.body(x_fake).float(), target.float())
    d_fake = d(x_fake)                                                                      # (B,)
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


def generator_loss(model: FREE, fakes: list[torch.Tensor], final_logits: torch.Tensor, targets: torch.Tensor | None,
                   labelled: torch.Tensor, real: torch.Tensor, conds: list[torch.Tensor],
                   adv_weight: float) -> tuple[torch.Tensor, dict]:
    """L_G = sum_k [lambda_adv ADV_k + lambda_kd T^2 KL(p_L^T || p_k^T) + lambda_ce CE(p_k, y)].

    Which terms are on depends on the method: free = adv + kd (+ ce), kd = kd only, ce = ce only.
    targets (B, A) soft labels or None; labelled (B,) bool: the questions whose labels may be used.
    real (B, D) = h_L[CLS] and conds = the K exit inputs h_{l_k}[CLS] feed the adversarial term, weighted
    by adv_weight (lambda_adv, or 0 during the --adv-warmup epochs)."""
    cfg = model.cfg
    use_adv = cfg.exit_method == "free" and adv_weight > 0
    use_kd = cfg.exit_method in ("free", "kd") and cfg.lambda_kd > 0
    use_ce = cfg.exit_method in ("free", "ce") and cfg.lambda_ce > 0 and targets is not None and bool(labelled.any())
    loss, stats = fakes[0].new_zeros(()), {"adv": 0.0, "kd": 0.0, "ce": 0.0}
    for k, fake in enumerate(fakes):
        logits = model.exit_logits(k, fake)                                                   # (B, A)
        if use_adv:
            adv = adversarial_term(model, k, fake, real, conds[k])
            loss, stats["adv"] = loss + adv_weight * adv, stats["adv"] + adv.item()
        if use_kd:
            kd = distillation_loss(logits, final_logits, cfg.temperature)
            loss, stats["kd"] = loss + cfg.lambda_kd * kd, stats["kd"] + kd.item()
        if use_ce:
            t = targets[labelled] / targets[labelled].sum(dim=1, keepdim=True).clamp(min=1e-8)  # (B_lab, A)
            ce = -(t * F.log_softmax(logits[labelled].float(), dim=1)).sum(dim=1).mean()
            loss, stats["ce"] = loss + cfg.lambda_ce * ce, stats["ce"] + ce.item()
    stats["g_loss"] = loss.item()
    return loss, stats


# ----------------------------------------------------------------------------------------------------
# Input-adaptive inference: samples that exit stop computing
# ----------------------------------------------------------------------------------------------------
RULES = ("maxprob", "entropy", "patience")


def rule_fires(rule: str, probs: torch.Tensor, threshold: float, streak: torch.Tensor | None,
               conf: torch.Tensor | None = None) -> torch.Tensor:
    """Which rows leave at this exit. probs (B, A); streak (B,) = consecutive exits (this one included)
    that gave the same answer (patience only); conf (B,) = probs' row maxima, if already at hand.
    Returns (B,) bool.
      maxprob  (FREE, DeeBERT-style): max softmax probability >= threshold
      entropy  (DeeBERT):             entropy / log(A) <= threshold
      patience (PABEE):               the same answer at `threshold` consecutive exits"""
    if rule == "maxprob":
        return (probs.amax(dim=1) if conf is None else conf) >= threshold
    if rule == "entropy":
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1)
        return entropy / math.log(probs.shape[1]) <= threshold
    if rule == "patience":
        return streak >= threshold
    raise ValueError(f"unknown exit rule '{rule}' (choose from {', '.join(RULES)})")


@torch.no_grad()
def early_exit_predict(free: FREE, images: torch.Tensor | None, tokens: torch.Tensor, text_mask: torch.Tensor,
                       rule: str = "maxprob", threshold: float = 0.9, patches: torch.Tensor | None = None,
                       exits: list[int] | None = None) -> dict:
    """Run the language model layer by layer; after layer l_k evaluate exit k on the samples still running,
    answer those whose rule fires and *remove them from the batch*, so later layers run on fewer rows.
    One host sync per exit to count who leaves (and the row selection when a batch splits); when all leave,
    it stops without touching the batch.

    `patches`: the image encoder's tokens, if already at hand (then images may be None). `exits`: indices
    of the exits to evaluate (default: all; an exit that is not evaluated costs nothing, see
    infer.calibrate, which picks them for the machine).
    Returns {'pred': (B,) answer index, 'exit': (B,) exit index (K = the final layer), 'confidence': (B,)
    max softmax probability of the answer given, 'layers': (B,) language-model layers each sample ran}.

    The bookkeeping is kept to a few operations per exit, because at batch 1 on a CPU each operation costs
    about what a small matrix product does: answers are kept per group of leavers (`done`) and put in
    order once at the end, and the running rows are tracked only once a batch has split (`alive`).
    """
    bb, K = free.backbone, free.num_exits
    h, attn_mask = bb.embed(images, tokens, text_mask, patches)        # (B, S, D), (B, 1, 1, S) or None
    B, device = h.shape[0], h.device
    alive = None                                      # original rows still running; None = all B, in order
    done = []                                         # per group that left: (rows or None = all, answer, confidence, exit)
    last = streak = None                              # patience: previous exit's answer, same answer this many exits
    at_layer = {free.exit_layers[k]: k for k in (range(K) if exits is None else exits)}   # layer -> exit evaluated after it
    for i in range(bb.depth):
        h = bb.layer(i, h, attn_mask)                                  # (B_alive, S, D)
        k = at_layer.get(i + 1)
        if k is None:
            continue
        probs = free.exit_logits(k, free.exit_feature(k, h, attn_mask)).float().softmax(dim=1)  # (B_alive, A)
        c, a = probs.max(dim=1)
        if rule == "patience":
            streak = torch.ones_like(a) if last is None else torch.where(a == last, streak + 1, 1)
            last = a
        fire = rule_fires(rule, probs, threshold, streak, conf=c)      # (B_alive,)
        leaving = int(fire.sum())                                      # the one sync of this exit
        if leaving == h.shape[0]:                                      # everyone left: answer and stop
            done.append((alive, a, c, k))
            break
        if leaving:
            rows = fire.nonzero()[:, 0] if alive is None else alive[fire]
            done.append((rows, a[fire], c[fire], k))
            keep = ~fire
            alive = keep.nonzero()[:, 0] if alive is None else alive[keep]
            h = h[keep]
            attn_mask = None if attn_mask is None else attn_mask[keep]
            if rule == "patience":
                last, streak = last[keep], streak[keep]
    else:                                                              # some ran every layer: the final head answers them
        c, a = bb.head(h[:, 0]).float().softmax(dim=1).max(dim=1)      # (B_alive,)
        done.append((alive, a, c, K))
    depth_of = free.exit_layers + [bb.depth]                           # layers run by who leaves at exit k (K = final)
    if len(done) == 1 and done[0][0] is None:                          # one group, in order (always so at batch 1)
        _, pred, conf, k = done[0]
        return {"pred": pred, "exit": torch.full((B,), k, device=device), "confidence": conf,
                "layers": torch.full((B,), depth_of[k], device=device)}
    pred = torch.empty(B, dtype=torch.long, device=device)
    conf, exit_at = torch.empty(B, device=device), torch.empty(B, dtype=torch.long, device=device)
    for rows, a, c, k in done:
        pred[rows], conf[rows], exit_at[rows] = a, c, k
    return {"pred": pred, "exit": exit_at, "confidence": conf,
            "layers": torch.tensor(depth_of, device=device)[exit_at]}


def inference_copy(free: FREE) -> FREE:
    """A copy of `free` for timing and evaluation: eval mode, conv-stem BatchNorms folded into their
    convolutions (model.fold_batchnorm), and convolution weights in channels-last memory layout (the layout
    oneDNN's CPU convolutions and cuDNN run fastest in: on 2 CPU cores the stem of a batch of 64 took about
    a fifth less time). Same answers up to float rounding; used for the full model and early exit alike."""
    copied = copy.deepcopy(free).eval()
    fold_batchnorm(copied.backbone)
    copied.backbone.to(memory_format=torch.channels_last)    # only 4-D tensors (conv weights) change layout
    return copied


def layer_costs(free: FREE, seq_len: float) -> tuple[float, float]:
    """FLOPs per sample of one language-model layer and of one exit (G_k on the [CLS] row + norm + head),
    for a sequence of seq_len tokens. Multiply-adds count 2; norms and softmaxes are left out."""
    D, A = free.backbone.cfg.dim, free.backbone.cfg.num_answers
    hidden = int(D * free.backbone.cfg.mlp_ratio)
    S = seq_len
    layer = 2 * (S * D * 3 * D + 2 * S * S * D + S * D * D + 2 * S * D * hidden)
    exit_ = 2 * (D * D + S * D * 2 * D + 2 * S * D + D * D + 2 * D * hidden + D * A)
    return layer, exit_


def load_checkpoint(path: str, flag: str = "") -> dict:
    """Read a checkpoint written by train.py; DataError (naming the flag and file) if it is missing, unreadable
    or not a free-min checkpoint."""
    where = f"{flag} {path}".strip()
    if not os.path.isfile(path):
        raise DataError(f"{where}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which file, not a traceback
        raise DataError(f"{where}: not a readable checkpoint ({e.__class__.__name__})")
    if not isinstance(state, dict) or not {"model", "model_config", "data_config"} <= set(state):
        raise DataError(f"{where}: not a free-min checkpoint (no backbone weights and configs in it)")
    return state


def build_from_checkpoint(state: dict):
    """Rebuild what a checkpoint holds: (backbone VLM, FREE or None if it has no exits, tokenizer,
    answers, DataConfig). Everything in eval mode."""
    cfg = ModelConfig(**state["model_config"])
    # the weights come from the checkpoint: build without timm's download or the encoder's original weights file
    backbone = VLM(cfg=replace(cfg, vit_pretrained=False, vit_weights=""))
    backbone.cfg = cfg
    backbone.load_state_dict(state["model"])
    backbone.eval()
    free = None
    if "exits" in state:
        free = FREE(backbone, ExitConfig(**state["exit_config"]))
        free.load_exits(state["exits"])
        free.eval()
    return backbone, free, Tokenizer.from_str(state["tokenizer"]), state["answers"], DataConfig(**state["data_config"])
