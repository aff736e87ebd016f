"""The two training stages of free-min.

    python train.py                     # stage 1 (backbone), stage 2 (FREE exits), then the early-exit report
    python train.py --preset tiny       # the same on a tiny model, in a minute
    python train.py --stage exits --backbone backbones/shapes-default.pt     # stage 2 on the shipped backbone
    python train.py --resume            # continue an interrupted run in --out
    python train.py --data vqa2 --vqa-questions Q.json --vqa-annotations A.json --vqa-images DIR

Stage 1 trains the backbone VLM (model.py) on VQA-as-classification: the paper starts from a pretrained
BLIP-2, which we have none of offline. Stage 2 freezes it and trains the exits (free_min.py): one D step and
one G step per batch (exit_step). Then infer.py's early-exit report runs on the test split.
Each stage prints its progress, logs one JSON line per evaluation to OUT/log.jsonl and writes OUT/ckpt.pt
after every epoch (weights, optimizer, step, RNG, configs, tokenizer, answers), atomically.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

import infer
from data import (COLORS, FACTS, FAMILIES, SHAPES, DataConfig, DataError, Parser, TrainScenes, add_config_args, batches,
                  check_data_config, config_from_args, fact_classes, load_data, majority_baseline, pick_device,
                  pick_threads, save_atomic, to_device)
from free_min import (FREE, METHODS, ExitConfig, build_from_checkpoint, check_exit_config, discriminator_loss,
                      generator_loss, load_checkpoint, resolve_exit_layers)
from model import VLM, ModelConfig, check_model_config, describe_timm_vit, make_vit, soft_cross_entropy


@dataclass
class TrainConfig:
    out: str = field(default="out", metadata={"help": "output folder (ckpt.pt, log.jsonl, report.json, speedup.png)"})
    epochs: int = field(default=60, metadata={"help": "stage-1 epochs: a model trained from scratch needs this many "
                                                      "to learn the relational families (22,500 steps of 64)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size (both stages)"})
    lr: float = field(default=1e-3, metadata={"help": "stage-1 peak AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "stage-1 AdamW weight decay"})
    warmup_steps: int = field(default=300, metadata={"help": "stage-1 linear warm-up steps before the cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "stage-1 gradient-norm clip (0 = off)"})
    aux_weight: float = field(default=1.0, metadata={"help": "weight of stage 1's pixel-label loss (shapes data: ViT "
                                                             "tokens predict the colour and shape under them); 0 = off, "
                                                             "and then two label-free aids teach the encoder instead (an "
                                                             "answer head on its tokens, and each token reconstructing "
                                                             "its patch)"})
    scene_weight: float = field(default=1.0, metadata={
        "help": "weight of stage 1's scene-fact loss (shapes data: the language model's [CLS] predicts the facts each "
                "answer is computed from, see SceneHeads; 0 = off)"})
    sample_families: str = field(default="by-error", metadata={
        "help": "shapes data, stage 1: uniform (every family asked as often) or by-error (each epoch's scenes ask each "
                "family in proportion to its training error, see family_weights)", "choices": ["uniform", "by-error"]})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batch order and labelled fraction"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cuda, mps or cpu",
                                                  "choices": ["auto", "cuda", "mps", "cpu"]})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = the cores not busy with other work, "
                                                      "printed at the start)"})
    stage: str = field(default="all", metadata={"help": "all: backbone then exits; backbone: stage 1 only; exits: "
                                                        "stage 2 only, on --backbone (or OUT/ckpt.pt)",
                                                "choices": ["all", "backbone", "exits"]})
    backbone: str = field(default="", metadata={"help": "stage 2: a trained checkpoint whose backbone is reused, frozen"})
    resume: bool = field(default=False, metadata={"help": "continue the interrupted run in OUT (same settings)"})
    final_eval: bool = field(default=True, metadata={"help": "end with infer.py's early-exit report on the test split"})
    export: str = field(default="", metadata={"help": "also write the run's checkpoint to this file in fp16, without "
                                                      "optimizer state (after stage 1, then after stage 2 with the "
                                                      "exits and their calibrated point): how backbones/ is made"})


# Named presets: overrides of the dataclass defaults (default = the dataclass defaults), and what each is for.
PRESETS = {
    "tiny": dict(train_images=300, val_images=40, test_images=40, dim=64, depth=4, heads=2, epochs=4, batch_size=32,
                 warmup_steps=20, lr=2e-3, exit_epochs=2),
    "default": dict(),
    "base": dict(train_images=20000, val_images=1000, test_images=1000, dim=256, depth=12, heads=8, vit_dim=128,
                 vit_depth=2, epochs=12, batch_size=128, lr=5e-4, warmup_steps=1000),
}
PRESET_USE = {"tiny": "a first look, a minute on a CPU", "default": "a 2-core CPU or a laptop GPU",
              "base": "a bigger model, for a GPU"}
SHIPPED_BACKBONE = "backbones/shapes-default.pt"   # the trained stage-1 backbone the repo ships (README)
EVAL_BATCH = 256


def parse_args(argv=None):
    """--preset picks the defaults; every config field is a flag that overrides them."""
    pre = Parser(add_help=False)
    pre.add_argument("--preset", default="default", choices=list(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="named defaults: default (a 2-core CPU or a laptop GPU); " +
                        "; ".join(f"{name} ({PRESET_USE[name]}) changes " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                  for k, v in PRESETS[name].items()) for name in PRESETS if PRESETS[name]) +
                        ". The defaults shown below are those of the preset given")
    for cls in (DataConfig, ModelConfig, TrainConfig, ExitConfig):
        add_config_args(p, cls, PRESETS[preset])
    args = p.parse_args(argv)
    return args, *(config_from_args(cls, args) for cls in (DataConfig, ModelConfig, TrainConfig, ExitConfig))


def pick_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype and why: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling),
    float32 elsewhere (on CPUs, bf16 autocast was slower than float32, RESULTS.md)."""
    # including_emulation=False: a GPU without bf16 units (T4, V100, RTX 20xx) would emulate it, slowly
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16, "bf16 autocast: this GPU computes in bfloat16 (no loss scaling needed)"
    if device.type == "cuda":
        return torch.float16, "fp16 autocast with a grad scaler: this GPU has no bfloat16"
    return torch.float32, f"float32: mixed precision is used on CUDA only, and this is {device.type}"


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward passes' precision context (a no-op in float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# Several processes (torchrun --standalone --nproc_per_node=N train.py ...): data parallel. Every process
# holds the whole model and takes its slice of each global batch (--batch-size stays the global batch, so
# the schedule is the one of a single process); after every backward the gradients are averaged over the
# processes with one all_reduce, and every process takes the same step. Only process 0 evaluates, prints,
# logs and writes files; the others wait for it at the end of each epoch.
# NOTE: DistributedDataParallel's wrapper does the same averaging with bucketed all-reduces that overlap the
# backward; it is not used because stage 2 alternates two optimisers (D's, then the exits') over two
# parameter sets, each step's backward reaching only one of them, which its reducer is not made for.
WORLD = {"rank": 0, "size": 1}


def init_distributed(device_choice: str) -> None:
    """Under torchrun (RANK in the environment): join the process group, NCCL on CUDA and gloo on CPU, one
    GPU per process; silence the standard output of every process but process 0."""
    if "RANK" not in os.environ:
        return
    cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda")
    if cuda:                                   # before the group: NCCL binds each process to its current GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    WORLD.update(rank=dist.get_rank(), size=dist.get_world_size())
    if WORLD["rank"] > 0:
        sys.stdout = open(os.devnull, "w")


def is_main() -> bool:
    return WORLD["rank"] == 0


def shard(ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's slice of a global batch, and the weight that makes the average of the processes' mean
    losses the mean over the global batch (1 in a single process)."""
    local = ids.tensor_split(WORLD["size"])[WORLD["rank"]]
    return local, len(local) * WORLD["size"] / len(ids)


def average_gradients(params: list) -> None:
    """The gradients' mean over the processes (one all_reduce of them all, flattened); none in one process."""
    if WORLD["size"] == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.div_(WORLD["size"]).split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def collective_device(backend: str) -> torch.device:
    """Where a tensor must live for the process group's collectives: NCCL serves CUDA tensors only (this
    process's GPU), gloo serves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sums over the processes of a few numbers (the values themselves in one process)."""
    if WORLD["size"] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(dist.get_backend()))
    dist.all_reduce(t)
    return t.tolist()


def wait_for_main() -> None:
    """The other processes wait here while process 0 evaluates and writes."""
    if WORLD["size"] > 1:
        dist.barrier()


def progress_bar(iterable, desc: str):
    """A progress bar (process 0 only)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main() else True)


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_step(opt, loss: torch.Tensor, scaler, clip: float = 0.0) -> None:
    """Backward, the gradients' mean over the processes, and the step through the grad scaler (a no-op unless
    fp16), outside autocast; clip if asked (the global gradient norm: after the mean)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients([p for g in opt.param_groups for p in g["params"]])
    if clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    scaler.step(opt)


# ----------------------------------------------------------------------------------------------------
# Stage 1's auxiliary losses: a stand-in for a pretrained image encoder
# ----------------------------------------------------------------------------------------------------
# NOTE (deviation): BLIP-2 starts from a ViT pretrained on web-scale data, whose tokens already say what is
# where. Ours is trained from scratch on answers, which reach a visual token only through every language-
# model layer and an attention that starts out spread evenly: for thousands of steps every token is told the
# same thing, and the encoder is slow to learn shapes. Stage 1 therefore trains an auxiliary head beside
# the VLM (dropped afterwards): on shapes data, the pixel labels of the generator (PatchProbe); without them
# (--aux-weight 0, or VQA v2), the label-free aids below, with these fixed settings (RESULTS.md):
LABEL_FREE = {"shortcut": 3.0,           # weight of AnswerShortcut's answer loss
              "decoder": 1.0,            # weight of PatchDecoder's pixel reconstruction loss
              "vit_blocks_lr": 0.3}      # the encoder's transformer blocks train at 0.3 x the learning rate


class PatchProbe(nn.Module):
    """A linear read-out of every ViT token -> the colour and shape that cover its patch (pixel labels)."""

    def __init__(self, vit_dim: int):
        super().__init__()
        self.colour = nn.Linear(vit_dim, len(COLORS) + 1)   # + background
        self.shape = nn.Linear(vit_dim, len(SHAPES) + 1)

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """patches (B, P, Dv); batch['pixel_labels'] (B, 2, H, W) uint8 -> summed cross-entropy."""
        total = 0.0
        for channel, head in ((0, self.colour), (1, self.shape)):
            target = self.targets(batch["pixel_labels"], batch["patch_size"], channel)       # (B, P)
            logits = head(patches.float())                                                   # (B, P, C)
            total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return total

    @staticmethod
    def targets(pixel_labels: torch.Tensor, patch_size: int, channel: int) -> torch.Tensor:
        """(B, 2, H, W) -> (B, P): the class of `channel` (0 colour, 1 shape) covering at least a quarter of
        each patch (the most common such one), else 0 = background."""
        classes = 1 + (len(COLORS) if channel == 0 else len(SHAPES))
        onehot = F.one_hot(pixel_labels[:, channel].long(), classes)                        # (B, H, W, C)
        cover = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch_size)                # (B, C, g, g)
        cover[:, 0] = 0.0                                                                     # background never "covers"
        frac, label = cover.max(dim=1)                                                        # (B, g, g)
        return torch.where(frac >= 0.25, label, torch.zeros_like(label)).flatten(1)          # (B, P)


class PatchDecoder(nn.Module):
    """Label-free: every ViT token predicts the pixels of its own patch (averaged down to r x r), so that
    tokens describe their patch from the first steps. It teaches colour more than shape (RESULTS.md)."""

    def __init__(self, vit_dim: int, patch_size: int):
        super().__init__()
        self.r = min(4, patch_size)
        self.pixels = nn.Linear(vit_dim, 3 * self.r * self.r)

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """patches (B, P, Dv); batch['pixels'] (B, 3, H, W), normalised as the encoder sees them -> MSE."""
        images, p, r = batch["pixels"].float(), batch["patch_size"], self.r
        B, g = images.shape[0], images.shape[-1] // p
        target = F.avg_pool2d(images, p // r)                                                 # (B, 3, g*r, g*r)
        target = target.view(B, 3, g, r, g, r).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * r * r)  # (B, P, 3r^2)
        return F.mse_loss(self.pixels(patches.float()), target)


class AnswerShortcut(nn.Module):
    """Label-free: the answer predicted a second time straight from the ViT tokens by a one-layer head (their
    mean, a pooling by the question's words, and a bag of those words into an MLP), on the VLM's targets,
    as the auxiliary classifiers of deep supervision do: the answer's gradient is then one layer away."""

    def __init__(self, vit_dim: int, vocab_size: int, num_answers: int, hidden: int = 256):
        super().__init__()
        self.words = nn.Embedding(vocab_size, vit_dim)
        self.query = nn.Linear(vit_dim, vit_dim)
        self.mlp = nn.Sequential(nn.Linear(3 * vit_dim, hidden), nn.GELU(), nn.Linear(hidden, num_answers))

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """patches (B, P, Dv), tokens (B, T), text_mask (B, T) -> logits (B, A)."""
        x = F.layer_norm(patches.float(), patches.shape[-1:])                                # (B, P, Dv)
        m = text_mask[..., None].float()                                                      # (B, T, 1)
        q = (self.words(tokens) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)                  # (B, Dv) bag of words
        scores = torch.einsum("bpd,bd->bp", x, self.query(q)) / x.shape[-1] ** 0.5           # (B, P)
        pooled = torch.einsum("bp,bpd->bd", scores.softmax(dim=1), x)                         # (B, Dv)
        return self.mlp(torch.cat([x.mean(dim=1), pooled, q], dim=1))                         # (B, A)

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        return soft_cross_entropy(self(patches, batch["tokens"], batch["text_mask"]), batch["targets"])


# NOTE (deviation): scene supervision of the language model, the counterpart of PatchProbe for the layers
# above the encoder. Relational questions ("what colour is the object closest to the red square?", "are there
# fewer circles than squares?") are answered from intermediate facts: where the reference and the target
# are, how many there are of each group. From answers alone a small transformer finds these only after
# millions of questions (RESULTS.md); a pretrained BLIP-2 arrives knowing them. SceneHeads reads the facts
# (data.FACTS) off the final layer's [CLS] feature h_L, beside the answer, and adds their cross-entropy to
# stage 1's loss. Where they are read is a choice with a consequence: read after a middle layer, they would
# make the model finish the relation there, and so decide where hard questions can first be answered. Read
# after the last layer, they say nothing of where in depth it is computed: that is left to the model (and
# read after middle layers they were also learned far slower, RESULTS.md).
class SceneHeads(nn.Module):
    """Linear read-outs of each scene fact (data.FACTS) from the final layer's [CLS] feature h_L."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, fact_classes(name)) for name in FACTS})

    def logits(self, h_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """h_L[CLS] (B, D) -> fact name -> logits (B, classes)."""
        return {name: head(h_cls.float()) for name, head in self.heads.items()}

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """batch['states'] h_0..h_L, batch['facts'] (B, len(FACTS)) with -1 = absent -> the mean over the
        batch of each question's summed cross-entropy over the facts it has (0 for a question with none), so
        that a question's facts weigh beside its answer as they would if every question had facts (averaged
        over the few questions that have them, they drowned the answers' gradient, RESULTS.md)."""
        facts = batch["facts"]                                                       # (B, F)
        total = facts.new_zeros((), dtype=torch.float32)
        for j, (name, logits) in enumerate(self.logits(batch["states"][-1][:, 0]).items()):
            per_question = F.cross_entropy(logits, facts[:, j].clamp(min=0), reduction="none")   # (B,)
            total = total + (per_question * (facts[:, j] >= 0)).sum() / len(facts)
        return total


def aux_heads(model: VLM, split, tcfg: TrainConfig) -> dict:
    """The auxiliary heads stage 1 trains, name -> (weight, head): PatchProbe where there are pixel labels and
    --aux-weight > 0, else the label-free aids (neither when the encoder is frozen: they could not teach it);
    and SceneHeads where the data has scene facts and --scene-weight > 0."""
    cfg, dv = model.cfg, model.vit.embed_dim
    if cfg.freeze_vit:
        heads = {}
    elif split.pixel_labels is not None and tcfg.aux_weight > 0:
        heads = {"probe": (tcfg.aux_weight, PatchProbe(dv))}
    else:
        heads = {"shortcut": (LABEL_FREE["shortcut"], AnswerShortcut(dv, cfg.vocab_size, cfg.num_answers)),
                 "decoder": (LABEL_FREE["decoder"], PatchDecoder(dv, cfg.patch_size))}
    if split.facts is not None and tcfg.scene_weight > 0:
        heads["scene"] = (tcfg.scene_weight, SceneHeads(cfg.dim))
    return heads


def stage1_optimizer(model: VLM, heads: dict, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the VLM and its auxiliary heads; with the label-free aids, the encoder's transformer blocks
    and final norm in a group of their own at LABEL_FREE['vit_blocks_lr'] x the rate ('lr_scale')."""
    params = [p for p in model.parameters() if p.requires_grad] + [p for _, h in heads.values() for p in h.parameters()]
    groups = [{"params": params}]
    if "shortcut" in heads:
        slow = {id(p) for m in (model.vit.blocks, model.vit.norm) for p in m.parameters()}
        groups = [{"params": [p for p in params if id(p) not in slow]},
                  {"params": [p for p in params if id(p) in slow], "lr_scale": LABEL_FREE["vit_blocks_lr"]}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98),
                             fused=on_gpu(params))


def on_gpu(params) -> bool:
    """Whether AdamW may use its fused CUDA kernel: one launch for all parameters instead of several each."""
    return all(p.is_cuda for p in params)


# ----------------------------------------------------------------------------------------------------
# Stage 1: the backbone
# ----------------------------------------------------------------------------------------------------
def backbone_step(model: VLM, heads: dict, opt, scaler, split, ids, tcfg: TrainConfig, device, dtype,
                  weight: float = 1.0) -> tuple:
    """One optimizer step of stage 1: soft cross-entropy on the answers, plus the auxiliary heads' losses
    (times `weight`, see shard). Returns the answer loss (float) and the logits (B, A)."""
    batch = to_device(split.batch(ids), device)
    targets = split.soft_targets(ids, model.cfg.num_answers).to(device)                  # (B, A)
    with autocast(device, dtype):
        patches = batch.pop("patches", None)                                              # a frozen encoder's, or None
        patches = model.patch_features(batch["images"]) if patches is None else patches  # (B, P, Dv)
        states, _ = model.hidden_states(**batch, patches=patches)                         # L+1 x (B, S, D)
        logits = model.head(states[-1][:, 0])                                             # (B, A)
    loss = soft_cross_entropy(logits, targets)
    total = loss
    if heads:
        aux = dict(batch, targets=targets, patch_size=model.cfg.patch_size, states=states,
                   pixels=None if batch["images"] is None else (batch["images"] - model.pixel_mean) / model.pixel_std,
                   pixel_labels=None if split.pixel_labels is None else split.pixel_labels[split.image_index[ids]].to(device),
                   facts=None if split.facts is None else split.facts[ids].to(device))
        total = total + sum(weight * head.loss(patches, aux) for weight, head in heads.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss ({total.item()})")
    optimizer_step(opt, total * weight, scaler, tcfg.grad_clip)
    scaler.update()
    return loss.item(), logits.detach()


# Spend the steps where the learning is (--sample-families by-error): the easy families are learned in a
# third of stage 1, and after that their questions teach little. Each later epoch's scenes then ask every
# family in proportion to its error on the training questions of the epoch before (the floor keeps the
# learned ones from being forgotten). The training questions, not val: no choice is made on val here.
FAMILY_FLOOR = 0.05


def family_weights(per_family_accuracy: dict[str, float], families: list[str]) -> dict[str, float]:
    """Family -> sampling weight: its error rate plus FAMILY_FLOOR (1 + floor for a family not yet seen)."""
    return {f: 1 - per_family_accuracy.get(f, 0.0) / 100 + FAMILY_FLOOR for f in families}


def add_family_scores(by_family: dict, split, ids: torch.Tensor, scores: torch.Tensor) -> None:
    """Add the scores of questions `ids` to by_family: family -> [sum of scores, questions]."""
    for i, s in zip(ids.tolist(), scores.tolist()):
        fam = by_family[split.records[i]["family"]]
        fam[0], fam[1] = fam[0] + s, fam[1] + 1


def family_accuracy(by_family: dict) -> dict[str, float]:
    """Family -> accuracy (%) over all processes, from each process's by_family (the same list of families
    in every process, for all_sum)."""
    totals = all_sum([x for f in FAMILIES for x in by_family[f]])                # [sum, n] per family
    return {f: 100 * totals[2 * i] / totals[2 * i + 1] for i, f in enumerate(FAMILIES) if totals[2 * i + 1]}


def train_backbone(model: VLM, splits: dict, tcfg: TrainConfig, device, dtype, save, state: dict | None,
                   scenes=None) -> None:
    """Stage 1: the whole VLM (and its auxiliary heads) on the train split of each epoch (scenes(epoch), a
    data.TrainScenes; None: splits['train'] every epoch); val accuracy per family and a checkpoint (save(epoch,
    step, opt, scaler, heads)) after every epoch. `state` continues an interrupted run."""
    train_split = scenes or (lambda epoch: splits["train"])
    train = splits["train"]
    trainable = torch.nonzero(train.trainable()).squeeze(1)                 # questions with an answer to learn
    heads = {name: (w, h.to(device)) for name, (w, h) in aux_heads(model, train, tcfg).items()}
    opt, scaler = stage1_optimizer(model, heads, tcfg), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    total_steps, step, first_epoch = tcfg.epochs * math.ceil(len(trainable) / tcfg.batch_size), 0, 0
    if state is not None:
        step, first_epoch = resume_stage(state, opt, scaler, heads)
    print(f"stage 1: {total_steps} steps; auxiliary heads: {', '.join(heads) or 'none'}")
    clock = StepClock(total_steps - step, device)
    for epoch in range(first_epoch, tcfg.epochs):
        model.train()
        train = train_split(epoch)
        trainable = torch.nonzero(train.trainable()).squeeze(1)
        bar = progress_bar(list(batches(len(trainable), tcfg.batch_size, shuffle=True)), f"backbone {epoch + 1}/{tcfg.epochs}")
        loss_sum = hit_sum = seen = 0
        by_family = defaultdict(lambda: [0.0, 0.0])
        for ids in bar:
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total_steps, tcfg) * group.get("lr_scale", 1.0)
            ids, weight = shard(trainable[ids])                         # all of the batch in one process
            loss, logits = backbone_step(model, heads, opt, scaler, train, ids, tcfg, device, dtype, weight)
            step, seen, loss_sum = step + 1, seen + len(ids), loss_sum + loss * len(ids)
            scores = train.score(ids, logits.argmax(dim=1).cpu())
            hit_sum += scores.sum().item()
            add_family_scores(by_family, train, ids, scores)
            clock.tick()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * hit_sum / seen:.1f}%")
        if tcfg.sample_families == "by-error" and scenes is not None:
            scenes.weights = family_weights(family_accuracy(by_family), list(FAMILIES))
        sums = all_sum([loss_sum, hit_sum, seen])                      # every process, before process 0 alone
        if is_main():
            log_backbone_epoch(model, splits["val"], tcfg, {"epoch": epoch + 1, "step": step, "time_s": clock.elapsed(),
                               "family_weights": getattr(scenes, "weights", None)}, sums)
            save(epoch, step, opt, scaler, heads)
        wait_for_main()


def log_backbone_epoch(model: VLM, val, tcfg: TrainConfig, record: dict, sums: list[float]) -> None:
    """After a stage-1 epoch: its training loss and accuracy (sums: loss, score, questions over every process)
    and the val accuracy per family, printed and logged with `record` (epoch, step, time, family weights)."""
    res, (loss_sum, hit_sum, seen) = evaluate(model, val, next(model.parameters()).device), sums
    print(f"epoch {record['epoch']}/{tcfg.epochs}  loss {loss_sum / seen:.3f}  train acc {100 * hit_sum / seen:.1f}%  "
          f"val acc {res['accuracy']:.1f}%  ({record['time_s']:.0f}s)")
    log_json(tcfg.out, {"stage": "backbone"} | record | {"train_loss": loss_sum / seen, "time_s": round(record["time_s"], 1),
             "train_accuracy": 100 * hit_sum / seen, "val_accuracy": res["accuracy"], "val_per_family": res["per_family"]})


class StepClock:
    """Says once, early, what the rest of stage 1 will cost here: steps 6-25 are timed (the first ones warm
    up allocators and caches and would overstate it)."""

    def __init__(self, steps_left: int, device: torch.device):
        self.start, self.steps_left, self.device, self.n = time.time(), steps_left, device, 0

    def elapsed(self) -> float:
        return time.time() - self.start

    def tick(self) -> None:
        self.n += 1
        if self.n == 5:
            self.t5 = time.perf_counter()
        if self.n == 25 and self.steps_left > 50:
            per_step = (time.perf_counter() - self.t5) / 20
            tqdm.write(f"stage 1 will take about {per_step * (self.steps_left - 25) / 60:.1f} min more here "
                       f"({per_step:.3f} s a step on {self.device}, {torch.get_num_threads()} threads; evaluations "
                       f"not included)")


@torch.no_grad()
def evaluate(model: VLM, split, device) -> dict:
    """Official-metric accuracy (%) overall and per family, and the predictions (n,). In float32 on every
    device, as infer.py's report runs: the accuracy a checkpoint records is the one its report gives."""
    model.eval()
    preds = []
    for ids in batches(len(split), EVAL_BATCH):
        preds.append(model(**to_device(split.batch(ids), device)).argmax(dim=1).cpu())
    pred = torch.cat(preds)
    scores = split.score(torch.arange(len(split)), pred)
    per_family = defaultdict(list)
    for fam, s in zip(split.families, scores.tolist()):
        per_family[fam].append(s)
    return {"accuracy": 100.0 * scores.mean().item(), "pred": pred,
            "per_family": {f: 100.0 * sum(v) / len(v) for f, v in sorted(per_family.items())}}


def report_test(model: VLM, splits: dict, tcfg: TrainConfig, device) -> dict:
    """Test accuracy per family, beside each family's majority-answer baseline."""
    res = evaluate(model, splits["test"], device)
    baseline = majority_baseline(splits["train"], splits["test"])
    print(f"test accuracy (official VQA metric): {res['accuracy']:.1f}%  ({len(splits['test'])} questions)")
    for fam, acc in res["per_family"].items():
        print(f"  {fam:<14} {acc:5.1f}%   (majority answer: {baseline[fam]:5.1f}%)")
    log_json(tcfg.out, {"stage": "backbone", "split": "test", "test_accuracy": res["accuracy"],
                        "test_per_family": res["per_family"], "majority_baseline": baseline})
    return res


@torch.no_grad()
def cache_patches(model: VLM, splits: dict, device, dtype) -> None:
    """A frozen encoder's tokens, computed once per image (fp16, in memory) and served by every split in
    place of its images (Split.patches), so that no epoch runs the encoder again."""
    model.eval()
    for name, split in splits.items():
        chunks = [model.patch_features(imgs.float().div(255).to(device)).half().cpu()          # (b, P, Dv)
                  for imgs in progress_bar(split.images.split(64), f"{name} image tokens")]
        split.patches = torch.cat(chunks)                                                     # (n_img, P, Dv)


# ----------------------------------------------------------------------------------------------------
# Stage 2: FREE exits on the frozen backbone
# ----------------------------------------------------------------------------------------------------
def labelled_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """(n,) bool: the questions whose labels the exits may see, a fixed random `fraction` of the train split
    (round(fraction * n) of them, the same for every method and epoch of a seed, nested as it grows)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:round(fraction * n)]] = True
    return mask


@torch.no_grad()
def frozen_states(free: FREE, split, device, dtype) -> dict:
    """What stage 2 reads of the frozen backbone, computed once for every question of `split` (each epoch then
    costs the exits alone): 'inputs' (n, K, S, D) float16, the hidden states entering each exit; 'mask'
    (n, S) bool, True = real token; 'real' (n, D), the final layer's [CLS] feature h_L. S = the longest
    question + N; a row keeps the layout of the batch it was computed in, the columns after it masked.
    NOTE (deviation): stored in float16 (half the memory), read back in float32."""
    n, K, D = len(split), free.num_exits, free.backbone.cfg.dim
    S = int(split.text_mask.sum(dim=1).max()) + free.backbone.num_visual
    out = {"inputs": torch.zeros(n, K, S, D, dtype=torch.float16), "mask": torch.zeros(n, S, dtype=torch.bool),
           "real": torch.zeros(n, D)}
    print(f"frozen backbone states: {out['inputs'].nbytes / 1e9:.2f} GB of host memory ({n} questions x {K} exits x "
          f"{S} tokens x width {D}, float16)")
    free.eval()
    for ids in progress_bar(list(batches(n, EVAL_BATCH)), "frozen backbone states"):
        with autocast(device, dtype):
            states, mask = free.backbone.hidden_states(**to_device(split.batch(ids), device))
        s = states[0].shape[1]
        out["inputs"][ids, :, :s] = torch.stack([states[l] for l in free.exit_layers], dim=1).half().cpu()  # (B, K, s, D)
        out["mask"][ids, :s] = True if mask is None else mask[:, 0, 0].cpu()                               # (B, s)
        out["real"][ids] = states[-1][:, 0].float().cpu()                                                  # (B, D)
    return out


def states_batch(states: dict, ids: torch.Tensor, device) -> dict:
    """The frozen states of questions ids, on the device: 'inputs' K x (B, s, D), 'mask' (B, 1, 1, s), 'real'
    (B, D); the trailing columns that no row of this batch uses are cut (s <= S)."""
    mask = states["mask"][ids]                                                     # (B, S)
    s = int(mask.any(dim=0).nonzero().max()) + 1
    inputs = states["inputs"][ids, :, :s].to(device).float()                       # (B, K, s, D)
    return {"inputs": inputs.unbind(dim=1), "mask": mask[:, None, None, :s].to(device), "real": states["real"][ids].to(device)}


def exit_step(free: FREE, batch: dict, targets, labelled, opt_g, opt_d, scaler, device, dtype, weight: float = 1.0) -> dict:
    """One batch of stage 2 on the frozen backbone's states (states_batch): a D step, then a G step (each
    loss times `weight`, see shard)."""
    real, mask = batch["real"], batch["mask"]                                      # h_L[CLS] (B, D), (B, 1, 1, s)
    with autocast(device, dtype):
        fakes = [free.exit_feature(k, h, mask) for k, h in enumerate(batch["inputs"])]   # G_k(h_{l_k}): K x (B, D)
    stats = {}
    if "adv" in METHODS[free.cfg.exit_method]:
        # Discriminator step: tell final-layer features (real) from exit features (fake)
        with autocast(device, dtype):
            d_loss, stats = discriminator_loss(free, real, fakes)
        optimizer_step(opt_d, d_loss * weight, scaler)
    # Generator step: exit features should fool D and let the frozen head answer as the final layer does
    with autocast(device, dtype):
        g_loss, g_stats = generator_loss(free, real, fakes, targets, labelled)
    optimizer_step(opt_g, g_loss * weight, scaler)
    scaler.update()
    stats = {k: v.item() for k, v in (stats | g_stats).items()}
    if not all(map(math.isfinite, stats.values())):
        raise FloatingPointError(f"non-finite stage-2 loss ({stats})")
    return stats


def train_exits(free: FREE, states: dict, splits: dict, tcfg: TrainConfig, device, dtype, save,
                progress: dict | None = None) -> None:
    """Stage 2: the exits (and D) for exit_epochs over the train questions, from their frozen `states`
    (frozen_states); every exit's val accuracy and a checkpoint (save(progress)) after each epoch."""
    ecfg, train = free.cfg, splits["train"]
    labelled = labelled_mask(len(train), ecfg.label_fraction, tcfg.seed)
    pool = torch.nonzero(labelled & train.trainable()).squeeze(1) if ecfg.exit_method == "ce" else torch.arange(len(train))
    fused = on_gpu(free.exits.parameters())
    opt_g = torch.optim.AdamW(free.exits.parameters(), lr=ecfg.exit_lr, weight_decay=0.01, fused=fused)
    opt_d = torch.optim.AdamW(free.disc.parameters(), lr=ecfg.disc_lr, betas=(0.5, 0.999), weight_decay=0.0, fused=fused)
    scaler, order = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), torch.Generator().manual_seed(tcfg.seed)
    first_epoch = 0 if progress is None else resume_exits(progress, opt_g, opt_d, scaler, order)
    for epoch in range(first_epoch, ecfg.exit_epochs):
        free.train()
        sums, t0 = defaultdict(float), time.time()
        bar = progress_bar(list(batches(len(pool), tcfg.batch_size, shuffle=True, generator=order)),
                           f"exits ({ecfg.exit_method}) {epoch + 1}/{ecfg.exit_epochs}")
        for n, ids in enumerate(bar, 1):
            ids, weight = shard(pool[ids])                              # all of the batch in one process
            targets = train.soft_targets(ids, free.backbone.cfg.num_answers).to(device) if ecfg.label_fraction > 0 else None
            stats = exit_step(free, states_batch(states, ids, device), targets, labelled[ids].to(device), opt_g, opt_d,
                              scaler, device, dtype, weight)
            for k, v in stats.items():
                sums[k] += v
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()})
        means = dict(zip(sums, (v / len(bar) / WORLD["size"] for v in all_sum(list(sums.values())))))
        if is_main():
            log_exit_epoch(free, splits["val"], f"{epoch + 1}/{ecfg.exit_epochs}", means, time.time() - t0, tcfg.out)
            last = epoch + 1 == ecfg.exit_epochs
            save(None if last else {"epoch": epoch, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                    "scaler": scaler.state_dict(), "batch_order": order.get_state(), "rng": rng_state()})
        wait_for_main()


def log_exit_epoch(free: FREE, val, epoch: str, means: dict, seconds: float, out: str) -> None:
    """After a stage-2 epoch: its mean losses and every exit's val accuracy, printed and logged."""
    profile = infer.exit_profile(val, infer.collect(free, val, EVAL_BATCH), free.exit_layers)
    print(f"exits epoch {epoch}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items()) + "  val acc by exit: " +
          " ".join(f"L{e['layer']}:{e['accuracy']:.1f}" for e in profile["exits"]) + f"  final:{profile['final']:.1f}  "
          f"({seconds:.0f}s)")
    log_json(out, {"stage": "exits", "method": free.cfg.exit_method, "epoch": int(epoch.split("/")[0]), **means,
                   "val_final": profile["final"], "val_exits": profile["exits"]})


def print_depth_profile(profile: dict, split_name: str) -> None:
    """Each exit's standalone accuracy next to the final layer's: where mid-crisis and overthinking show."""
    print(f"depth profile on {split_name} (every question forced to leave at that exit):")
    for e in profile["exits"]:
        print(f"  exit after layer {e['layer']:>2}: {e['accuracy']:5.1f}%   agrees with the final layer {e['agreement']:5.1f}%")
    print(f"  final layer         : {profile['final']:5.1f}%")


def final_report(free: FREE, splits: dict, ckpt_path: str) -> None:
    """infer.py's early-exit report on the test split, run and timed where the model trained; its calibrated
    point (rule, threshold, exits) is stored in the checkpoint for infer.py --image."""
    icfg = infer.InferConfig(ckpt=ckpt_path)
    json_path, plot_path = infer.report_paths(icfg)                   # report.json and speedup.png beside it
    report = infer.build_report(free, splits, "test", icfg)
    infer.print_report(report, free)
    save_atomic(json_path, report)
    infer.plot_report(report, plot_path)
    calibrated = {k: report["calibrated"].get(k) for k in ("rule", "threshold", "exit_layers", "calibration", "risk",
                                                            "max_drop", "delta")}
    save_atomic(ckpt_path, load_checkpoint(ckpt_path) | {"calibrated": calibrated})
    print(f"wrote {os.path.relpath(json_path)} and {os.path.relpath(plot_path)}")


# ----------------------------------------------------------------------------------------------------
# Checkpoints, resume and the checks of every flag
# ----------------------------------------------------------------------------------------------------
def log_json(out: str, record: dict) -> None:
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore rng_state(); on a machine with fewer GPUs than the saving one, the GPUs it has (none on a CPU)."""
    torch.set_rng_state(state["torch"])
    for i, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(gpu_state, i)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def resume_stage(state: dict, opt, scaler, heads: dict) -> tuple[int, int]:
    """Load an interrupted stage 1's optimizer, scaler, auxiliary heads and RNG; return (step, next epoch)."""
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    for name, (_, head) in heads.items():
        head.load_state_dict(state["aux"][name])
    set_rng_state(state["rng"])
    print(f"resumed stage 1 after epoch {state['epoch'] + 1} (step {state['step']})")
    return state["step"], state["epoch"] + 1


def resume_exits(progress: dict, opt_g, opt_d, scaler, order) -> int:
    """Load an interrupted stage 2's optimizers, scaler, batch order and RNG; return the next epoch."""
    for obj, key in ((opt_g, "opt_g"), (opt_d, "opt_d"), (scaler, "scaler")):
        obj.load_state_dict(progress[key])
    order.set_state(progress["batch_order"])
    set_rng_state(progress["rng"])
    print(f"resumed stage 2 after epoch {progress['epoch'] + 1}")
    return progress["epoch"] + 1


def export_checkpoint(path: str, ckpt: str) -> None:
    """A run's checkpoint, small enough to ship (how backbones/ is made): fp16 weights (loaded back in fp32),
    the configs, tokenizer, answers, the backbone's test accuracy (tests/test_shipped_backbone.py checks that it is
    still reached) and, after stage 2, the exits and their calibrated point; no optimizer or RNG state."""
    state = {k: v for k, v in load_checkpoint(ckpt).items() if k not in ("optimizer", "scaler", "rng", "aux", "step", "epoch",
                                                                          "scenes")}
    for key in ("model", "exits"):
        if key in state:
            state[key] = {k: v.half() if v.is_floating_point() else v for k, v in state[key].items()}
    save_atomic(path, state)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


# Flags whose change would make a resumed run follow another schedule than the one it started.
SCHEDULE = {"backbone": ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "aux_weight",
                         "scene_weight", "sample_families", "seed"),
            "exits": ("batch_size", "seed")}
BEFORE_SCENE_FACTS = {"scene_weight": 0.0, "sample_families": "uniform"}   # what older checkpoints trained with
DERIVED = ("vocab_size", "num_answers", "max_text_len", "image_size", "pixel_mean", "pixel_std", "patch_size",
           "vit_dim", "crop_pct", "interpolation")   # set from the data or the encoder, not by the flags


def refuse_changes(path: str, saved: dict, now: dict, keys, what: str) -> None:
    """DataError listing every setting in `keys` whose value differs from the one the checkpoint was made with."""
    diff = [k for k in keys if k in saved and k in now and saved[k] != now[k]]
    if diff:
        changes = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise DataError(f"--resume: {path} was made with other {what} ({changes}); resume with the same values, "
                        f"or start over without --resume")


def resume_state(tcfg: TrainConfig, dcfg: DataConfig, mcfg: ModelConfig, ecfg: ExitConfig) -> dict | None:
    """With --resume, the interrupted run in OUT (stage 1, or stage 2 when it holds exits in progress), checked
    to have been made with the same settings; without, None (and a note if a checkpoint will be replaced)."""
    path = os.path.join(tcfg.out, "ckpt.pt")
    if not tcfg.resume:
        if os.path.exists(path):
            print(f"note: {path} exists and will be replaced when this run saves (use --resume to continue it)")
        return None
    state = load_checkpoint(path, "--resume")
    if "exits" in state:
        if "exit_progress" not in state:
            raise DataError(f"--resume: {path} holds a finished run; there is nothing to resume (train other exits "
                            f"with --stage exits --backbone {path} --out ANOTHER_FOLDER)")
        refuse_changes(path, state["exit_config"], asdict(ecfg), state["exit_config"], "exit settings")
        refuse_changes(path, state["train_config"], asdict(tcfg), SCHEDULE["exits"], "training settings")
        return state
    if tcfg.stage == "exits":
        raise DataError(f"--resume --stage exits: {path} holds a backbone but no interrupted stage 2 (drop --resume "
                        f"to train exits on it)")
    for name, cfg in (("data_config", dcfg), ("model_config", mcfg)):
        refuse_changes(path, state[name], asdict(cfg), [k for k in state[name] if k not in DERIVED], "data or model settings")
    made_with = BEFORE_SCENE_FACTS | state["train_config"]      # a run from before these flags ran without them
    refuse_changes(path, made_with, asdict(tcfg), SCHEDULE["backbone"], "training settings")
    return state


def adopt_timm_encoder(dcfg: DataConfig, mcfg: ModelConfig) -> None:
    """--vit NAME: the input size, patch size, width, normalisation, resize and crop come from timm's own
    description of the model; with --vit-weights, the file must fit it. ValueError naming the flag otherwise."""
    import timm                                     # here: its import takes seconds a bad flag need not wait
    if not timm.is_model(mcfg.vit):
        raise ValueError(f"--vit {mcfg.vit}: not a timm model name (python -c \"import timm; print(timm.list_models('vit*'))\")")
    enc = describe_timm_vit(mcfg.vit)
    dcfg.image_size, dcfg.crop_pct, dcfg.interpolation = enc["image_size"], enc["crop_pct"], enc["interpolation"]
    mcfg.image_size, mcfg.patch_size, mcfg.vit_dim = enc["image_size"], enc["patch_size"], enc["vit_dim"]
    mcfg.pixel_mean, mcfg.pixel_std = enc["pixel_mean"], enc["pixel_std"]
    if mcfg.vit_weights:
        try:
            make_vit(mcfg)
        except Exception as e:   # whatever stops the user's file from loading into this model: one line
            raise ValueError(f"--vit-weights {mcfg.vit_weights} does not fit --vit {mcfg.vit} ({str(e).splitlines()[0][:150]})")


def validate(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig, ecfg: ExitConfig) -> dict | None:
    """Check every flag, and read the checkpoint the run starts from, before any data is made or any step is
    taken: a bad flag costs seconds and touches nothing written. Returns that checkpoint (the backbone of
    --stage exits, or the run to --resume) or None."""
    check_data_config(dcfg)
    for name in ("epochs", "batch_size", "lr"):
        if getattr(tcfg, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(tcfg, name)})")
    for name in ("weight_decay", "warmup_steps", "grad_clip", "aux_weight", "scene_weight", "threads"):
        if getattr(tcfg, name) < 0:
            raise DataError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(tcfg, name)})")
    if tcfg.backbone and tcfg.stage != "exits":
        raise DataError("--backbone is read by --stage exits only (the other stages train their own backbone)")
    try:
        mcfg.image_size, mcfg.max_text_len = dcfg.image_size, dcfg.max_question_len
        if tcfg.stage == "exits" and not tcfg.resume:
            state = load_checkpoint(tcfg.backbone or os.path.join(tcfg.out, "ckpt.pt"),
                                    "--backbone" if tcfg.backbone else "--stage exits (no --backbone, so OUT/ckpt.pt):")
        else:
            if mcfg.vit:
                adopt_timm_encoder(dcfg, mcfg)
            check_model_config(mcfg)
            state = resume_state(tcfg, dcfg, mcfg, ecfg)
        depth = state["model_config"]["depth"] if state is not None else mcfg.depth
        check_exit_config(ecfg, depth)
        ecfg.exit_layers = ",".join(map(str, resolve_exit_layers(ecfg.exit_layers, depth)))   # recorded written out
    except ValueError as e:   # the config checks of model.py and free_min.py
        raise DataError(str(e))
    return state


# ----------------------------------------------------------------------------------------------------
# The run: stage 1, then stage 2, then the report (main reads top to bottom)
# ----------------------------------------------------------------------------------------------------
def load_run_data(dcfg: DataConfig, mcfg: ModelConfig, state: dict | None, describe: dict):
    """The splits, reusing the tokenizer and answers of `state` (a checkpoint) if given; prints the config."""
    t0 = time.time()
    tokenizer = Tokenizer.from_str(state["tokenizer"]) if state else None
    splits, tokenizer, answers = load_data(dcfg, tokenizer, state["answers"] if state else None)
    mcfg.vocab_size, mcfg.num_answers = tokenizer.get_vocab_size(), len(answers)
    print(f"data: {dcfg.data} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())} questions), {len(answers)} "
          f"answers, {mcfg.vocab_size} tokens ({time.time() - t0:.1f}s)")
    print("config:", json.dumps(describe | {"data": asdict(dcfg), "model": asdict(mcfg)}))
    return splits, tokenizer, answers


def run_backbone(splits, tokenizer, answers, dcfg, mcfg, tcfg, device, dtype, state) -> VLM:
    """Stage 1 into OUT/ckpt.pt (continuing `state` if given), its test accuracy, and --export."""
    model = VLM(cfg=mcfg).to(device)
    if state is not None:
        model.load_state_dict(state["model"])
    if WORLD["size"] > 1 and device.type == "cuda":    # the conv stem's batch statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {mcfg.depth} language-model "
          f"layers of width {mcfg.dim}")
    if mcfg.freeze_vit:
        cache_patches(model, splits, device, dtype)
    ckpt = os.path.join(tcfg.out, "ckpt.pt")

    # shapes data: new training scenes every epoch (data.TrainScenes), which cannot be learned by heart
    scenes = TrainScenes(dcfg, splits["train"], tokenizer, answers, tcfg.epochs) if dcfg.data == "shapes" else None
    if scenes is not None and (state or {}).get("scenes"):
        scenes.resume(state["scenes"], state["epoch"] + 1)

    def save(epoch, step, opt, scaler, heads):
        save_atomic(ckpt, {"model": model.state_dict(), "model_config": asdict(mcfg), "data_config": asdict(dcfg),
                           "train_config": asdict(tcfg), "answers": answers, "tokenizer": tokenizer.to_str(),
                           "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                           "rng": rng_state(), "aux": {k: h.state_dict() for k, (_, h) in heads.items()},
                           "scenes": None if scenes is None else scenes.progress(epoch)})
    try:
        train_backbone(model, splits, tcfg, device, dtype, save, state, scenes)
    except FloatingPointError as e:
        raise SystemExit(f"error: {e} in stage 1; the last good checkpoint is kept in {ckpt}. Try a lower --lr.")
    finally:
        if scenes is not None:
            scenes.close()
    if is_main():
        res = report_test(model, splits, tcfg, device)
        save_atomic(ckpt, load_checkpoint(ckpt) | {"test_accuracy": res["accuracy"], "test_per_family": res["per_family"]})
        if tcfg.export:
            export_checkpoint(tcfg.export, ckpt)
    wait_for_main()
    return model


# What a stage-2 checkpoint keeps of the backbone it starts from: the weights and what rebuilds them.
BACKBONE_KEYS = ("model", "model_config", "data_config", "answers", "tokenizer", "test_accuracy", "test_per_family")


def prepare_exits(model: VLM, state: dict, source: dict, splits, ecfg, tcfg, device, dtype):
    """The exits on the frozen backbone (continued from `state` if it holds stage 2 in progress), the frozen
    states of the train split, and save(progress), which writes OUT/ckpt.pt: the backbone, `source` (where
    it came from), this run's exits and configs, and nothing else of another run."""
    free = FREE(model.to(device), ecfg).to(device)
    progress = state.get("exit_progress") if tcfg.resume else None
    if progress is not None:
        free.load_exits(state["exits"])
    if model.cfg.freeze_vit and splits["train"].patches is None:
        cache_patches(model, splits, device, dtype)
    own = {k: state[k] for k in BACKBONE_KEYS if k in state} | {"backbone_source": source}

    def save(progress: dict | None) -> None:
        exits = {k: v for k, v in free.state_dict().items() if not k.startswith("backbone.")}
        save_atomic(os.path.join(tcfg.out, "ckpt.pt"), own | {"exits": exits, "exit_config": asdict(ecfg),
                    "train_config": asdict(tcfg)} | ({} if progress is None else {"exit_progress": progress}))
    print(f"stage 2: {ecfg.exit_method} exits after layers {free.exit_layers}, label fraction {ecfg.label_fraction}; "
          f"{sum(p.numel() for p in free.exits.parameters()) / 1e6:.2f}M trainable exit parameters")
    if progress is None and is_main():
        print_depth_profile(infer.exit_profile(splits["val"], infer.collect(free, splits["val"], EVAL_BATCH),
                                               free.exit_layers), "val before stage 2")
    return free, frozen_states(free, splits["train"], device, dtype), save, progress


def report_exits(free: FREE, splits: dict, tcfg: TrainConfig) -> None:
    """After stage 2: the exits' test depth profile (printed and logged), then the early-exit report."""
    test = infer.exit_profile(splits["test"], infer.collect(free, splits["test"], EVAL_BATCH), free.exit_layers)
    print_depth_profile(test, "test")
    log_json(tcfg.out, {"stage": "exits", "split": "test", "method": free.cfg.exit_method,
                        "label_fraction": free.cfg.label_fraction, "test_final": test["final"], "test_exits": test["exits"]})
    if tcfg.final_eval:
        final_report(free, splits, os.path.join(tcfg.out, "ckpt.pt"))
    if tcfg.export:
        export_checkpoint(tcfg.export, os.path.join(tcfg.out, "ckpt.pt"))


def start_fresh(out: str) -> None:
    """A new run in OUT: drop the log and report an earlier run left there, so that nothing in OUT describes
    another run (checkpoints are replaced atomically when this run saves)."""
    for name in ("log.jsonl", "report.json", "speedup.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def main(argv=None) -> None:
    args, dcfg, mcfg, tcfg, ecfg = parse_args(argv)
    try:
        state = validate(dcfg, mcfg, tcfg, ecfg)            # every flag, before any data is made or step taken
        init_distributed(tcfg.device)                       # under torchrun only
        threads, why_threads = pick_threads(tcfg.threads)
        torch.set_num_threads(threads)
        device = pick_device(tcfg.device)
        dtype, why = pick_dtype(device)
        print(f"device: {device} ({why}); torch threads: {threads} ({why_threads})" +
              (f"; {WORLD['size']} processes (torchrun), each on its slice of every batch" if WORLD["size"] > 1 else ""))
        os.makedirs(tcfg.out, exist_ok=True)
        torch.manual_seed(tcfg.seed)
        ckpt, describe = os.path.join(tcfg.out, "ckpt.pt"), {"preset": args.preset, "train": asdict(tcfg), "exits": asdict(ecfg)}
        if state is None or not (tcfg.stage == "exits" or "exits" in state):          # stage 1, new or resumed
            if state is None and is_main():
                start_fresh(tcfg.out)
            splits, tokenizer, answers = load_run_data(dcfg, mcfg, state, describe)
            model = run_backbone(splits, tokenizer, answers, dcfg, mcfg, tcfg, device, dtype, state)
            if tcfg.stage == "backbone":
                return
            state = load_checkpoint(ckpt)
            source = {"path": ckpt, "train_config": state["train_config"]}
        else:                                                                          # stage 2 on a trained backbone
            model, _, _, _, dcfg = build_from_checkpoint(state)
            splits, _, _ = load_run_data(dcfg, model.cfg, state, describe)
            if tcfg.resume:                                 # an interrupted stage 2, continued
                source = state["backbone_source"]
            else:
                source = {"path": tcfg.backbone or ckpt, "train_config": state.get("train_config")}
                if os.path.abspath(source["path"]) != os.path.abspath(ckpt) and is_main():
                    start_fresh(tcfg.out)                   # a new run in OUT: the old log is not about it
        free, states, save, progress = prepare_exits(model, state, source, splits, ecfg, tcfg, device, dtype)
        try:
            train_exits(free, states, splits, tcfg, device, dtype, save, progress)
        except FloatingPointError as e:
            raise SystemExit(f"error: {e}; the last good checkpoint is kept in {ckpt}. Try a lower --exit-lr / --disc-lr.")
        if is_main():
            report_exits(free, splits, tcfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if WORLD["size"] > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
