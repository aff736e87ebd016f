"""Everything FREE adds to the plain VLM (model.py): exit layers, the discriminator, the adversarial
and distillation losses, and the early-exit forward. Read it next to the method section of the
paper.

FREE (Bajpai & Hanawal, ACL Findings 2025), as this project implements it:

* Exit k sits after language-model layer l_k. It is one transformer layer G_k applied to the hidden
  states h_{l_k}, then the backbone's *frozen* final norm + answer head, shared by all exits. G_k is
  the *generator*: it should turn h_{l_k} into a feature the frozen head can read, one that looks
  like the final layer's feature h_L.
* A discriminator D (a small MLP on [CLS] features) tells final-layer features h_L (real) from exit
  features G_k(h_{l_k}) (fake). Training alternates a D step and a G step on every batch
  (train.exit_step):

    L_D = BCE(D(h_L), 1) + (1/K) sum_k BCE(D(G_k(h_{l_k})), 0)
    L_G = sum_k [ lambda_adv ADV_k + lambda_kd T^2 KL(p_L^T || p_k^T) + lambda_ce CE(p_k, y) ]

  with ADV_k = BCE(D(G_k(h_{l_k})), 1), the non-saturating GAN loss (--adv-loss gan), and CE on the
  labelled questions only. With no labels (label_fraction = 0) the frozen final layer is the only
  teacher.
* Inference is input-adaptive: a sample leaves at the first exit whose rule fires (max softmax
  probability >= threshold in the paper) and stops computing; the rest go on to the final layer.

The backbone stays frozen throughout: stage 2 (train.py) trains G_k and D only.

Public: ExitConfig, check_exit_config, resolve_exit_layers, FREE (exit_feature, exit_logits,
all_outputs, depths, exits_after), ExitLayer, Discriminator, ADVERSARIAL, METHODS,
discriminator_loss, generator_loss, distillation_loss, RULES, ExitRule, early_exit_predict.
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import VLM, soft_cross_entropy
from util.config import flag


@dataclass
class ExitConfig:
    # comma-separated language-model layers (1-based) that get an exit; '' = layer 1 and every
    # second layer before the last (1,2,4,6 for 8 layers): a first exit as early as possible, then
    # evenly spaced ones
    exit_layers: str = ""
    # free: adversarial + KD (+ CE on labels), the paper's; kd: distillation only (FastBERT); ce:
    # labels only (DeeBERT)
    exit_method: str = field(default="free", metadata={"choices": ["free", "kd", "ce"]})
    # the adversarial term ADV_k: gan (the paper's non-saturating GAN loss) or fm (feature matching
    # on D's hidden layer, the default: both lift the second exit above distillation alone, and fm
    # keeps the first exit where gan loses points; val favours it, RESULTS.md)
    adv_loss: str = field(default="fm", metadata={"choices": ["gan", "fm"]})
    # fraction of training questions whose labels the exits may see (0 = label-free; ce needs > 0)
    label_fraction: float = 1.0
    lambda_adv: float = 1.0  # weight of ADV_k in L_G (the paper weighs its terms equally)
    lambda_kd: float = 1.0  # weight of the distillation term in L_G
    lambda_ce: float = 1.0  # weight of the cross-entropy term in L_G
    temperature: float = 2.0  # distillation temperature T (a common choice for KD)
    exit_epochs: int = 6  # stage-2 epochs (exits trained for 2 were still learning, RESULTS.md)
    exit_lr: float = 5e-4  # AdamW learning rate of the exit layers G_k
    disc_lr: float = 2e-4  # AdamW learning rate of D (with beta1 = 0.5, as in DCGAN)
    # hidden width of the discriminator MLP (twice the default language-model width)
    disc_hidden: int = 256
    # instance noise (Sønderby et al. 2017): std of the Gaussian noise added to everything D reads
    # while training, annealed linearly to 0 over stage 2; 0 = off. With --adv-loss gan, 1.0 is the
    # remedy that beat the paper's term on val (RESULTS.md, 2026-12-08)
    disc_noise: float = 0.0


def resolve_exit_layers(spec: str, depth: int) -> list[int]:
    """'2,4,6' -> [2, 4, 6]; '' -> layer 1 and every second layer before the last ([1, 2, 4, 6]
    for 8 layers). Layers are 1-based (an exit after layer l); ValueError naming --exit-layers
    for anything else."""
    if not spec.strip():
        return sorted({l for l in [1, *range(2, depth, 2)] if l < depth})
    layers = []
    for part in (p.strip() for p in spec.split(",")):
        if not part.isdigit() or not 1 <= int(part) < depth:
            raise ValueError(f"--exit-layers: '{part}' is not a layer between 1 and {depth - 1} "
                             f"(the model has {depth} language-model layers; after the last comes "
                             f"the final head)")
        layers.append(int(part))
    return sorted(set(layers))


def check_exit_config(cfg: ExitConfig, depth: int) -> None:
    """Refuse stage-2 settings that cannot work, naming the flag at fault (ValueError)."""
    resolve_exit_layers(cfg.exit_layers, depth)
    for name, value, table in (("exit_method", cfg.exit_method, METHODS),
                               ("adv_loss", cfg.adv_loss, ADVERSARIAL)):
        if value not in table:
            raise ValueError(f"{flag(name)} {value}: choose from {', '.join(table)}")
    if not 0.0 <= cfg.label_fraction <= 1.0:
        raise ValueError(f"--label-fraction must be between 0 and 1 (got {cfg.label_fraction})")
    if cfg.exit_method == "ce" and cfg.label_fraction <= 0:
        raise ValueError("--exit-method ce trains on labels only and needs --label-fraction > 0")
    for name in ("temperature", "exit_lr", "disc_lr", "exit_epochs", "disc_hidden"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{flag(name)} must be > 0 (got {getattr(cfg, name)})")
    for name in ("lambda_adv", "lambda_kd", "lambda_ce", "disc_noise"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0 (got {getattr(cfg, name)})")


# --------------------------------------------------------------------------------------------------
# The exits and the discriminator
# --------------------------------------------------------------------------------------------------
class ExitLayer(nn.Module):
    """G_k: one transformer layer on the [CLS] row of h_{l_k}.

    A trainable copy of the backbone layer that follows the exit (layer l_k + 1), run on the
    [CLS] row only (model.Block with cls_only=True: queries for [CLS], keys and values for every
    token; that row equals the full layer's, for a fraction of its cost). So at step 0,
    G_k(h_{l_k}) = h_{l_k + 1}[CLS]: the exit starts as "one more backbone layer", already closer
    to h_L than h_{l_k}, and training moves it the rest of the way."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = copy.deepcopy(block).requires_grad_(True)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """h (B, S, D), attn_mask (B, 1, 1, S) bool or None -> the exit's [CLS] feature (B, D)."""
        return self.block(h, attn_mask, cls_only=True)[:, 0]


class Discriminator(nn.Module):
    """D: a [CLS] feature after the frozen final norm (exactly what the shared head reads), (B,
    D) -> logit (B,) of "this is the final layer's". `body` is the hidden layer that feature
    matching compares."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)
        self.noise = 0.0               # instance noise's std now (the training loop anneals it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise > 0:
            x = x + self.noise * torch.randn_like(x)    # real and fake alike, in D's and G's steps
        return self.out(self.body(x))[:, 0]


class FREE(nn.Module):
    """A frozen backbone VLM with K exits (G_k + the backbone's shared frozen head) and the
    discriminator."""

    def __init__(self, backbone: VLM, cfg: ExitConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False)
        # 1-based, K of them
        self.exit_layers = resolve_exit_layers(cfg.exit_layers, backbone.depth)
        # layer l (1-based) is blocks[l - 1], so the layer after exit l is blocks[l]
        self.exits = nn.ModuleList([ExitLayer(backbone.blocks[l]) for l in self.exit_layers])
        self.disc = Discriminator(backbone.cfg.dim, cfg.disc_hidden)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def depths(self) -> list[int]:
        """Exit index -> the language-model layers a question that leaves there has run: l_k for
        exit k = 0..K-1, L for K (the final layer). The one map from exits to layers."""
        return self.exit_layers + [self.backbone.depth]

    def exits_after(self, exits: list[int] | None = None) -> dict[int, int]:
        """Layer -> the exit evaluated after it, for the exits `exits` (indices; default all)."""
        return {self.depths()[k]: k for k in (range(self.num_exits) if exits is None else exits)}

    def train(self, mode: bool = True):
        """The backbone stays in eval mode while the exits train: it is frozen."""
        super().train(mode)
        self.backbone.eval()
        return self

    def exit_feature(self, k: int, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """G_k(h_{l_k}): (B, S, D) -> [CLS] feature (B, D)."""
        return self.exits[k](h, attn_mask)

    def exit_logits(self, k: int, h: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Exit k's answer logits (B, A): G_k, then the frozen shared norm + head."""
        return self.backbone.head(self.exit_feature(k, h, attn_mask))

    def all_outputs(self, images, tokens: torch.Tensor, text_mask: torch.Tensor,
                    patches=None) -> dict:
        """One backbone pass with every exit read (no early exit): 'states' (h_0..h_L, each
        (B, S, D)), 'attn_mask', 'final' logits (B, A) and 'exits' (K logits (B, A)). For
        evaluation and reports."""
        states, mask = self.backbone.hidden_states(images, tokens, text_mask, patches)
        exits = [self.exit_logits(k, states[l], mask) for k, l in enumerate(self.exit_layers)]
        return {"states": states, "attn_mask": mask, "final": self.backbone.head(states[-1][:, 0]),
                "exits": exits}

    def load_exits(self, exits: dict) -> None:
        """Load the exit layers and D that train.py saved (everything but the backbone)."""
        missing, unexpected = self.load_state_dict(exits, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if unexpected or missing:
            raise ValueError(f"checkpoint exits do not match their config (exits after layers "
                             f"{self.exit_layers}): missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}")


# --------------------------------------------------------------------------------------------------
# The losses. real = h_L[CLS] (B, D) from the frozen backbone; fakes = [G_k(h_{l_k}) per exit k]
# --------------------------------------------------------------------------------------------------
def distillation_loss(exit_logits: torch.Tensor, final_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 KL(p_L^T || p_k^T): the exit matches the final layer's softened answer distribution
    (Hinton et al.)."""
    log_p_exit = F.log_softmax(exit_logits.float() / temperature, dim=1)
    p_final = F.softmax(final_logits.float() / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_p_exit, p_final, reduction="batchmean")


# The adversarial terms ADV_k a generator can be trained with: name -> f(free, fake, real) -> scalar
def gan_term(free: "FREE", fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The paper's ADV_k = BCE(D(G_k(h_{l_k})), 1), the non-saturating GAN loss: fool D."""
    d_fake = free.disc(free.backbone.norm(fake))                                          # (B,)
    return F.binary_cross_entropy_with_logits(d_fake.float(), torch.ones_like(d_fake.float()))


def feature_matching_term(free: "FREE", fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """ADV_k = || D_body(G_k(h_{l_k})) - D_body(h_L) ||^2, per question (feature matching, Salimans
    et al. 2016): in D's hidden layer, the exit's feature should look like the final layer's for the
    same question.
    NOTE (deviation): the default in place of the paper's GAN term. With a trained backbone D
    wins the paper's game from the start and its gradient pulls the exits away from the final
    layer; matching D's features keeps an adversarially trained D without fighting distillation
    (RESULTS.md)."""
    norm = free.backbone.norm
    with torch.no_grad():
        target = free.disc.body(norm(real)).float()                                    # (B, hidden)
    return F.mse_loss(free.disc.body(norm(fake)).float(), target)


ADVERSARIAL: dict[str, Callable] = {"gan": gan_term, "fm": feature_matching_term}

# Which terms of L_G each training method uses.
METHODS = {"free": ("adv", "kd", "ce"), "kd": ("kd",), "ce": ("ce",)}


# Discriminator step: final-layer features are real, exit features fake.
#   L_D = BCE(D(h_L), 1) + (1/K) sum_k BCE(D(G_k(h_{l_k})), 0)
# NOTE (deviation): the paper's sum over k is a mean here, so that real and fake weigh the same:
# summed, the K fake terms outweighed the one real term K to 1, and D learned to call all fake.
def discriminator_loss(free: "FREE", real: torch.Tensor,
                       fakes: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """L_D on the normed [CLS] features (fakes detached: this step trains D only), and D's
    accuracies."""
    norm = free.backbone.norm
    d_real = free.disc(norm(real)).float()                                                # (B,)
    d_fake = free.disc(norm(torch.cat(fakes).detach())).float()         # (K*B,): mean = (1/K) sum_k
    loss = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
        F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return loss, {"d_loss": loss.detach(), "d_real_acc": (d_real > 0).float().mean(),
                  "d_fake_acc": (d_fake < 0).float().mean()}


# Generator step: exit features should fool D and let the frozen head answer as the final layer does
#   L_G = sum_k [ lambda_adv ADV_k + lambda_kd T^2 KL(p_L^T || p_k^T) + lambda_ce CE(p_k, y) ]
def generator_loss(free: "FREE", real: torch.Tensor, fakes: list[torch.Tensor],
                   targets: torch.Tensor | None, labelled: torch.Tensor,
                   ce_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L_G with the terms of the method (METHODS). targets (B, A) soft labels or None (label-free);
    labelled (B,) bool: the questions whose labels the exits may see (CE reads only those);
    ce_weight: the CE term's weight, 1 in one process (under torchrun, what makes the processes'
    CE means add up to the mean over the global batch's labelled questions, train.ce_weight)."""
    cfg = free.cfg
    weights = {"adv": cfg.lambda_adv, "kd": cfg.lambda_kd, "ce": cfg.lambda_ce}
    on = [t for t in METHODS[cfg.exit_method] if weights[t] > 0]
    # every term of the method is reported, 0 where a batch has none of it: the same statistics
    # in every process of a run, whatever its batches hold (train.py sums them over processes)
    stats = {name: torch.zeros((), device=real.device) for name in on}
    if "ce" in on and targets is None:
        on.remove("ce")                                                     # no label may be read
    with torch.no_grad():
        final_logits = free.backbone.head(real)                           # (B, A): the teacher
    loss = 0.0
    for fake in fakes:
        logits = free.backbone.head(fake)                   # (B, A): exit k through the shared head
        terms = {"adv": lambda: ADVERSARIAL[cfg.adv_loss](free, fake, real),
                 "kd": lambda: distillation_loss(logits, final_logits, cfg.temperature),
                 # the labelled rows' targets (others all zero: soft_cross_entropy leaves them out)
                 "ce": lambda: ce_weight * soft_cross_entropy(logits, targets * labelled[:, None])}
        for name in on:
            value = terms[name]()
            loss = loss + weights[name] * value
            stats[name] = stats[name] + value.detach()
    return loss, stats | {"g_loss": loss.detach()}


# --------------------------------------------------------------------------------------------------
# Input-adaptive inference: samples that exit stop computing
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitRule:
    """When a sample leaves at an exit: when the rule's measure(conf, probs, streak) -> (B,)
    reaches the threshold (>= it if `high` is True, else <= it). The measure reads the exit's
    answer distribution probs (B, A), its maximum conf (B,), and streak (B,): how many exits in a
    row (this one included) gave the same answer. grid(K): the thresholds a sweep and the
    calibration try with K exits, from the most aggressive (most leave) to the most conservative;
    default: the threshold used when none is calibrated; bounds: the thresholds that make sense;
    what: the measure in words."""
    measure: Callable
    high: bool
    grid: Callable
    default: float
    bounds: tuple
    what: str
    whole: bool = False          # thresholds are whole numbers

    def fires(self, conf: torch.Tensor, probs: torch.Tensor, streak: torch.Tensor,
              threshold: float) -> torch.Tensor:
        """(B,) bool: the samples that leave here."""
        m = self.measure(conf, probs, streak)
        return m >= threshold if self.high else m <= threshold


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, A) -> (B,) entropy / log A, in [0, 1]."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(dim=1) / math.log(probs.shape[1])


RULES = {
    # FREE's rule (and DeeBERT's confidence rule): the answer's probability reaches the threshold
    "maxprob": ExitRule(lambda conf, probs, streak: conf, True,
                        lambda K: [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999],
                        0.9, (0.0, 1.0), "the answer's probability"),
    # DeeBERT's entropy rule: the answer distribution is peaked enough
    "entropy": ExitRule(lambda conf, probs, streak: normalised_entropy(probs), False,
                        lambda K: [0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01, 0.001],
                        0.1, (0.0, 1.0), "the answer distribution's entropy / log A"),
    # PABEE: the same answer at `threshold` consecutive exits
    "patience": ExitRule(lambda conf, probs, streak: streak.float(), True,
                         lambda K: list(range(1, K + 1)), 2, (1, math.inf),
                         "exits in a row with this answer", whole=True),
}


@torch.no_grad()
def early_exit_predict(free: FREE, inputs: dict, rule: str = "maxprob", threshold: float = 0.9,
                       exits: list[int] | None = None) -> dict:
    """Run the language model layer by layer; after layer l_k evaluate exit k on the samples still
    running, answer those whose rule fires and *remove them from the batch*, so that the later
    layers run on fewer rows, and stop when all have left. One host sync per exit evaluated (to
    count who leaves).
    inputs: the model's inputs (images or a frozen encoder's patches, tokens, text_mask;
    Split.batch).
    exits: indices of the exits to evaluate (default all; one not evaluated costs nothing).
    Returns 'pred' (B,) answer, 'exit' (B,) exit index (K = the final layer), 'confidence' (B,)
    the answer's probability, 'layers' (B,) language-model layers run."""
    bb, K, fires = free.backbone, free.num_exits, RULES[rule].fires
    h, mask = bb.embed(**inputs)                                   # (B, S, D), (B, 1, 1, S) or None
    rows = torch.arange(len(h), device=h.device)                      # the batch rows still running
    left = []                                     # the groups that left: (rows, pred, conf, k) each
    at_layer = free.exits_after(exits)                               # layer -> exit k
    last = streak = None
    for layer in range(1, bb.depth + 1):
        h = bb.layer(layer - 1, h, mask)                              # (B_run, S, D)
        if layer not in at_layer:
            continue
        k = at_layer[layer]
        probs = free.exit_logits(k, h, mask).float().softmax(dim=1)   # (B_run, A)
        conf, pred = probs.max(dim=1)                                 # (B_run,) each
        streak = torch.ones_like(pred) if last is None else torch.where(pred == last, streak + 1, 1)
        leave, last = fires(conf, probs, streak, threshold), pred     # (B_run,) bool
        n = int(leave.sum())                                          # the host sync of this exit
        if n == len(rows):                                            # everyone left: stop here
            return gather_answers(free, left + [(rows, pred, conf, k)])
        if n:
            # the rows that leave first, each group in batch order: index tensors whose split at n
            # the host knows, so no boolean-mask index (each one a host sync of its own) is needed
            order = torch.argsort(leave.to(torch.int8), descending=True, stable=True)
            out, keep = order[:n], order[n:]
            left.append((rows[out], pred[out], conf[out], k))
            rows, h, last, streak = rows[keep], h[keep], last[keep], streak[keep]
            mask = None if mask is None else mask[keep]
    # the rest: the final layer answers
    conf, pred = bb.head(h[:, 0]).float().softmax(dim=1).max(dim=1)
    return gather_answers(free, left + [(rows, pred, conf, K)])


def gather_answers(free: FREE, left: list) -> dict:
    """The answers of the whole batch from the groups of rows that left together, (rows, pred,
    conf, k) each, k = K for the final layer: 'pred', 'confidence', 'exit' and 'layers' (B,) each,
    in batch order. With one group (everyone left at once, always so at batch 1) its rows are the
    batch in order: nothing to reorder, so a sample pays for no more than its own exit."""
    depths = free.depths()
    parts = [{"pred": pred, "confidence": conf, "exit": torch.full_like(pred, k),
              "layers": torch.full_like(pred, depths[k])} for _, pred, conf, k in left]
    if len(parts) == 1:
        return parts[0]
    order = torch.cat([rows for rows, *_ in left]).argsort()                  # back to batch order
    return {key: torch.cat([part[key] for part in parts])[order] for key in parts[0]}
