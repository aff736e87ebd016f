"""The two training stages of free-min.

    python train.py                  # stage 1 (backbone), stage 2 (FREE exits), then the report
    python train.py --preset tiny    # the same on a tiny model, in a minute
    python train.py --stage exits --backbone backbones/shapes-default.pt   # stage 2 only, on it
    python train.py --resume         # continue an interrupted run in --out
    python train.py --data vqa2 --vqa-questions Q.json --vqa-annotations A.json --vqa-images DIR

Stage 1 trains the backbone VLM (model.py) on VQA-as-classification: the paper starts from a
pretrained BLIP-2, which we have none of offline. Stage 2 freezes it and trains the exits
(free_min.py), FREE's loop:

    h_0..h_L = the frozen backbone's states of every question, computed once    (frozen_states)
    for every batch:                                                             (exit_step)
        fake_k = G_k(h_{l_k}) for each exit k;  real = h_L[CLS]
        D step:  L_D = BCE(D(real), 1) + (1/K) sum_k BCE(D(fake_k), 0)
        G step:  L_G = sum_k [l_adv ADV_k + l_kd T^2 KL(p_L^T || p_k^T) + l_ce CE(p_k, y)]

Then infer.py's early-exit report runs on the test split. Each stage prints its progress, logs
one JSON line per evaluation to OUT/log.jsonl and writes OUT/ckpt.pt after every epoch (weights,
optimizer, step, RNG, configs, tokenizer, answers), atomically. What is not the method (processes,
precision, checkpoints, flags) is in util/; stage 1's stand-ins for pretraining are in
util/stand_ins.py; what is printed and logged, in util/report.py.

Public: TrainConfig, PRESETS, parse_args, validate, main, EVAL_BATCH, STATE_CACHE_GB,
train_backbone, backbone_step, evaluate, frozen_states, exit_step, train_exits; discriminator_loss
and generator_loss, the names exit_step calls, which an experiment may replace.
"""
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor

import infer
from data import (FAMILIES, SPLITS, DataConfig, batches, check_data_config, load_data,
                  majority_baseline)
from free_min import (FREE, METHODS, ExitConfig, check_exit_config, discriminator_loss,
                      generator_loss, resolve_exit_layers)
from model import (VLM, ModelConfig, check_model_config, describe_timm_vit, make_vit,
                   soft_cross_entropy)
from util import report
from util.checkpoints import (TRAINING_STATE, build_from_checkpoint, exit_progress,
                              export_checkpoint, load_checkpoint, record_calibrated, record_test,
                              resume_exits, resume_stage, resume_state, save_atomic, stage1_saver,
                              stage2_saver, start_fresh)
from util.config import ConfigError, UsageError, parse_configs, require
from util.runtime import (CHECK_EVERY, RUN, WORLD, EpochScores, StepClock, all_sum, autocast,
                          average_gradients, cache_patches, close_distributed, grad_scaler, is_main,
                          on_gpu, progress_bar, read_sums, setup, shard, to_device, wait_for_main)
from util.scenes import TrainScenes, family_weights
from util.stand_ins import LABEL_FREE, aux_heads, aux_inputs


@dataclass
class TrainConfig:
    out: str = "out"  # output folder (ckpt.pt, log.jsonl, report.json, speedup.png)
    # stage-1 epochs: a model trained from scratch needs this many to learn the relational families
    # (22,500 steps of 64)
    epochs: int = 60
    batch_size: int = 64  # training batch size (both stages)
    lr: float = 1e-3  # stage-1 peak AdamW learning rate
    weight_decay: float = 0.05  # stage-1 AdamW weight decay
    warmup_steps: int = 300  # stage-1 linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # stage-1 gradient-norm clip (0 = off)
    # weight of stage 1's pixel-label loss (shapes data: ViT tokens predict the colour and shape
    # under them); 0 = off, and then two label-free aids teach the encoder instead (an answer head
    # on its tokens, and each token reconstructing its patch)
    aux_weight: float = 1.0
    # weight of stage 1's scene-fact loss (shapes data: the language model's [CLS] predicts the
    # facts each answer is computed from, see stand_ins.SceneHeads; 0 = off)
    scene_weight: float = 1.0
    # shapes data, stage 1: uniform (every family asked as often) or by-error (each epoch's scenes
    # ask each family in proportion to its training error, see util/scenes.py's family_weights)
    sample_families: str = field(default="by-error", metadata={"choices": ["uniform", "by-error"]})
    seed: int = 0  # seed of initialisation, batch order and labelled fraction
    # auto (cuda, then mps, then cpu), cuda, mps or cpu
    device: str = field(default="auto", metadata={"choices": ["auto", "cuda", "mps", "cpu"]})
    # CPU threads for torch (0 = the cores not busy with other work, printed at the start)
    threads: int = 0
    # shapes data, stage 1: processes that draw each epoch's new scenes while the one before trains
    # (0 = drawn in the training process, between epochs); the scenes are the same for any number
    scene_workers: int = 1
    # all: backbone then exits; backbone: stage 1 only; exits: stage 2 only, on --backbone (or
    # OUT/ckpt.pt)
    stage: str = field(default="all", metadata={"choices": ["all", "backbone", "exits"]})
    backbone: str = ""  # stage 2: a trained checkpoint whose backbone is reused, frozen
    resume: bool = False  # continue the interrupted run in OUT (same settings)
    final_eval: bool = True  # end with infer.py's early-exit report on the test split
    # also write the run's checkpoint to this file in fp16, without optimizer state (after stage 1,
    # then after stage 2 with the exits and their calibrated point): how backbones/ is made
    export: str = ""



def check_train_config(tcfg: TrainConfig) -> None:
    """Refuse training settings that cannot work, naming the flag (ConfigError)."""
    require(tcfg, ("epochs", "batch_size", "lr"), 0, strict=True)
    require(tcfg, ("weight_decay", "warmup_steps", "grad_clip", "aux_weight", "scene_weight",
                   "threads", "scene_workers"), 0, strict=False)
    if tcfg.backbone and tcfg.stage != "exits":
        raise ConfigError(
            "--backbone is read by --stage exits only (the other stages train their own backbone)")


PRESETS = {                    # named overrides of the dataclass defaults; PRESET_USE: what for
    "tiny": dict(train_images=300, val_images=40, test_images=40, calib_images=40, dim=64, depth=4,
                 heads=2, epochs=4, batch_size=32, warmup_steps=20, lr=2e-3, exit_epochs=2),
    "default": dict(),
    "base": dict(train_images=20000, val_images=1000, test_images=1000, dim=256, depth=12, heads=8,
                 vit_dim=128, vit_depth=2, epochs=12, batch_size=128, lr=5e-4, warmup_steps=1000),
}
PRESET_USE = {"tiny": "a first look, a minute on a CPU", "default": "a 2-core CPU or a laptop GPU",
              "base": "a bigger model, for a GPU"}
SHIPPED_BACKBONE = "backbones/shapes-default.pt"   # the trained backbone the repo ships (README)
BACKBONE_FILE = "backbone.pt"     # OUT/backbone.pt: stage 1's checkpoint, kept when stage 2 follows
EVAL_BATCH = 256
# A depth profile (infer.collect) holds every layer's states of its batch at once, (L+1) x B x S x D
# floats besides the layers' temporaries: the most stage 2 holds beside its data, so it runs at a
# smaller batch (RESULTS.md, 2026-12-08: base stage 2's peak memory).
PROFILE_BATCH = 64


def parse_args(argv=None):
    """--preset picks the defaults; every config field is a flag that overrides them.
    Returns (args, DataConfig, ModelConfig, TrainConfig, ExitConfig)."""
    configs = (DataConfig, ModelConfig, TrainConfig, ExitConfig)
    return parse_configs(argv, __doc__, configs, PRESETS, PRESET_USE)


# --------------------------------------------------------------------------------------------------
# The flags checked, and the run's data
# --------------------------------------------------------------------------------------------------
def adopt_timm_encoder(dcfg: DataConfig, mcfg: ModelConfig) -> None:
    """--vit NAME: the input size, patch size, width, normalisation, resize and crop come from
    timm's own description of the model; with --vit-weights, the file must fit it. ValueError
    naming the flag."""
    import timm                            # here: its import takes seconds a bad flag need not wait
    if not timm.is_model(mcfg.vit):
        raise ValueError(f"--vit {mcfg.vit}: not a timm model name "
                         f"(python -c \"import timm; print(timm.list_models('vit*'))\")")
    enc = describe_timm_vit(mcfg.vit)
    dcfg.image_size, dcfg.crop_pct = enc["image_size"], enc["crop_pct"]
    dcfg.interpolation = enc["interpolation"]
    mcfg.image_size, mcfg.patch_size = enc["image_size"], enc["patch_size"]
    mcfg.vit_dim = enc["vit_dim"]
    mcfg.pixel_mean, mcfg.pixel_std = enc["pixel_mean"], enc["pixel_std"]
    if mcfg.vit_weights:
        try:
            make_vit(mcfg)
        # whatever stops the user's file from loading into this model: one line
        except Exception as e:
            raise ValueError(f"--vit-weights {mcfg.vit_weights} does not fit --vit {mcfg.vit} "
                             f"({str(e).splitlines()[0][:150]})")


def validate(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig,
             ecfg: ExitConfig) -> dict | None:
    """Before any data is made or any step is taken (a bad flag costs seconds and touches nothing
    written): every flag checked, the model's config completed, and the checkpoint the run starts
    from read. Returns that checkpoint (the backbone of --stage exits, or the run to --resume) or
    None."""
    check_data_config(dcfg)
    check_train_config(tcfg)
    new_model = not (tcfg.stage == "exits" and not tcfg.resume)
    try:
        complete_model_config(dcfg, mcfg, new_model)
        if new_model:
            check_model_config(mcfg)
        state = starting_checkpoint(tcfg, dcfg, mcfg, ecfg)
        depth = state["model_config"]["depth"] if state is not None else mcfg.depth
        check_exit_config(ecfg, depth)
    except ValueError as e:   # the config checks of model.py and free_min.py
        raise ConfigError(str(e))
    ecfg.exit_layers = ",".join(map(str, resolve_exit_layers(ecfg.exit_layers, depth)))  # as run
    return state


def complete_model_config(dcfg: DataConfig, mcfg: ModelConfig, new_model: bool) -> None:
    """What the model's flags leave to the data (input size, text length) and, for a new model
    with --vit, to timm's description of the encoder (adopt_timm_encoder)."""
    mcfg.image_size, mcfg.max_text_len = dcfg.image_size, dcfg.max_question_len
    if new_model and mcfg.vit:
        adopt_timm_encoder(dcfg, mcfg)


def starting_checkpoint(tcfg: TrainConfig, dcfg: DataConfig, mcfg: ModelConfig,
                        ecfg: ExitConfig) -> dict | None:
    """The checkpoint the run starts from: the backbone of --stage exits (--backbone, else
    OUT/ckpt.pt), or with --resume the interrupted run (util.checkpoints.resume_state refuses
    other settings), else None."""
    if tcfg.stage == "exits" and not tcfg.resume:
        named = "--backbone" if tcfg.backbone else "--stage exits (no --backbone, so OUT/ckpt.pt):"
        return load_checkpoint(tcfg.backbone or os.path.join(tcfg.out, "ckpt.pt"), named)
    return resume_state(tcfg, dcfg, mcfg, ecfg)


@dataclass
class Run:
    """One training run: its settings (train.parse_args) and where it writes."""
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    exits: ExitConfig
    describe: dict                 # what the run prints and logs as its config

    @property
    def ckpt(self) -> str:
        return os.path.join(self.train.out, "ckpt.pt")


def load_run_data(run: Run, state: dict | None) -> tuple[dict, Tokenizer, list[str]]:
    """The splits, reusing the tokenizer and answers of `state` (a checkpoint) if given; prints the
    config."""
    t0 = time.time()
    tokenizer = Tokenizer.from_str(state["tokenizer"]) if state else None
    splits, tokenizer, answers = load_data(run.data, tokenizer, state["answers"] if state else None,
                                           only=SPLITS)
    run.model.vocab_size, run.model.num_answers = tokenizer.get_vocab_size(), len(answers)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"data: {run.data.data} ({sizes} questions), {len(answers)} answers,"
          f" {run.model.vocab_size} tokens ({time.time() - t0:.1f}s)")
    config = run.describe | {"data": asdict(run.data), "model": asdict(run.model)}
    print("config:", json.dumps(config))
    return splits, tokenizer, answers


def trained_backbone(run: Run, state: dict) -> tuple[VLM, dict, dict]:
    """Stage 2 on a trained backbone (--stage exits, or a stage 2 resumed): the model, the
    splits, and where the backbone came from."""
    model, _, _, _, run.data = build_from_checkpoint(state)
    run.model = model.cfg
    splits, _, _ = load_run_data(run, state)
    if run.train.resume:                                   # an interrupted stage 2, continued
        return model, splits, state["backbone_source"]
    source = {"path": run.train.backbone or run.ckpt, "train_config": state.get("train_config")}
    if os.path.abspath(source["path"]) != os.path.abspath(run.ckpt) and is_main():
        start_fresh(run.train.out)                   # a new run in OUT: the old log is not about it
    return model, splits, source


# --------------------------------------------------------------------------------------------------
# Stage 1: the backbone VLM on VQA-as-classification
# --------------------------------------------------------------------------------------------------
def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage1_optimizer(model: VLM, heads: dict, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the VLM and its auxiliary heads; with the label-free aids, the encoder's
    transformer blocks and final norm in a group of their own at LABEL_FREE['vit_blocks_lr'] x."""
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for _, head in heads.values() for p in head.parameters()]
    groups = [{"params": params}]
    if "shortcut" in heads:
        slow = {id(p) for m in (model.vit.blocks, model.vit.norm) for p in m.parameters()}
        groups = [{"params": [p for p in params if id(p) not in slow]},
                  {"params": [p for p in params if id(p) in slow],
                   "lr_scale": LABEL_FREE["vit_blocks_lr"]}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98),
                             fused=on_gpu(params))


def backbone_batch(model: VLM, split, ids: torch.Tensor) -> dict:
    """Questions `ids` of `split` on the device: the model's inputs (images, or a frozen encoder's
    'patches'), the soft targets (B, A) and what the auxiliary heads read (stand_ins.aux_inputs)."""
    batch = {"patches": None} | split.batch(ids)
    batch["targets"] = split.soft_targets(ids, model.cfg.num_answers)                 # (B, A)
    batch = to_device(batch, RUN["device"])
    return batch | aux_inputs(model, split, ids, batch["images"])


def backbone_step(model: VLM, heads: dict, batch: dict, opt, scaler,
                  clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """One optimizer step of stage 1: soft cross-entropy on the answers, plus the auxiliary heads'
    losses; the gradients' global norm clipped to `clip` (0: not clipped). batch['weight']: this
    process's share of the global batch (1 alone). Returns the answer loss, the whole objective
    and the logits (B, A), on the device (nothing is read back here, CHECK_EVERY)."""
    images, patches = batch["images"], batch["patches"]            # a frozen encoder's, or None
    with autocast():
        if patches is None:
            patches = model.patch_features(images)                     # (B, P, Dv)
        states, _ = model.hidden_states(images, batch["tokens"], batch["text_mask"], patches)
        logits = model.head(states[-1][:, 0])                          # (B, A)
    # L = soft CE(answers); NOTE (deviation): + the stand-ins' losses, sum_j w_j L_j (stand_ins.py)
    loss = soft_cross_entropy(logits, batch["targets"])
    aux = batch | {"states": states}                                   # L+1 x (B, S, D)
    total = loss + sum(weight * head.loss(patches, aux) for weight, head in heads.values())
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.zero_grad(set_to_none=True)
    scaler.scale(total * batch["weight"]).backward()   # fp16: the loss scaled; torchrun: x share
    average_gradients(params)                          # under torchrun: the mean over the processes
    if clip > 0:
        scaler.unscale_(opt)                           # clip the gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)                                   # fp16: skipped where a gradient overflowed
    return loss.detach(), total.detach(), logits.detach()


def global_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list:
    """An epoch's global batches in a shuffled order, less a last one too small to give every
    process a question (under torchrun; an empty shard would make its losses NaN while the others
    wait for it)."""
    return [ids for ids in batches(n, batch_size, shuffle=True, generator=generator)
            if len(ids) >= WORLD["size"]]


def epoch_batches(n: int, tcfg: TrainConfig, epoch: int) -> list:
    """Stage 1's global batches of `epoch` over n questions, from a generator of their own: every
    process draws the same batches, whatever else one of them draws from the global RNG (process
    0's evaluation, say)."""
    shuffle = torch.Generator().manual_seed(tcfg.seed * 10_000 + epoch)
    return global_batches(n, tcfg.batch_size, shuffle)


def train_backbone(model: VLM, splits: dict, tcfg: TrainConfig, save, state: dict | None = None,
                   scenes=None) -> None:
    """Stage 1: the whole VLM and its auxiliary heads on each epoch's train split (scenes(epoch), a
    util.scenes.TrainScenes, or splits['train']); after every epoch the val accuracy per family and
    a checkpoint (save(epoch, step, opt, scaler, heads)). `state` continues an interrupted run."""
    heads = {name: (w, h.to(RUN["device"]))
             for name, (w, h) in aux_heads(model, splits["train"], tcfg).items()}
    scaler, opt = grad_scaler(), stage1_optimizer(model, heads, tcfg)
    total_steps = tcfg.epochs * math.ceil(int(splits["train"].trainable().sum()) / tcfg.batch_size)
    step, first_epoch = (0, 0) if state is None else resume_stage(state, opt, scaler, heads)
    print(f"stage 1: {total_steps} steps; auxiliary heads: {', '.join(heads) or 'none'}")
    clock = StepClock(total_steps - step, RUN["device"])
    for epoch in range(first_epoch, tcfg.epochs):
        model.train()
        train = splits["train"] if scenes is None else scenes(epoch)
        trainable = torch.nonzero(train.trainable()).squeeze(1)     # questions with an answer
        order = epoch_batches(len(trainable), tcfg, epoch)
        bar, scores = progress_bar(order, f"backbone {epoch + 1}/{tcfg.epochs}"), EpochScores()
        for n, ids in enumerate(bar, 1):
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total_steps, tcfg) * group.get("lr_scale", 1.0)
            ids, weight = shard(trainable[ids])              # all of it, weight 1, in one process
            batch = backbone_batch(model, train, ids) | {"weight": weight}
            loss, total, logits = backbone_step(model, heads, batch, opt, scaler, tcfg.grad_clip)
            scaler.update()
            step += 1
            scores.add(ids, loss, total, logits)
            clock.tick()
            if n % CHECK_EVERY == 0 or n == len(order):
                bar.set_postfix(scores.read(train))
        if tcfg.sample_families == "by-error" and scenes is not None:
            scenes.weights = family_weights(scores.family_accuracy(FAMILIES), list(FAMILIES))
        sums = all_sum([scores.loss, scores.hits, scores.seen])        # every process, then one
        if is_main():
            record = {"epoch": epoch + 1, "step": step, "time_s": clock.elapsed(),
                      "family_weights": getattr(scenes, "weights", None)}
            val = evaluate(model, splits["val"], RUN["device"])
            report.log_backbone_epoch(tcfg, record, sums, val)
            save(epoch, step, opt, scaler, heads)
        wait_for_main()


@torch.no_grad()
def evaluate(model: VLM, split, device) -> dict:
    """Official-metric accuracy (%) overall and per family, and the predictions (n,). In float32 on
    every device, as infer.py's report runs: a checkpoint records the accuracy its report gives."""
    model.eval()
    preds = [model(**to_device(split.batch(ids), device)).argmax(dim=1).cpu()
             for ids in batches(len(split), EVAL_BATCH)]
    pred = torch.cat(preds)
    scores = split.score(torch.arange(len(split)), pred)
    per_family = defaultdict(list)
    for fam, s in zip(split.families, scores.tolist()):
        per_family[fam].append(s)
    return {"accuracy": 100.0 * scores.mean().item(), "pred": pred,
            "per_family": {f: 100.0 * sum(v) / len(v) for f, v in sorted(per_family.items())}}


# --------------------------------------------------------------------------------------------------
# Stage 2: FREE exits on the frozen backbone
# --------------------------------------------------------------------------------------------------
def labelled_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """(n,) bool: the questions whose labels the exits may see, a fixed random `fraction` of the
    train split (the same for every method and epoch of a seed, and nested as it grows)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:round(fraction * n)]] = True
    return mask


# Stage 2 keeps the frozen states in host memory: n questions x K exits x S tokens x width D x 2
# bytes (float16), S = the longest question (13 tokens on shapes) + N = 16 visual tokens. The
# default preset: 24,000 x 4 x 29 x 128 x 2 = 0.7 GB; base: 80,000 x 6 x 29 x 256 x 2 = 7.1 GB, in
# every process. Above STATE_CACHE_GB they are computed batch by batch instead (live_states: the
# frozen backbone runs on every batch, and the host holds no cache).
STATE_CACHE_GB = 2.0


@torch.no_grad()
def frozen_states(free: FREE, split) -> dict | None:
    """What stage 2 reads of the frozen backbone, computed once per question of `split` (an epoch
    then costs the exits alone): 'inputs' (n, K, S, D), the states entering each exit; 'mask' (n, S)
    bool, True = real token; 'real' (n, D), h_L[CLS]. S = the longest question + N; a row keeps the
    layout of its batch. NOTE (deviation): float16 (half the memory), read back in float32. None
    where they would take more than STATE_CACHE_GB (stage 2 then runs live_states)."""
    n, K, D = len(split), free.num_exits, free.backbone.cfg.dim
    S = int(split.text_mask.sum(dim=1).max()) + free.backbone.num_visual
    size = f"{n} questions x {K} exits x {S} tokens x width {D}, float16"
    gb = n * K * S * D * 2 / 1e9
    if gb > STATE_CACHE_GB:
        print(f"frozen backbone states: {gb:.1f} GB ({size}) would pass {STATE_CACHE_GB:g} GB of "
              "host memory: computed batch by batch instead")
        return None
    out = {"inputs": torch.zeros(n, K, S, D, dtype=torch.float16),
           "mask": torch.zeros(n, S, dtype=torch.bool), "real": torch.zeros(n, D)}
    print(f"frozen backbone states: {gb:.2f} GB of host memory ({size})")
    free.eval()
    for ids in progress_bar(list(batches(n, EVAL_BATCH)), "frozen backbone states"):
        live = live_states(free, split, ids, RUN["device"])          # float32, as the report runs
        s = live["mask"].shape[-1]
        out["inputs"][ids, :, :s] = torch.stack(live["inputs"], dim=1).half().cpu()  # (B, K, s, D)
        out["mask"][ids, :s] = live["mask"][:, 0, 0].cpu()                           # (B, s)
        out["real"][ids] = live["real"].cpu()                                        # (B, D)
    return out


def states_batch(states: dict, ids: torch.Tensor, device) -> dict:
    """The frozen states of questions ids, on the device: 'inputs' K x (B, s, D), 'mask'
    (B, 1, 1, s), 'real' (B, D); the trailing columns no row of this batch uses are cut (s <= S)."""
    mask = states["mask"][ids]                                                     # (B, S)
    s = int(mask.any(dim=0).nonzero().max()) + 1
    inputs = states["inputs"][ids, :, :s].to(device).float()                       # (B, K, s, D)
    return {"inputs": inputs.unbind(dim=1), "mask": mask[:, None, None, :s].to(device),
            "real": states["real"][ids].to(device)}


@torch.no_grad()
def live_states(free: FREE, split, ids: Tensor, device) -> dict:
    """The frozen states of questions ids as states_batch gives them, computed now by the frozen
    backbone (in float32) instead of read from frozen_states' cache."""
    free.backbone.eval()
    states, mask = free.backbone.hidden_states(**to_device(split.batch(ids), device))
    if mask is None:                                                    # no padding in this batch
        mask = torch.ones(len(ids), 1, 1, states[0].shape[1], dtype=torch.bool, device=device)
    return {"inputs": tuple(states[l] for l in free.exit_layers), "mask": mask,
            "real": states[-1][:, 0].float()}


def ce_weight(answered: Tensor, global_ids: Tensor, local_ids: Tensor) -> float:
    """The weight of this process's CE term, a mean over its labelled questions, that makes the
    processes' losses, each weighted by its share of the batch (runtime.shard), add up to the mean
    over the global batch's labelled questions: (local labelled / local questions) / (global
    labelled / global questions). 1 in one process; counted on the host, from `answered` (n,) bool,
    the questions CE may learn from."""
    total = int(answered[global_ids].sum())
    if total == 0:
        return 0.0
    return int(answered[local_ids].sum()) * len(global_ids) / (len(local_ids) * total)


def exit_batch(free: FREE, states: dict | None, train, ids: Tensor, labelled: Tensor) -> dict:
    """Stage 2's batch: the frozen states of questions `ids` (states_batch, or live_states where
    `states` is None), their answers' soft 'targets' (B, A) (None when no label may be read) and
    which of them are 'labelled' (B,)."""
    device, targets = RUN["device"], None
    if free.cfg.label_fraction > 0:
        targets = train.soft_targets(ids, free.backbone.cfg.num_answers).to(device)
    labels = {"targets": targets, "labelled": labelled[ids].to(device)}
    if states is None:
        return live_states(free, train, ids, device) | labels
    return states_batch(states, ids, device) | labels


def exit_step(free: FREE, batch: dict, opts: tuple, scaler) -> dict:
    """One batch of stage 2 on the frozen backbone's states (exit_batch): a D step, then a G step,
    with opts = (G's optimizer, D's). batch['weight']: this process's share of the global batch
    (1 alone). Returns the losses (name -> tensor on the device; nothing is read back here,
    CHECK_EVERY)."""
    opt_g, opt_d = opts
    real, mask = batch["real"], batch["mask"]                      # h_L[CLS] (B, D), (B, 1, 1, s)
    with autocast():                                                   # G_k(h_{l_k}): K x (B, D)
        fakes = [free.exit_feature(k, h, mask) for k, h in enumerate(batch["inputs"])]
    stats = {}
    if "adv" in METHODS[free.cfg.exit_method]:
        # Discriminator step: tell final-layer features (real) from exit features (fake)
        with autocast():
            d_loss, stats = discriminator_loss(free, real, fakes)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(d_loss * batch["weight"]).backward()       # (the fakes reach D detached)
        average_gradients(list(free.disc.parameters()))     # under torchrun: the processes' mean
        scaler.step(opt_d)
    # Generator step: exit features should fool D, and the frozen head answer from them as from h_L
    with autocast():
        g_loss, g_stats = generator_loss(free, real, fakes, batch["targets"], batch["labelled"],
                                         batch["ce_weight"])
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(g_loss * batch["weight"]).backward()
    average_gradients(list(free.exits.parameters()))
    scaler.step(opt_g)
    return stats | g_stats


def exit_questions(train, ecfg: ExitConfig, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 2's questions: which may show their label (n,) bool, the pool it draws batches from
    (every question; the ce baseline, the labelled answers only) and those the CE term learns from
    (n,) bool."""
    labelled = labelled_mask(len(train), ecfg.label_fraction, seed)
    answered = labelled & train.trainable()
    pool = torch.arange(len(train))
    if ecfg.exit_method == "ce":
        pool = torch.nonzero(answered).squeeze(1)
    return labelled, pool, answered


def exit_optimizers(free: FREE) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """AdamW for the exits (G) and for the discriminator D (with a GAN's betas)."""
    fused = on_gpu(free.exits.parameters())
    opt_g = torch.optim.AdamW(free.exits.parameters(), lr=free.cfg.exit_lr, weight_decay=0.01,
                              fused=fused)
    opt_d = torch.optim.AdamW(free.disc.parameters(), lr=free.cfg.disc_lr, betas=(0.5, 0.999),
                              weight_decay=0.0, fused=fused)
    return opt_g, opt_d


def train_exits(free: FREE, states: dict, splits: dict, tcfg: TrainConfig, save,
                progress: dict | None = None) -> None:
    """Stage 2: the exits (and D) for exit_epochs over the train questions' frozen `states`; after
    each epoch every exit's val accuracy and a checkpoint (save(progress), None after the last)."""
    ecfg, train = free.cfg, splits["train"]
    labelled, pool, answered = exit_questions(train, ecfg, tcfg.seed)
    scaler, order = grad_scaler(), torch.Generator().manual_seed(tcfg.seed)
    opt_g, opt_d = exit_optimizers(free)
    first_epoch = 0 if progress is None else resume_exits(progress, opt_g, opt_d, scaler, order)
    for epoch in range(first_epoch, ecfg.exit_epochs):
        free.train()
        sums, t0, name = {}, time.time(), f"{epoch + 1}/{ecfg.exit_epochs}"
        bar = progress_bar(global_batches(len(pool), tcfg.batch_size, order),
                           f"exits ({ecfg.exit_method}) {name}")
        for n, ids in enumerate(bar, 1):
            local, weight = shard(pool[ids])                # all of it, weight 1, in one process
            batch = exit_batch(free, states, train, local, labelled)
            batch |= {"weight": weight, "ce_weight": ce_weight(answered, pool[ids], local)}
            # instance noise (--disc-noise), annealed linearly to 0 over the stage's steps
            done = (epoch * len(bar) + n) / (ecfg.exit_epochs * len(bar))
            free.disc.noise = ecfg.disc_noise * max(0.0, 1.0 - done)
            # each process's batch means weighted by its share of the global batch (1 in one
            # process): the processes' sums are then `size` x the global batch's means, exactly
            for k, v in exit_step(free, batch, (opt_g, opt_d), scaler).items():
                sums[k] = sums.get(k, 0.0) + v * weight                # on the device
            scaler.update()
            if n % CHECK_EVERY == 0 or n == len(bar):
                read = read_sums(sums)
                bar.set_postfix({k: f"{v / n:.3f}" for k, v in read.items()})
        keys = sorted(read)                    # the same keys, in one order, in every process
        totals = all_sum([read[k] for k in keys])                     # over the processes
        means = {k: v / len(bar) / WORLD["size"] for k, v in zip(keys, totals)}
        if is_main():
            seconds = {"seconds": time.time() - t0}                   # the epoch, not its val pass
            val = infer.collect(free, splits["val"], PROFILE_BATCH)
            profile = infer.exit_profile(splits["val"], val, free.exit_layers)
            report.log_exit_epoch(tcfg.out, ecfg, name, means | seconds, profile)
            last = epoch + 1 == ecfg.exit_epochs
            save(None if last else exit_progress(epoch, opt_g, opt_d, scaler, order))
        wait_for_main()


# --------------------------------------------------------------------------------------------------
# The run: stage 1, then stage 2, then the report (main reads top to bottom)
# --------------------------------------------------------------------------------------------------
def run_backbone(run: Run, state: dict | None) -> tuple[VLM, dict]:
    """Stage 1 into OUT/ckpt.pt (continuing `state` if given), its test accuracy, and --export.
    Returns the model and the splits."""
    splits, tokenizer, answers = load_run_data(run, state)
    model = VLM(cfg=run.model).to(RUN["device"])
    if state is not None:
        model.load_state_dict(state["model"])
    if WORLD["size"] > 1 and RUN["device"].type == "cuda":     # the global batch's statistics
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{run.model.depth} language-model layers of width {run.model.dim}")
    if run.model.freeze_vit:
        cache_patches(model, splits)
    scenes = None                  # shapes data: new scenes every epoch, not to be learned by heart
    if run.data.data == "shapes":
        scenes = TrainScenes(run.data, splits["train"], tokenizer, answers, run.train.epochs,
                             run.train.scene_workers)
        if (state or {}).get("scenes"):
            scenes.resume(state["scenes"], state["epoch"] + 1)
    try:
        save = stage1_saver(run, model, tokenizer, answers, scenes)
        train_backbone(model, splits, run.train, save, state, scenes)
    except FloatingPointError as e:
        raise SystemExit(f"error: {e} in stage 1; the last good checkpoint is kept in {run.ckpt}. "
                         f"Try a lower --lr.")
    finally:
        if scenes is not None:
            scenes.close()
    if is_main():
        res = evaluate(model, splits["test"], RUN["device"])
        report.log_test(run.train.out, res, majority_baseline(splits["train"], splits["test"]))
        record_test(run.ckpt, res)
        if run.train.export:
            export_checkpoint(run.train.export, run.ckpt)
    wait_for_main()
    return model, splits


def run_exits(run: Run, model: VLM, state: dict, source: dict, splits: dict) -> None:
    """Stage 2 into OUT/ckpt.pt on the frozen `model` (from `source`), continuing a stage 2 in
    progress (`state`); then the report."""
    # Host memory (measured in RESULTS.md): torch's imports + the data (per train image H x W x 3
    # bytes of pixels; per question its tokens, targets and Python record) + the frozen states
    # (frozen_states: at most STATE_CACHE_GB) + a batch. What only stage 1 reads is let go here:
    # its training state (the optimizer's is 2 x the backbone) and the stand-ins' pixel labels
    # (H x W x 2 bytes an image).
    for key in TRAINING_STATE:
        state.pop(key, None)
    for split in splits.values():
        split.pixel_labels = None
    free = FREE(model.to(RUN["device"]), run.exits).to(RUN["device"])
    progress = state.get("exit_progress") if run.train.resume else None
    if progress is not None:
        free.load_exits(state["exits"])
    if model.cfg.freeze_vit and splits["train"].patches is None:
        cache_patches(model, splits)
    size = sum(p.numel() for p in free.exits.parameters()) / 1e6
    print(f"stage 2: {run.exits.exit_method} exits after layers {free.exit_layers}, label fraction "
          f"{run.exits.label_fraction}; {size:.2f}M trainable exit parameters")
    if progress is None and is_main():
        val = infer.collect(free, splits["val"], PROFILE_BATCH)
        report.print_depth_profile(infer.exit_profile(splits["val"], val, free.exit_layers),
                                   "val before stage 2")
    save = stage2_saver(run, free, state, source)
    try:
        train_exits(free, frozen_states(free, splits["train"]), splits, run.train, save, progress)
    except FloatingPointError as e:
        raise SystemExit(f"error: {e} in stage 2; the last good checkpoint is kept in {run.ckpt}. "
                         f"Try a lower --exit-lr / --disc-lr.")
    if is_main():
        report_exits(free, splits, run)


def report_exits(free: FREE, splits: dict, run: Run) -> None:
    """After stage 2: the exits' test depth profile; infer.py's report, timed where the model
    trained, its calibrated point kept in the checkpoint for infer.py --image; then --export."""
    test = infer.exit_profile(splits["test"], infer.collect(free, splits["test"], PROFILE_BATCH),
                              free.exit_layers)
    report.log_exit_test(run.train.out, free.cfg, test)
    if run.train.final_eval:
        icfg = infer.InferConfig(ckpt=run.ckpt)
        results = infer.build_report(free, splits, "test", icfg)
        report.write_report(results, free, *infer.report_paths(icfg))  # report.json, speedup.png
        record_calibrated(run.ckpt, results["calibrated"])
    if run.train.export:
        export_checkpoint(run.train.export, run.ckpt)


def keep_backbone(run: Run, state: dict) -> str:
    """Stage 2 writes OUT/ckpt.pt over stage 1's checkpoint: keep stage 1's as OUT/backbone.pt (what
    stage 2 starts from and what a backbone is exported from). Returns its path."""
    path = os.path.join(run.train.out, BACKBONE_FILE)
    if is_main():
        save_atomic(path, state)
    wait_for_main()
    return path


def main(argv=None) -> None:
    args, dcfg, mcfg, tcfg, ecfg = parse_args(argv)
    try:
        state = validate(dcfg, mcfg, tcfg, ecfg)     # every flag, before any data or step
        describe = {"preset": args.preset, "train": asdict(tcfg), "exits": asdict(ecfg)}
        run = Run(dcfg, mcfg, tcfg, ecfg, describe)
        print(setup(tcfg.device, tcfg.threads))      # processes (torchrun), threads, device, dtype
        os.makedirs(tcfg.out, exist_ok=True)
        torch.manual_seed(tcfg.seed)
        if state is None or not (tcfg.stage == "exits" or "exits" in state):  # stage 1 (or resumed)
            if state is None and is_main():
                start_fresh(tcfg.out)
            model, splits = run_backbone(run, state)
            if tcfg.stage == "backbone":
                return
            state = load_checkpoint(run.ckpt)
            source = {"path": keep_backbone(run, state), "train_config": state["train_config"]}
        else:                                                                 # a trained backbone
            model, splits, source = trained_backbone(run, state)
        run_exits(run, model, state, source, splits)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
