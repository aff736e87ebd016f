"""Training for free-min. Stage 1 trains the backbone VLM (model.py) on VQA-as-classification.

    python train.py                      # built-in shapes data, default preset, writes out/
    python train.py --preset tiny        # a sub-minute run (used by the tests)
    python train.py --resume             # continue an interrupted run from out/ckpt.pt
    python train.py --data vqa2 --vqa-questions Q.json --vqa-annotations A.json --vqa-images DIR

The paper starts from a pre-trained BLIP-2; we have none offline, so stage 1 trains a miniature one.
Everything is printed, logged to out/log.jsonl (one JSON line per evaluation) and checkpointed atomically
to out/ckpt.pt (weights, optimizer, step, RNG, configs, answer vocabulary and tokenizer).
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from data import (COLORS, SHAPES, DataConfig, DataError, Parser, add_config_args, batches, check_data_config,
                  config_from_args, load_data, majority_baseline, to_device)
import infer
from free_min import (FREE, ExitConfig, build_from_checkpoint, check_exit_config, discriminator_loss, generator_loss,
                      load_checkpoint, written_exit_layers)
from model import VLM, ModelConfig, check_model_config, describe_timm_vit, make_vit


@dataclass
class TrainConfig:
    out: str = field(default="out", metadata={"help": "output folder for ckpt.pt and log.jsonl"})
    epochs: int = field(default=30, metadata={"help": "stage-1 (backbone) epochs over the train split"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=300, metadata={"help": "linear warm-up steps before the cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    aux_weight: float = field(default=1.0, metadata={"help": "weight of the auxiliary patch loss (ViT tokens predict the "
                                                             "colour and shape under them; shapes data only, 0 = off)"})
    recon_weight: float = field(default=-1.0, metadata={"help": "weight of a label-free auxiliary loss: every ViT token "
                                                               "predicts the pixels of its own patch (0 = off; -1 = auto: "
                                                               "1 when stage 1 has no pixel labels, else 0; see "
                                                               "stage1_settings)"})
    shortcut_weight: float = field(default=-1.0, metadata={"help": "weight of a second answer loss read straight off the "
                                                                  "image encoder's tokens by a one-layer head (answers only; "
                                                                  "0 = off; -1 = auto: 3 when stage 1 has no pixel labels, "
                                                                  "else 0; see train.AnswerShortcut)"})
    vit_blocks_lr: float = field(default=-1.0, metadata={"help": "stage 1: the image encoder's transformer blocks (and its "
                                                                 "final norm) train at this multiple of --lr, everything "
                                                                 "else at --lr (-1 = auto: 0.3 when stage 1 has no pixel "
                                                                 "labels, else 1)"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size for evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of initialization and batch order"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cuda, mps or cpu",
                                                  "choices": ["auto", "cuda", "mps", "cpu"]})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    resume: bool = field(default=False, metadata={"help": "continue stage 1 from OUT/ckpt.pt (same configs) instead of starting over"})
    stage: str = field(default="all", metadata={"help": "all: backbone then exits; backbone: stage 1 only; exits: stage 2 "
                                                        "only, on the backbone of --backbone (or OUT/ckpt.pt)",
                                                "choices": ["all", "backbone", "exits"]})
    backbone: str = field(default="", metadata={"help": "stage 2: a trained checkpoint whose backbone is reused (frozen), "
                                                        "so several exit methods can share one backbone"})
    final_eval: bool = field(default=True, metadata={"help": "end with infer.py's early-exit report on the test split "
                                                             "(OUT/report.json, OUT/speedup.png)"})
    feature_cache: str = field(default="", metadata={"help": "with --freeze-vit: the file of cached image tokens (default "
                                                             "OUT/features.npy); a named file that holds another "
                                                             "encoder's tokens is refused"})
    state_cache: str = field(default="", metadata={"help": "stage 2: train the exits from the frozen backbone's states, "
                                                           "computed once into this folder (fp16) and reused by later "
                                                           "runs on the same backbone, data and exit layers; '' = run "
                                                           "the backbone on every batch"})
    export: str = field(default="", metadata={"help": "after stage 1, also write the backbone alone to this file: fp16 "
                                                      "weights, configs, tokenizer, answers and its test accuracy (how "
                                                      "backbones/ is made)"})
    report_timing: bool = field(default=True, metadata={"help": "time the final report's early exit in wall-clock seconds "
                                                               "and calibrate it by measured costs (--no-report-timing: accuracy and "
                                                               "the layer view only, calibrated by FLOPs)"})
    report_timing_samples: int = field(default=256, metadata={"help": "questions timed per wall-clock measurement "
                                                                      "in the final report"})


# Named presets: overrides of the dataclass defaults.
#   default = the dataclass defaults: 720 k training questions (30 epochs of 24 k), which a from-scratch VLM
#             needs on this task (it first learns the answer priors, then to ground words in the image);
#             minutes on a GPU, about an hour on a 2-core CPU (which is why the repo ships its backbone).
#   tiny    = a sub-minute CPU run for the tests.
#   base    = a bigger model and data set, for a GPU.
PRESETS = {
    "tiny": dict(train_images=300, val_images=40, test_images=40, questions_per_image=4, dim=64, depth=4, heads=2,
                 epochs=4, batch_size=32, warmup_steps=20, lr=2e-3, exit_epochs=2, final_eval=False),
    "default": dict(),
    "base": dict(train_images=20000, val_images=1000, test_images=1000, dim=256, depth=12, heads=8, vit_dim=128,
                 vit_depth=2, epochs=12, batch_size=128, lr=5e-4, warmup_steps=1000),
}


def parse_args(argv=None):
    """--preset picks the defaults; every config field is a flag that overrides them."""
    pre = Parser(add_help=False)
    pre.add_argument("--preset", default="default", choices=list(PRESETS))
    known, _ = pre.parse_known_args(argv)
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="named defaults: tiny (tests, <1 min CPU), default (2-core CPU / laptop GPU), base (GPU)")
    for cls in (DataConfig, ModelConfig, TrainConfig, ExitConfig):
        add_config_args(p, cls, PRESETS[known.preset])
    args = p.parse_args(argv)
    return args, config_from_args(DataConfig, args), config_from_args(ModelConfig, args), config_from_args(TrainConfig, args)


def pick_device(choice: str):
    """Device autodetect cuda -> mps -> cpu, and the autocast dtype with the reason for it."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: torch sees no CUDA device here (use --device auto or cpu)")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps: torch sees no MPS device here (use --device auto or cpu)")
    device = torch.device(choice)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16, "bf16 autocast: this GPU supports bfloat16 (no loss scaling needed)"
    if device.type == "cuda":
        return device, torch.float16, "fp16 autocast with a grad scaler: this GPU has no bfloat16"
    return device, torch.float32, f"float32: mixed precision is used on CUDA only, and this is {device.type}"


# Stage 1 without pixel labels: what teaches the image encoder in their place (README, Known limitations).
# Why it needs anything: an answer reaches a visual token only through every language-model layer and an
# attention that starts spread evenly over the tokens, so for thousands of steps every token is told the
# same thing, and the encoder does not learn the objects' shapes (scripts/probe_tokens.py: a linear probe
# reads them at 35 % after 10 of 30 epochs with reconstruction alone, where the most common shape is 32 %).
# The answer shortcut (train.AnswerShortcut) puts the answer one layer from the tokens; pixel reconstruction
# (train.PatchDecoder) teaches them colour; the encoder's block trains at 0.3x the rate (better on a short
# proxy). Full default runs with --aux-weight 0 (one seed each, README): 74.4 % test
# with the shortcut at weight 1, 76.4 % with these values, against 80.5 % with the pixel labels.
AUTO = -1.0
LABEL_FREE = {"recon_weight": 1.0, "shortcut_weight": 3.0, "vit_blocks_lr": 0.3}
WITH_PIXEL_LABELS = {"recon_weight": 0.0, "shortcut_weight": 0.0, "vit_blocks_lr": 1.0}


def stage1_settings(tcfg: TrainConfig, pixel_labels: bool, frozen_encoder: bool) -> TrainConfig:
    """tcfg with each auto (-1) of --recon-weight, --shortcut-weight and --vit-blocks-lr resolved: the label-free
    aids (LABEL_FREE) when the encoder trains and no pixel-label loss will run (--aux-weight 0, or data
    without pixel labels), none otherwise. A value given on the command line is kept."""
    label_free = not frozen_encoder and not (tcfg.aux_weight > 0 and pixel_labels)
    auto = LABEL_FREE if label_free else WITH_PIXEL_LABELS
    return replace(tcfg, **{name: value for name, value in auto.items() if getattr(tcfg, name) == AUTO})


def param_groups(model: VLM, heads, tcfg: TrainConfig) -> list[dict]:
    """Stage 1's AdamW parameter groups (`heads`: the auxiliary heads, a module or None): everything at --lr,
    but for --vit-blocks-lr other than 1, the image
    encoder's transformer blocks and final norm in a group of their own with that multiple ('lr_scale').
    `tcfg` as stage1_settings resolves it (no auto value left)."""
    if tcfg.vit_blocks_lr < 0:
        raise ValueError("param_groups: resolve --vit-blocks-lr auto with stage1_settings first")
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads is not None else [])
    blocks = {id(p) for m in (model.vit.blocks, model.vit.norm) for p in m.parameters()}
    if tcfg.vit_blocks_lr == 1.0 or not any(id(p) in blocks for p in params):
        return [{"params": params}]
    return [{"params": [p for p in params if id(p) not in blocks]},
            {"params": [p for p in params if id(p) in blocks], "lr_scale": tcfg.vit_blocks_lr}]


def set_lr(opt: torch.optim.Optimizer, step: int, total_steps: int, cfg: TrainConfig) -> None:
    """The schedule's learning rate at `step` for every group, times the group's lr_scale (if any)."""
    for group in opt.param_groups:
        group["lr"] = get_lr(step, total_steps, cfg) * group.get("lr_scale", 1.0)


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class PatchProbe(nn.Module):
    """Stage 1's auxiliary head: a linear read-out of every ViT token -> (colour, shape) under it.

    NOTE (deviation): BLIP-2 starts from a ViT pretrained on web-scale data, whose tokens already say what
    is where. Trained from scratch on VQA answers alone, our ViT learns to see shapes only slowly (the
    language model cannot attend to "the circle" before the ViT can tell circles apart). The shapes
    generator knows every pixel's colour and shape, so stage 1 adds this per-token loss: a cheap stand-in
    for a pretrained image encoder. It is dropped after training (the VLM never uses it). PatchDecoder is a
    label-free alternative that was tried in its place; see there for what it does and does not teach."""

    def __init__(self, vit_dim: int):
        super().__init__()
        self.colour = nn.Linear(vit_dim, len(COLORS) + 1)   # + background
        self.shape = nn.Linear(vit_dim, len(SHAPES) + 1)

    def loss(self, patches: torch.Tensor, pixel_labels: torch.Tensor, patch_size: int) -> torch.Tensor:
        """patches (B, P, Dv); pixel_labels (B, 2, H, W) uint8. Each token's target is the colour/shape that
        covers at least a quarter of its patch (the most common one), else background."""
        total = 0.0
        for channel, head in ((0, self.colour), (1, self.shape)):
            target = self.targets(pixel_labels, patch_size, channel)                    # (B, P)
            logits = head(patches.float())                                               # (B, P, C)
            total = total + F.cross_entropy(logits.reshape(-1, head.out_features), target.reshape(-1))
        return total

    @staticmethod
    def targets(pixel_labels: torch.Tensor, patch_size: int, channel: int) -> torch.Tensor:
        """(B, 2, H, W) pixel labels -> (B, P) per-token class of `channel` (0 colour, 1 shape; 0 = background)."""
        classes = 1 + (len(COLORS) if channel == 0 else len(SHAPES))
        onehot = F.one_hot(pixel_labels[:, channel].long(), classes)                   # (B, H, W, C)
        cover = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch_size)           # (B, C, g, g)
        cover[:, 0] = 0.0                                                                # background never "covers"
        frac, label = cover.max(dim=1)                                                   # (B, g, g)
        return torch.where(frac >= 0.25, label, torch.zeros_like(label)).flatten(1)     # (B, P)


class PatchDecoder(nn.Module):
    """Stage 1's label-free auxiliary head (--recon-weight): a linear map from every ViT token to the pixels
    of its own patch (normalised, averaged down to r x r per patch). It needs nothing but the images.

    Why it was tried: without PatchProbe, answers reach the image encoder only through the language model's
    attention, which starts out spread evenly over the visual tokens, so every token is told the same
    thing whatever its patch holds, and tokens that do not say what is where give attention nothing to
    select. Reconstruction makes each token describe its own patch from the first steps.
    What it does (measured; README, Known limitations): it teaches the tokens *colour* (a linear probe reads
    an object token's colour 97 % right) but not *shape* (35 %, 4 shapes; 99 % for both with PatchProbe),
    and shape is what most questions need to find their object: a full default run with it (and
    --aux-weight 0) stayed at the answer priors. Dropped after training, as PatchProbe."""

    def __init__(self, vit_dim: int, patch_size: int):
        super().__init__()
        self.r = min(4, patch_size)                      # pixels per patch side that are reconstructed
        self.pixels = nn.Linear(vit_dim, 3 * self.r * self.r)

    def loss(self, patches: torch.Tensor, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        """patches (B, P, Dv) of images (B, 3, H, W) (normalised) -> mean squared reconstruction error."""
        B, g, r = images.shape[0], images.shape[-1] // patch_size, self.r
        target = F.avg_pool2d(images.float(), patch_size // r)                          # (B, 3, g*r, g*r)
        target = target.view(B, 3, g, r, g, r).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * r * r)  # (B, P, 3r^2)
        return F.mse_loss(self.pixels(patches.float()), target)


class AnswerShortcut(nn.Module):
    """Stage 1's answer shortcut (--shortcut-weight): the answer predicted a second time, straight from the
    image encoder's tokens, by a one-layer head; trained on the same targets as the VLM (answers only).

    Why: in the VLM, an answer's gradient reaches the encoder through every language-model layer and an
    attention that starts out spread evenly over the visual tokens (README, Known limitations). Here it
    is one layer away: the tokens' mean (what counting and existence questions can use, with no attention
    to learn) and a pooling by the question's words, fed with a bag of the question's words to a small
    MLP. Like the auxiliary classifiers of deep supervision, it is dropped after training."""

    def __init__(self, vit_dim: int, vocab_size: int, num_answers: int, hidden: int = 256):
        super().__init__()
        self.words = nn.Embedding(vocab_size, vit_dim)
        self.query = nn.Linear(vit_dim, vit_dim)
        self.mlp = nn.Sequential(nn.Linear(3 * vit_dim, hidden), nn.GELU(), nn.Linear(hidden, num_answers))

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """patches (B, P, Dv), tokens (B, T), text_mask (B, T) -> logits (B, A)."""
        x = F.layer_norm(patches.float(), patches.shape[-1:])                          # (B, P, Dv)
        mask = text_mask[..., None].float()                                                # (B, T, 1)
        q = (self.words(tokens) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)            # (B, Dv) bag of words
        scores = torch.einsum("bpd,bd->bp", x, self.query(q)) / x.shape[-1] ** 0.5        # (B, P)
        pooled = torch.einsum("bp,bpd->bd", scores.softmax(dim=1), x)                      # (B, Dv)
        return self.mlp(torch.cat([x.mean(dim=1), pooled, q], dim=1))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft VQA targets (B, A), normalized to a distribution per question.
    NOTE (deviation): many VQA classifiers use per-answer BCE; a softmax suits single-answer shapes data
    and lets the exits share the same loss shape with the KD term of stage 2."""
    targets = targets / targets.sum(dim=1, keepdim=True).clamp(min=1e-8)
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@torch.no_grad()
def evaluate(model: VLM, split, device, dtype, batch_size: int) -> dict:
    """Official-metric accuracy (%) overall and per family; also returns the predictions."""
    model.eval()
    preds = []
    for ids in batches(len(split), batch_size):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            preds.append(model(**to_device(split.batch(ids), device)).argmax(dim=1).cpu())
    pred = torch.cat(preds)
    return summarize_scores(split, split.score(torch.arange(len(split)), pred)) | {"pred": pred}


def summarize_scores(split, scores: torch.Tensor) -> dict:
    """scores (n,) in 0..1 -> {'accuracy': %, 'per_family': {family: %}}."""
    per_family = defaultdict(list)
    for fam, s in zip(split.families, scores.tolist()):
        per_family[fam].append(s)
    return {"accuracy": 100.0 * scores.mean().item(),
            "per_family": {f: 100.0 * sum(v) / len(v) for f, v in sorted(per_family.items())}}


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a temp file in the same folder, then rename over the old checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def log_json(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def format_family(per_family: dict, baseline: dict | None = None) -> str:
    """One line per family, with the majority-answer baseline beside it when given."""
    rows = []
    for fam, acc in per_family.items():
        extra = f"   (majority answer: {baseline[fam]:5.1f}%)" if baseline else ""
        rows.append(f"  {fam:<14} {acc:5.1f}%{extra}")
    return "\n".join(rows)


def make_state(model, opt, step, epoch, dcfg, mcfg, tcfg, tokenizer, answers) -> dict:
    """Everything a checkpoint holds. The *uncompiled* model's weights are saved."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
            "rng": rng_state(), "data_config": asdict(dcfg), "model_config": asdict(mcfg),
            "train_config": asdict(tcfg), "answers": answers, "tokenizer": tokenizer.to_str()}


# Flags that shape the optimisation: a run resumed with other values would follow another schedule.
SCHEDULE_FLAGS = {"backbone": ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "aux_weight",
                               "recon_weight", "shortcut_weight", "vit_blocks_lr", "seed"),
                  "exits": ("batch_size", "seed")}
DERIVED = ("vocab_size", "num_answers", "max_text_len", "image_size")   # set from the data, not by flags


def refuse_changes(path: str, saved: dict, now: dict, keys, what: str) -> None:
    """DataError listing every flag in `keys` whose value differs from the one the checkpoint was made with."""
    diff = [k for k in keys if k in saved and saved[k] != now[k]]
    if diff:
        changes = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise DataError(f"--resume: {path} was made with other {what} ({changes}); resume with the same values, "
                        f"or start over without --resume")


def resume_state(tcfg: TrainConfig, dcfg: DataConfig, mcfg: ModelConfig, ecfg: ExitConfig) -> dict | None:
    """The checkpoint to continue from (with --resume), after checking that it was made with the same settings.
    An interrupted stage 1 continues stage 1; an interrupted stage 2 (exits but no finished flag) continues
    stage 2. Without --resume, says that an existing checkpoint will be replaced."""
    path = os.path.join(tcfg.out, "ckpt.pt")
    if not tcfg.resume:
        if os.path.exists(path):
            print(f"note: {path} exists and will be replaced when this run saves (use --resume to continue it)")
        return None
    state = load_checkpoint(path, "--resume")
    if "exits" in state:
        if tcfg.stage == "backbone":
            raise DataError(f"--resume --stage backbone: {path} holds a finished backbone (and exits); "
                            f"resume an interrupted stage 2 with --stage all or --stage exits")
        if "exit_progress" not in state:
            raise DataError(f"--resume: {path} holds a finished run (backbone and trained exits); there is nothing to "
                            f"resume (train other exits with --stage exits --backbone {path} --out ANOTHER_FOLDER)")
        # compare the exits' layers written out ('' = the default placement, which an older run may have saved)
        depth = state["model_config"]["depth"]
        ecfg.exit_layers = written_exit_layers(ecfg.exit_layers, depth)
        saved = state["exit_config"] | {"exit_layers": written_exit_layers(state["exit_config"]["exit_layers"], depth)}
        refuse_changes(path, saved, asdict(ecfg), saved, "exit settings")
        refuse_changes(path, state["train_config"], asdict(tcfg), SCHEDULE_FLAGS["exits"], "training settings")
        return state
    if tcfg.stage == "exits":
        raise DataError(f"--resume --stage exits: {path} holds a backbone but no interrupted stage 2 to resume "
                        f"(drop --resume to train exits on it)")
    for name, cfg in [("data_config", dcfg), ("model_config", mcfg)]:
        keys = [k for k in state[name] if k not in DERIVED]
        refuse_changes(path, state[name], asdict(cfg), keys, "data or model settings")
    refuse_changes(path, state["train_config"], asdict(tcfg), SCHEDULE_FLAGS["backbone"], "training settings")
    return state


def check_train_config(tcfg: TrainConfig) -> None:
    """Refuse training settings that cannot work, naming the flag (DataError)."""
    for name in ("epochs", "batch_size", "eval_batch_size", "report_timing_samples"):
        if getattr(tcfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(tcfg, name)})")
    if tcfg.lr <= 0:
        raise DataError(f"--lr must be > 0 (got {tcfg.lr})")
    for name in ("weight_decay", "warmup_steps", "grad_clip", "aux_weight", "threads"):
        if getattr(tcfg, name) < 0:
            raise DataError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(tcfg, name)})")
    for name in LABEL_FREE:
        if getattr(tcfg, name) < 0 and getattr(tcfg, name) != AUTO:
            raise DataError(f"--{name.replace('_', '-')} must be >= 0, or {AUTO:g} for auto (got {getattr(tcfg, name)})")
    if tcfg.backbone and tcfg.stage != "exits":
        raise DataError("--backbone is read by --stage exits only (the other stages train their own backbone)")


def adopt_timm_encoder(dcfg: DataConfig, mcfg: ModelConfig) -> None:
    """--vit NAME: the input size, patch size, width, normalisation, resize and crop come from timm's own
    description of the model. With --vit-weights, the file must fit the model (checked here, before any
    data is read). ValueError naming the flag otherwise."""
    if not timm.is_model(mcfg.vit):
        raise ValueError(f"--vit {mcfg.vit}: not a timm model name (python -c \"import timm; print(timm.list_models('vit*'))\")")
    enc = describe_timm_vit(mcfg.vit, mcfg.vit_image_size)
    dcfg.image_size, dcfg.crop_pct, dcfg.interpolation = enc["image_size"], enc["crop_pct"], enc["interpolation"]
    mcfg.patch_size, mcfg.vit_dim, mcfg.pixel_mean, mcfg.pixel_std = (enc["patch_size"], enc["vit_dim"], enc["pixel_mean"],
                                                                      enc["pixel_std"])
    if mcfg.vit_weights:
        mcfg.image_size = dcfg.image_size
        try:
            make_vit(mcfg)
        except Exception as e:   # whatever stops the user's file from loading into this model: one line
            raise ValueError(f"--vit-weights {mcfg.vit_weights} does not fit --vit {mcfg.vit} "
                             f"({str(e).splitlines()[0][:150]})")


def validate(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig, ecfg: ExitConfig) -> dict | None:
    """Check every flag, and read the checkpoint the run starts from, before any data is made or any step is
    taken: a bad flag costs seconds, and nothing already written is touched. Returns that checkpoint (the
    backbone of --stage exits, or the run to --resume) or None."""
    check_data_config(dcfg)
    check_train_config(tcfg)
    try:
        if mcfg.vit and not (tcfg.stage == "exits" and not tcfg.resume):
            adopt_timm_encoder(dcfg, mcfg)
        mcfg.image_size, mcfg.max_text_len = dcfg.image_size, dcfg.max_question_len
        if tcfg.stage == "exits" and not tcfg.resume:
            state = load_checkpoint(tcfg.backbone or os.path.join(tcfg.out, "ckpt.pt"),
                                    "--backbone" if tcfg.backbone else "--stage exits (no --backbone, so OUT/ckpt.pt):")
        else:
            check_model_config(mcfg)
            state = resume_state(tcfg, dcfg, mcfg, ecfg)
        depth = state["model_config"]["depth"] if state is not None else mcfg.depth
        check_exit_config(ecfg, depth)
        ecfg.exit_layers = written_exit_layers(ecfg.exit_layers, depth)
    except ValueError as e:   # the config checks of model.py and free_min.py
        raise DataError(str(e))
    return state


def backbone_step(model, probe, opt, scaler, train, ids, tcfg, device, dtype, decoder=None,
                  shortcut=None) -> tuple[float, torch.Tensor]:
    """One optimizer step of stage 1 (auxiliary heads, each or None: `probe` the pixel-label PatchProbe,
    `decoder` the label-free PatchDecoder, `shortcut` the AnswerShortcut). Returns the VQA loss and the
    logits (B, A)."""
    batch = to_device(train.batch(ids), device)
    targets = train.soft_targets(ids, model.cfg.num_answers).to(device)         # (B, A)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        patches = batch.pop("patches", None)                                  # cached tokens of a frozen encoder
        if patches is None:
            patches = model.patch_features(batch["images"])                   # (B, P, Dv)
        logits = model(**batch, patches=patches)                              # (B, A)
    loss = soft_cross_entropy(logits, targets)
    total = loss
    if probe is not None:
        labels = train.pixel_labels[train.image_index[ids]].to(device)        # (B, 2, H, W)
        total = total + tcfg.aux_weight * probe.loss(patches, labels, model.cfg.patch_size)
    if decoder is not None:
        pixels = (batch["images"] - model.pixel_mean) / model.pixel_std      # (B, 3, H, W), as the encoder sees it
        total = total + tcfg.recon_weight * decoder.loss(patches, pixels, model.cfg.patch_size)
    if shortcut is not None:
        total = total + tcfg.shortcut_weight * soft_cross_entropy(shortcut(patches, batch["tokens"], batch["text_mask"]),
                                                                  targets)
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss ({total.item()})")
    opt.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if tcfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tcfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.item(), logits.detach()


SHIPPED_BACKBONE = "backbones/shapes-default.pt"   # the trained backbone the repo ships (see README)
ESTIMATE_AFTER = 10                                 # stage-1 steps timed before the run's cost is announced


def announce_cost(seconds_per_step: float, steps_left: int, device: torch.device) -> None:
    """Say up front what stage 1 will cost on this machine, from this run's first measured steps; on a CPU,
    when that is long, name the faster routes."""
    minutes = seconds_per_step * steps_left / 60
    tqdm.write(f"stage 1 will take about {minutes:.0f} min here: {steps_left} more steps at {seconds_per_step:.2f} s "
               f"each on {device} with {torch.get_num_threads()} threads (evaluations not included)")
    if device.type == "cpu" and minutes > 15:
        tqdm.write(f"  faster: a GPU (picked up by itself, minutes), or skip stage 1 and train the exits on the shipped "
                   f"backbone: python train.py --stage exits --backbone {SHIPPED_BACKBONE}")


def sha1_of(tensors: dict) -> str:
    """A fingerprint of named tensors (weights, or a split's inputs): equal only if every value is equal."""
    digest = hashlib.sha1()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(model: VLM, dcfg: DataConfig) -> dict:
    """What the cached tokens of a frozen encoder depend on: the encoder and its exact weights (a hash), its
    input size and resize, and the images. A cache recorded with other values holds other tokens."""
    source = os.path.abspath(dcfg.vqa_images) if dcfg.data == "vqa2" else f"shapes, data seed {dcfg.data_seed}"
    return {"encoder": model.cfg.vit or "built-in", "weights_sha1": sha1_of(model.vit.state_dict()), "input_size": dcfg.image_size,
            "crop_pct": dcfg.crop_pct, "interpolation": dcfg.interpolation, "images": source}


@torch.no_grad()
def cache_features(model: VLM, splits: dict, path: str, identity: dict, named: bool, device, dtype) -> None:
    """A frozen encoder's tokens, computed once per image into a memory-mapped fp16 file (path; its record in
    path + '.json': the encoder identity and the row of every image id), then served by every split in place
    of its images (Split.features). An existing file is reused if its record matches; otherwise it is
    rebuilt, unless the user named it (--feature-cache): then it is refused, so nothing of theirs is lost."""
    ids = {name: image_ids(split) for name, split in splits.items()}
    wanted = sorted({i for v in ids.values() for i in v})
    record = read_feature_record(path)
    if record is not None and (record["identity"] != identity or not set(wanted) <= set(map(int, record["rows"]))):
        if named and record["identity"] != identity:
            raise DataError(f"--feature-cache {path} holds the tokens of {record['identity']}, not of {identity}; "
                            f"name another file or delete it")
        print(f"note: {path} was made for other images or another encoder ({record['identity']['encoder']}); rebuilding it")
        record = None
    if record is None:
        record = build_feature_cache(model, splits, ids, wanted, path, identity, device, dtype)
    features = np.load(path, mmap_mode="r")                                              # (n_cached, P, Dv)
    for name, split in splits.items():
        split.features = features
        split.feature_rows = torch.tensor([record["rows"][str(i)] for i in ids[name]], dtype=torch.long)


def image_ids(split) -> list[int]:
    """The image id of each of a split's images, in the split's image order."""
    first = {}
    for r in split.records:
        first.setdefault(r["image_index"], r["image_id"])
    return [first[j] for j in range(len(split.images))]


def read_feature_record(path: str) -> dict | None:
    """The record next to a feature cache, or None if there is no complete cache at path."""
    if not (os.path.isfile(path) and os.path.isfile(path + ".json")):
        return None
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def build_feature_cache(model: VLM, splits: dict, ids: dict, wanted: list, path: str, identity: dict, device, dtype) -> dict:
    """Run the frozen encoder once over every image (in batches) into path (fp16); then write the record."""
    t0, rows, written = time.time(), {str(i): r for r, i in enumerate(wanted)}, set()
    model.eval()
    sample = model.patch_features(splits["train"].batch(torch.arange(1), cached=False)["images"].to(device))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float16, shape=(len(wanted),) + tuple(sample.shape[1:]))
    for name, split in splits.items():
        todo = [j for j, i in enumerate(ids[name]) if i not in written]
        for chunk in tqdm(list(torch.split(torch.tensor(todo, dtype=torch.long), 64)), desc=f"caching {name} image tokens",
                          leave=False, disable=None):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                tokens = model.patch_features((split.images[chunk].float() / 255.0).to(device))   # (b, P, Dv)
            out[[rows[str(ids[name][j])] for j in chunk.tolist()]] = tokens.float().cpu().numpy().astype(np.float16)
        written |= set(ids[name])
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    record = {"identity": identity, "rows": rows}
    with open(path + ".json.tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".json.tmp", path + ".json")
    print(f"cached the frozen encoder's tokens of {len(wanted)} images in {path} ({time.time() - t0:.0f}s)")
    return record


def train_backbone(model, splits, tokenizer, answers, dcfg, mcfg, tcfg, device, dtype, state=None):
    """Stage 1: train the whole VLM on the train split with soft cross-entropy (plus the auxiliary patch
    loss on shapes data); evaluate on val and checkpoint after every epoch."""
    train, val = splits["train"], splits["val"]
    trainable = torch.nonzero(train.trainable()).squeeze(1)          # (n_train,) questions with a target
    run = stage1_settings(tcfg, train.pixel_labels is not None, mcfg.freeze_vit)   # tcfg (as saved) with autos resolved
    auto_on = [f"--{k.replace('_', '-')} {getattr(run, k):g}" for k in LABEL_FREE
               if getattr(tcfg, k) == AUTO and getattr(run, k) != WITH_PIXEL_LABELS[k]]
    if auto_on:
        print(f"no pixel labels in stage 1: the image encoder learns from answers with {', '.join(auto_on)} "
              f"(the label-free defaults; see train.stage1_settings)")
    # the auxiliary heads that are on (trained alongside, saved in the checkpoint under their names); none
    # with a frozen encoder, which they could not teach
    dv, heads = model.vit.embed_dim, {}
    for name, on, make in (("probe", run.aux_weight > 0 and train.pixel_labels is not None, lambda: PatchProbe(dv)),
                           ("decoder", run.recon_weight > 0, lambda: PatchDecoder(dv, mcfg.patch_size)),
                           ("shortcut", run.shortcut_weight > 0,
                            lambda: AnswerShortcut(dv, mcfg.vocab_size, mcfg.num_answers))):
        if on and not mcfg.freeze_vit:
            heads[name] = make().to(device)
    opt = torch.optim.AdamW(param_groups(model, nn.ModuleList(heads.values()), run), lr=tcfg.lr,
                            weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    total_steps = tcfg.epochs * math.ceil(len(trainable) / tcfg.batch_size)
    step, start_epoch = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        for name, head in heads.items():
            head.load_state_dict(state[name])
        step, start_epoch = state["step"], state["epoch"] + 1
        set_rng_state(state["rng"])
        print(f"resumed from epoch {state['epoch'] + 1} (step {step})")
    ckpt, log, t0 = os.path.join(tcfg.out, "ckpt.pt"), os.path.join(tcfg.out, "log.jsonl"), time.time()
    first_step, timer = step, None
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        bar = tqdm(list(batches(len(trainable), tcfg.batch_size, shuffle=True)), desc=f"backbone {epoch + 1}/{tcfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=None)
        loss_sum, hit_sum, seen = 0.0, 0.0, 0
        for ids in bar:
            ids = trainable[ids]
            set_lr(opt, step, total_steps, run)
            try:
                loss, logits = backbone_step(model, heads.get("probe"), opt, scaler, train, ids, run, device, dtype,
                                             heads.get("decoder"), heads.get("shortcut"))
            except FloatingPointError as e:
                raise SystemExit(f"error: {e} at step {step} of stage 1; the last good checkpoint is kept in {ckpt}. "
                                 f"Try a lower --lr or --grad-clip.")
            step += 1
            if step - first_step == 2:                    # the first steps warm up; time the next ones
                timer = time.perf_counter()
            elif step - first_step == 2 + ESTIMATE_AFTER:
                announce_cost((time.perf_counter() - timer) / ESTIMATE_AFTER, total_steps - step, device)
            loss_sum, seen = loss_sum + loss * len(ids), seen + len(ids)
            hit_sum += train.score(ids, logits.argmax(dim=1).cpu()).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * hit_sum / seen:.1f}%")
        res = evaluate(model, val, device, dtype, tcfg.eval_batch_size)
        elapsed = time.time() - t0
        print(f"epoch {epoch + 1}/{tcfg.epochs}  loss {loss_sum / seen:.3f}  train acc {100 * hit_sum / seen:.1f}%  "
              f"val acc {res['accuracy']:.1f}%  ({elapsed:.0f}s)")
        log_json(log, {"stage": "backbone", "epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen,
                       "train_accuracy": 100 * hit_sum / seen, "val_accuracy": res["accuracy"],
                       "val_per_family": res["per_family"], "time_s": round(elapsed, 1)})
        state = make_state(model, opt, step, epoch, dcfg, mcfg, tcfg, tokenizer, answers)
        save_checkpoint(ckpt, state | {name: head.state_dict() for name, head in heads.items()})
    return model


def report_test(model, splits, device, dtype, tcfg) -> dict:
    """Final test accuracy per family, beside each family's majority-answer baseline."""
    res = evaluate(model, splits["test"], device, dtype, tcfg.eval_batch_size)
    baseline = majority_baseline(splits["train"], splits["test"])
    print(f"test accuracy (official VQA metric): {res['accuracy']:.1f}%  ({len(splits['test'])} questions)")
    print(format_family(res["per_family"], baseline))
    log_json(os.path.join(tcfg.out, "log.jsonl"), {"stage": "backbone", "split": "test", "test_accuracy": res["accuracy"],
                                                   "test_per_family": res["per_family"], "majority_baseline": baseline})
    return res


# ----------------------------------------------------------------------------------------------------
# Stage 2: FREE exits, trained against the frozen backbone
# ----------------------------------------------------------------------------------------------------
def labelled_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """(n,) bool: the questions whose labels the exits may see, a fixed random `fraction` of the train split
    (round(fraction * n) of them, the same ones for every method and epoch of a seed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:round(fraction * n)]] = True
    return mask


@torch.no_grad()
def evaluate_exits(free: FREE, split, device, dtype, batch_size: int) -> dict:
    """Standalone accuracy (%) of every exit (all samples forced to leave there), of the final layer, and
    each exit's agreement (%) with the final layer's answer."""
    free.eval()
    final_pred, exit_pred = [], []
    for ids in batches(len(split), batch_size):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = free.all_outputs(**to_device(split.batch(ids), device))
        final_pred.append(out["final"].argmax(1).cpu())
        exit_pred.append(torch.stack([e.argmax(1).cpu() for e in out["exits"]]))         # (K, B)
    final_pred, exit_pred = torch.cat(final_pred), torch.cat(exit_pred, dim=1)            # (n,), (K, n)
    every = torch.arange(len(split))
    return {"final": 100.0 * split.score(every, final_pred).mean().item(),
            "exits": [{"layer": l, "accuracy": 100.0 * split.score(every, exit_pred[k]).mean().item(),
                       "agreement": 100.0 * (exit_pred[k] == final_pred).float().mean().item()}
                      for k, l in enumerate(free.exit_layers)]}


@torch.no_grad()
def frozen_states(free: FREE, batch: dict, device, dtype) -> dict:
    """What stage 2 reads of the frozen backbone for one batch: the hidden states entering each exit
    ('inputs': K x (B, S, D)), the attention mask (B, 1, 1, S) and the final feature h_L[CLS] ('real': (B, D))."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        states, attn_mask = free.backbone.hidden_states(**batch)
    if attn_mask is None:                                     # no padding in this batch: every token is real
        B, S = states[0].shape[:2]
        attn_mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=states[0].device)
    return {"inputs": [states[l] for l in free.exit_layers], "mask": attn_mask, "real": states[-1][:, 0]}


class StateCache:
    """The frozen backbone's hidden states at the exits for every train question, computed once and kept on
    disk (fp16, memory-mapped: DIR/inputs.npy (n, K, S, D), mask.npy (n, S), real.npy (n, D), record.json),
    so that stage 2's epochs, and further stage-2 runs on the same backbone, data and exit layers, skip
    the backbone's forward pass. A directory recorded for anything else is rebuilt."""

    def __init__(self, free: FREE, split, folder: str, identity: dict, device, dtype, batch_size: int):
        self.folder = folder
        if self.read_record() != identity:
            self.build(free, split, identity, device, dtype, batch_size)
        self.inputs, self.mask, self.real = (np.load(os.path.join(folder, f"{n}.npy"), mmap_mode="r")
                                             for n in ("inputs", "mask", "real"))

    def read_record(self) -> dict | None:
        path = os.path.join(self.folder, "record.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def build(self, free: FREE, split, identity: dict, device, dtype, batch_size: int) -> None:
        t0, n = time.time(), len(split)
        os.makedirs(self.folder, exist_ok=True)
        if os.path.exists(os.path.join(self.folder, "record.json")):
            os.remove(os.path.join(self.folder, "record.json"))              # incomplete until rewritten
        S = int(split.text_mask.sum(dim=1).max()) + free.backbone.num_visual
        K, D = free.num_exits, free.backbone.cfg.dim
        files = {name: np.lib.format.open_memmap(os.path.join(self.folder, f"{name}.npy"), mode="w+", dtype=dt, shape=shape)
                 for name, dt, shape in (("inputs", np.float16, (n, K, S, D)), ("mask", np.bool_, (n, S)),
                                         ("real", np.float16, (n, D)))}
        free.eval()
        for ids in tqdm(list(batches(n, batch_size)), desc="caching the backbone's states", leave=False, disable=None):
            st = frozen_states(free, to_device(split.batch(ids), device), device, dtype)
            s = st["mask"].shape[-1]                                          # this batch's sequence length
            files["inputs"][ids, :, :s] = torch.stack(st["inputs"], dim=1).float().cpu().numpy()   # (B, K, s, D)
            files["mask"][ids, :s] = st["mask"][:, 0, 0].cpu().numpy()                            # (B, s)
            files["real"][ids] = st["real"].float().cpu().numpy()
        for f in files.values():
            f.flush()
        with open(os.path.join(self.folder, "record.json"), "w") as f:
            json.dump(identity, f)
        print(f"cached the frozen backbone's states at the exits for {n} questions in {self.folder} ({time.time() - t0:.0f}s)")

    def get(self, ids: torch.Tensor, device) -> dict:
        """The same dict as frozen_states() for questions ids (fp16 -> fp32). A row keeps the layout of the
        batch it was computed in (text padded to that batch's longest question, then the visual tokens, then
        zeros): masked positions, so the exits read it exactly as a live batch; trailing columns that no
        row of this batch uses are cut."""
        rows = ids.numpy()
        mask = torch.from_numpy(np.asarray(self.mask[rows]))                  # (B, S)
        s = int(mask.any(dim=0).nonzero().max()) + 1
        inputs = torch.from_numpy(np.asarray(self.inputs[rows, :, :s])).float()  # (B, K, s, D)
        return {"inputs": [inputs[:, k].to(device) for k in range(inputs.shape[1])],
                "mask": mask[:, None, None, :s].to(device),                    # (B, 1, 1, s)
                "real": torch.from_numpy(np.asarray(self.real[rows])).float().to(device)}


def exit_step(free: FREE, states: dict, targets, labelled, opt_g, opt_d, scaler, device, dtype, adv_weight: float) -> dict:
    """One batch of stage 2 on the frozen backbone's `states` (frozen_states()): a D step (free only), then a
    G step on the exits. The losses are computed under autocast; backward and the optimizer steps run
    outside it, through the grad scaler (a no-op unless fp16), as in stage 1."""
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    real, attn_mask = states["real"], states["mask"]                                     # h_L: (B, D)
    with torch.no_grad(), autocast():
        final_logits = free.backbone.head(real)                                          # (B, A): the teacher
    conds = [h[:, 0] for h in states["inputs"]]                                          # h_{l_k}[CLS]: K x (B, D)
    with autocast():
        fakes = [free.exit_feature(k, h, attn_mask) for k, h in enumerate(states["inputs"])]  # G_k(h_{l_k})
    stats = {}
    if free.cfg.exit_method == "free":
        # Discriminator step: tell final-layer features (real) from exit features (fake)
        with autocast():
            d_loss, stats = discriminator_loss(free, real, fakes, conds)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
    # Generator step: exit features should fool D and let the frozen head answer like the final layer
    with autocast():
        g_loss, g_stats = generator_loss(free, fakes, final_logits, targets, labelled, real, conds, adv_weight)
    if not math.isfinite(g_stats["g_loss"]) or not all(math.isfinite(v) for v in stats.values()):
        raise FloatingPointError(f"non-finite stage-2 loss (G {g_stats['g_loss']}, D {stats.get('d_loss')})")
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_loss).backward()
    scaler.step(opt_g)
    scaler.update()
    return stats | g_stats


def train_exits(free: FREE, splits, tcfg: TrainConfig, device, dtype, save, progress: dict | None = None) -> None:
    """Stage 2: train the exits (and D) for cfg.exit_epochs; log every exit's val accuracy each epoch and save
    after each. `save(progress)` gets what --resume needs (None after the last epoch); `progress` continues
    an interrupted run."""
    ecfg, train = free.cfg, splits["train"]
    labelled = labelled_mask(len(train), ecfg.label_fraction, tcfg.seed)
    if ecfg.exit_method == "ce":
        pool = torch.nonzero(labelled & train.trainable()).squeeze(1)   # ce sees labelled questions only
    else:
        pool = torch.arange(len(train))                                 # free/kd learn from every question
    opt_g = torch.optim.AdamW(free.generator_parameters(), lr=ecfg.exit_lr, weight_decay=0.01)
    opt_d = torch.optim.AdamW(free.discs.parameters(), lr=ecfg.disc_lr, betas=(0.5, 0.999), weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(tcfg.seed)
    start = 0
    if progress is not None:
        for obj, key in ((opt_g, "opt_g"), (opt_d, "opt_d"), (scaler, "scaler")):
            obj.load_state_dict(progress[key])
        gen.set_state(progress["batch_order"])
        set_rng_state(progress["rng"])
        start = progress["epoch"] + 1
        print(f"resumed stage 2 after epoch {start} of {ecfg.exit_epochs}")
    cache = None
    if tcfg.state_cache:
        identity = {"backbone_sha1": sha1_of(free.backbone.state_dict()), "exit_layers": free.exit_layers,
                    "train_split_sha1": sha1_of({"images": train.images, "image_index": train.image_index,
                                                 "tokens": train.tokens, "text_mask": train.text_mask})}
        cache = StateCache(free, train, tcfg.state_cache, identity, device, dtype, tcfg.eval_batch_size)
    log, t0 = os.path.join(tcfg.out, "log.jsonl"), time.time()
    for epoch in range(start, ecfg.exit_epochs):
        free.train()
        adv_weight = ecfg.lambda_adv if epoch >= ecfg.adv_warmup else 0.0     # distillation/CE only while warming up
        sums, seen = defaultdict(float), 0
        bar = tqdm(list(batches(len(pool), tcfg.batch_size, shuffle=True, generator=gen)),
                   desc=f"exits ({ecfg.exit_method}) {epoch + 1}/{ecfg.exit_epochs}", leave=False, dynamic_ncols=True, disable=None)
        for ids in bar:
            ids = pool[ids]
            targets = train.soft_targets(ids, free.backbone.cfg.num_answers).to(device) if ecfg.label_fraction > 0 else None
            states = cache.get(ids, device) if cache else frozen_states(free, to_device(train.batch(ids), device), device, dtype)
            try:
                stats = exit_step(free, states, targets, labelled[ids].to(device), opt_g, opt_d, scaler, device, dtype,
                                  adv_weight)
            except FloatingPointError as e:
                raise SystemExit(f"error: {e} in stage 2, epoch {epoch + 1}; the last good checkpoint is kept "
                                 f"in {os.path.join(tcfg.out, 'ckpt.pt')}. Try a lower --exit-lr / --disc-lr.")
            for k, v in stats.items():
                sums[k] += v
            seen += 1
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()})
        res = evaluate_exits(free, splits["val"], device, dtype, tcfg.eval_batch_size)
        means = {k: v / max(1, seen) for k, v in sums.items()}
        print(f"exits epoch {epoch + 1}/{ecfg.exit_epochs}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items()) +
              "  val acc by exit: " + " ".join(f"L{e['layer']}:{e['accuracy']:.1f}" for e in res["exits"]) +
              f"  final:{res['final']:.1f}  ({time.time() - t0:.0f}s)")
        log_json(log, {"stage": "exits", "method": ecfg.exit_method, "epoch": epoch + 1, **means,
                       "val_final": res["final"], "val_exits": res["exits"], "time_s": round(time.time() - t0, 1)})
        last = epoch + 1 == ecfg.exit_epochs
        save(None if last else {"epoch": epoch, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                "scaler": scaler.state_dict(), "batch_order": gen.get_state(), "rng": rng_state()})


def print_depth_profile(res: dict, split_name: str) -> None:
    """Each exit's standalone accuracy next to the final layer's: where mid-crisis and overthinking show."""
    print(f"depth profile on {split_name} (every sample forced to leave at that exit):")
    for e in res["exits"]:
        print(f"  exit after layer {e['layer']:>2}: {e['accuracy']:5.1f}%   agrees with final {e['agreement']:5.1f}%")
    print(f"  final layer         : {res['final']:5.1f}%")


def main(argv=None) -> None:
    args, dcfg, mcfg, tcfg = parse_args(argv)
    ecfg = config_from_args(ExitConfig, args)
    try:
        state = validate(dcfg, mcfg, tcfg, ecfg)     # every flag, before any data is made or step taken
        if tcfg.threads > 0:
            torch.set_num_threads(tcfg.threads)
        device, dtype, why = pick_device(tcfg.device)
        print(f"device: {device}  ({why}); torch threads: {torch.get_num_threads()}")
        run(args, state, dcfg, mcfg, tcfg, ecfg, device, dtype)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def run(args, state, dcfg, mcfg, tcfg, ecfg, device, dtype) -> None:
    """Stage 1 (unless --stage exits or an interrupted stage 2 is resumed), then stage 2 (unless --stage backbone).
    `state`: the checkpoint validate() read (a backbone, or the run to resume), or None."""
    os.makedirs(tcfg.out, exist_ok=True)
    ckpt_path = os.path.join(tcfg.out, "ckpt.pt")
    torch.manual_seed(tcfg.seed)
    from_backbone = state is not None and (tcfg.stage == "exits" or "exits" in state)
    if from_backbone:
        model, _, tokenizer, answers, dcfg = build_from_checkpoint(state)
        mcfg = model.cfg
    else:
        tokenizer = Tokenizer.from_str(state["tokenizer"]) if state else None
        answers = state["answers"] if state else None
    t = time.time()
    splits, tokenizer, answers = load_data(dcfg, tokenizer, answers)
    mcfg.vocab_size, mcfg.num_answers = tokenizer.get_vocab_size(), len(answers)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"data: {dcfg.data} ({sizes} questions), {len(answers)} answers, {mcfg.vocab_size} tokens ({time.time() - t:.1f}s)")
    print("config:", json.dumps({"preset": args.preset, "data": asdict(dcfg), "model": asdict(mcfg),
                                 "train": asdict(tcfg), "exits": asdict(ecfg)}))
    if not from_backbone:
        model = VLM(cfg=mcfg)
        if state is not None:
            model.load_state_dict(state["model"])
        else:
            start_fresh_log(tcfg.out)
        model.to(device)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained), "
              f"{mcfg.depth} language-model layers of width {mcfg.dim}")
        if mcfg.freeze_vit:
            use_cached_features(model, splits, dcfg, tcfg, device, dtype, measure=True)
        train_backbone(model, splits, tokenizer, answers, dcfg, mcfg, tcfg, device, dtype, state)
        res = report_test(model, splits, device, dtype, tcfg)
        if tcfg.export:
            export_backbone(tcfg.export, model, res, dcfg, tcfg, tokenizer, answers)
        if tcfg.stage == "backbone":
            return
        state = load_checkpoint(ckpt_path)
        source = {"path": ckpt_path, "train_config": state["train_config"]}
    elif "exit_progress" in state:
        source = state["backbone_source"]                     # an interrupted stage 2, continued
    else:
        source = {"path": tcfg.backbone or ckpt_path, "train_config": state.get("train_config")}
        if os.path.abspath(source["path"]) != os.path.abspath(ckpt_path):
            start_fresh_log(tcfg.out)                         # a new run in OUT: the old log is not about it
    if from_backbone and mcfg.freeze_vit:
        use_cached_features(model.to(device), splits, dcfg, tcfg, device, dtype, measure=False)
    run_exits(model, state, source, splits, ecfg, tcfg, device, dtype)


def use_cached_features(model: VLM, splits: dict, dcfg: DataConfig, tcfg: TrainConfig, device, dtype, measure: bool) -> None:
    """A frozen encoder: serve its cached tokens (computed now if needed) in place of the images, and, before
    stage 1, measure what a training step costs with them and without them."""
    path = tcfg.feature_cache or os.path.join(tcfg.out, "features.npy")
    if measure:
        uncached = time_stage1_step(model, splits["train"], tcfg, device, dtype)
    cache_features(model, splits, path, encoder_identity(model, dcfg), bool(tcfg.feature_cache), device, dtype)
    if measure:
        cached = time_stage1_step(model, splits["train"], tcfg, device, dtype)
        print(f"a stage-1 step (batch {tcfg.batch_size}, forward and backward): {1000 * cached:.0f} ms with the cached "
              f"image tokens, {1000 * uncached:.0f} ms running the frozen encoder ({uncached / cached:.1f}x)")


def time_stage1_step(model: VLM, split, tcfg: TrainConfig, device, dtype, repeats: int = 3) -> float:
    """Median seconds of a stage-1 forward and backward on one batch (no optimizer step: weights unchanged)."""
    ids = torch.arange(min(tcfg.batch_size, len(split)))
    targets = split.soft_targets(ids, model.cfg.num_answers).to(device)
    times = []
    for _ in range(repeats + 1):                               # the first is a warm-up
        start = time.perf_counter()
        batch = to_device(split.batch(ids), device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = soft_cross_entropy(model(**batch), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def export_backbone(path: str, model: VLM, res: dict, dcfg: DataConfig, tcfg: TrainConfig, tokenizer, answers) -> None:
    """The backbone alone, small enough to ship: fp16 weights (loaded back into fp32), the configs, tokenizer,
    answer vocabulary, and the test accuracy it reached (which the tests check it still reaches)."""
    weights = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_checkpoint(path, {"model": weights, "model_config": asdict(model.cfg), "data_config": asdict(dcfg),
                           "train_config": asdict(tcfg), "answers": answers, "tokenizer": tokenizer.to_str(),
                           "test_accuracy": res["accuracy"], "test_per_family": res["per_family"]})
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


def start_fresh_log(out: str) -> None:
    """A new run in OUT: drop the log and report files an earlier run left there, so that nothing in OUT
    describes another run (checkpoints are replaced atomically when this run saves)."""
    for name in ("log.jsonl", "report.json", "speedup.png"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


# What a stage-2 checkpoint keeps of the backbone it starts from: the weights and what rebuilds them.
BACKBONE_KEYS = ("model", "model_config", "data_config", "answers", "tokenizer")


def run_exits(model: VLM, state: dict, source: dict, splits, ecfg: ExitConfig, tcfg: TrainConfig, device, dtype) -> None:
    """Stage 2 on a trained backbone. The checkpoint then holds the frozen backbone (and `source`: the file it
    came from and how that was trained), this run's exits and configs, and nothing else of another run."""
    model.to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    free = FREE(model, ecfg).to(device)
    progress = state.get("exit_progress") if "exits" in state else None
    if progress is not None:
        try:
            free.load_exits(state["exits"])
        except ValueError as e:
            raise DataError(f"--resume {os.path.join(tcfg.out, 'ckpt.pt')}: {e}")
    print(f"exits: {ecfg.exit_method} after layers {free.exit_layers} (head: {ecfg.exit_head}, discriminator: "
          f"{ecfg.disc}, label fraction {ecfg.label_fraction}); "
          f"{sum(p.numel() for p in free.generator_parameters()) / 1e6:.2f}M trainable exit parameters")
    if progress is None:
        print_depth_profile(evaluate_exits(free, splits["val"], device, dtype, tcfg.eval_batch_size), "val before stage 2")
    ckpt_path = os.path.join(tcfg.out, "ckpt.pt")
    own = {k: state[k] for k in BACKBONE_KEYS} | {"backbone_source": source}

    def save(progress: dict | None) -> None:
        exits = {k: v for k, v in free.state_dict().items() if not k.startswith("backbone.")}
        extra = {} if progress is None else {"exit_progress": progress}
        save_checkpoint(ckpt_path, own | {"exits": exits, "exit_config": asdict(ecfg), "train_config": asdict(tcfg)} | extra)
    train_exits(free, splits, tcfg, device, dtype, save, progress)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    if changed:
        raise RuntimeError(f"stage 2 changed the frozen backbone ({', '.join(changed[:3])}): this is a bug, please report it")
    res = evaluate_exits(free, splits["test"], device, dtype, tcfg.eval_batch_size)
    print_depth_profile(res, "test")
    log_json(os.path.join(tcfg.out, "log.jsonl"), {"stage": "exits", "split": "test", "method": ecfg.exit_method,
                                                   "label_fraction": ecfg.label_fraction,
                                                   "test_final": res["final"], "test_exits": res["exits"]})
    if tcfg.final_eval:
        final_report(free, splits, tcfg, ckpt_path)


def final_report(free: FREE, splits, tcfg: TrainConfig, ckpt_path: str) -> None:
    """infer.py's early-exit report on the test split, run and timed where the model trained (the GPU on a
    GPU machine, the CPU otherwise; the report names the device and threads). Its calibrated point (rule,
    threshold, exits) is stored in this run's checkpoint for infer.py --image."""
    free.eval()
    icfg = infer.InferConfig(json=os.path.join(tcfg.out, "report.json"), plot=os.path.join(tcfg.out, "speedup.png"),
                             timing_samples=tcfg.report_timing_samples, timing=tcfg.report_timing)
    report = infer.build_report(free, splits, "test", icfg)
    infer.print_report(report, free)
    infer.write_json(icfg.json, report)
    infer.plot_report(report, icfg.plot)
    state = load_checkpoint(ckpt_path) | {"calibrated": {k: report["calibrated"].get(k) for k in ("rule", "threshold", "exit_layers")}}
    save_checkpoint(ckpt_path, state)
    print(f"wrote {icfg.json} and {icfg.plot}")


if __name__ == "__main__":
    main()
