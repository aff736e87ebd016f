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
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from data import DataConfig, DataError, add_config_args, batches, config_from_args, load_data, majority_baseline
from model import VLM, ModelConfig


@dataclass
class TrainConfig:
    out: str = field(default="out", metadata={"help": "output folder for ckpt.pt and log.jsonl"})
    epochs: int = field(default=6, metadata={"help": "stage-1 (backbone) epochs over the train split"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=300, metadata={"help": "linear warm-up steps before the cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size for evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of initialization and batch order"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cuda, mps or cpu",
                                                  "choices": ["auto", "cuda", "mps", "cpu"]})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/ckpt.pt (same configs) instead of starting over"})


# Named presets: overrides of the dataclass defaults. `default` = the dataclass defaults (a 2-core CPU
# or a laptop GPU), `tiny` = a sub-minute CPU run for tests, `base` = a bigger model and data for a GPU.
PRESETS = {
    "tiny": dict(train_images=300, val_images=40, test_images=40, questions_per_image=4, dim=64, depth=4, heads=2,
                 epochs=4, batch_size=32, warmup_steps=20, lr=2e-3),
    "default": dict(),
    "base": dict(train_images=40000, val_images=2000, test_images=2000, dim=256, depth=12, heads=8, vit_dim=128,
                 vit_depth=2, epochs=20, batch_size=128, lr=5e-4, warmup_steps=1000),
}


def parse_args(argv=None):
    """--preset picks the defaults; every config field is a flag that overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=list(PRESETS))
    known, _ = pre.parse_known_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="named defaults: tiny (tests, <1 min CPU), default (2-core CPU / laptop GPU), base (GPU)")
    for cls in (DataConfig, ModelConfig, TrainConfig):
        add_config_args(p, cls, PRESETS[known.preset])
    args = p.parse_args(argv)
    return args, config_from_args(DataConfig, args), config_from_args(ModelConfig, args), config_from_args(TrainConfig, args)


def pick_device(choice: str):
    """Device autodetect cuda -> mps -> cpu, and the autocast dtype with the reason for it."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16, "bf16 autocast: this GPU supports bfloat16 (no loss scaling needed)"
    if device.type == "cuda":
        return device, torch.float16, "fp16 autocast with a grad scaler: this GPU has no bfloat16"
    return device, torch.float32, f"float32: mixed precision is used on CUDA only, and this is {device.type}"


def get_lr(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft VQA targets (B, A), normalized to a distribution per question.
    NOTE (deviation): many VQA classifiers use per-answer BCE; a softmax suits single-answer shapes data
    and lets the exits share the same loss shape with the KD term of stage 2."""
    targets = targets / targets.sum(dim=1, keepdim=True).clamp(min=1e-8)
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which file, not a traceback
        raise DataError(f"{path}: not a readable checkpoint ({e.__class__.__name__})")


def build_model(state: dict) -> tuple[VLM, Tokenizer, list[str], DataConfig]:
    """Rebuild the backbone, tokenizer, answer vocabulary and data config stored in a checkpoint."""
    model = VLM(cfg=ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model, Tokenizer.from_str(state["tokenizer"]), state["answers"], DataConfig(**state["data_config"])


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


def resume_state(tcfg: TrainConfig, dcfg: DataConfig, mcfg: ModelConfig) -> dict | None:
    """The checkpoint to continue from (with --resume), after checking it was made with the same configs."""
    path = os.path.join(tcfg.out, "ckpt.pt")
    if not tcfg.resume:
        if os.path.exists(path):
            print(f"note: {path} exists and will be overwritten (use --resume to continue it)")
        return None
    state = load_checkpoint(path)
    for name, cfg in [("data_config", dcfg), ("model_config", mcfg)]:
        saved = {k: v for k, v in state[name].items() if k not in ("vocab_size", "num_answers", "max_text_len", "image_size")}
        now = {k: v for k, v in asdict(cfg).items() if k in saved}
        if saved != now:
            diff = sorted(k for k in saved if saved[k] != now[k])
            raise DataError(f"--resume: {path} was made with different settings ({', '.join(diff)})")
    return state


def train_backbone(model, splits, tokenizer, answers, dcfg, mcfg, tcfg, device, dtype, state=None):
    """Stage 1: train the whole VLM on the train split with soft cross-entropy; eval on val each epoch."""
    train, val = splits["train"], splits["val"]
    trainable = torch.nonzero(train.trainable()).squeeze(1)          # (n_train,) questions with a target
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    steps_per_epoch = math.ceil(len(trainable) / tcfg.batch_size)
    total_steps = tcfg.epochs * steps_per_epoch
    step, start_epoch = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, start_epoch = state["step"], state["epoch"] + 1
        set_rng_state(state["rng"])
        print(f"resumed from epoch {state['epoch'] + 1} (step {step})")
    ckpt, log = os.path.join(tcfg.out, "ckpt.pt"), os.path.join(tcfg.out, "log.jsonl")
    t0 = time.time()
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        bar = tqdm(list(batches(len(trainable), tcfg.batch_size, shuffle=True)), desc=f"backbone {epoch + 1}/{tcfg.epochs}",
                   leave=False, dynamic_ncols=True)
        loss_sum, hit_sum, seen = 0.0, 0.0, 0
        for ids in bar:
            ids = trainable[ids]
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total_steps, tcfg)
            batch = to_device(train.batch(ids), device)
            targets = train.soft_targets(ids, len(answers)).to(device)  # (B, A)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(**batch)                                   # (B, A)
            loss = soft_cross_entropy(logits, targets)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: non-finite loss ({loss.item()}) at step {step} of stage 1; the last good "
                                 f"checkpoint is kept in {ckpt}. Try a lower --lr or --grad-clip.")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum += loss.item() * len(ids)
            hit_sum += train.score(ids, logits.argmax(dim=1).cpu()).sum().item()
            seen += len(ids)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * hit_sum / seen:.1f}%")
        res = evaluate(model, val, device, dtype, tcfg.eval_batch_size)
        elapsed = time.time() - t0
        print(f"epoch {epoch + 1}/{tcfg.epochs}  loss {loss_sum / seen:.3f}  train acc {100 * hit_sum / seen:.1f}%  "
              f"val acc {res['accuracy']:.1f}%  ({elapsed:.0f}s)")
        log_json(log, {"stage": "backbone", "epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen,
                       "train_accuracy": 100 * hit_sum / seen, "val_accuracy": res["accuracy"],
                       "val_per_family": res["per_family"], "time_s": round(elapsed, 1)})
        save_checkpoint(ckpt, make_state(model, opt, step, epoch, dcfg, mcfg, tcfg, tokenizer, answers))
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


def main(argv=None) -> None:
    args, dcfg, mcfg, tcfg = parse_args(argv)
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    device, dtype, why = pick_device(tcfg.device)
    print(f"device: {device}  ({why}); torch threads: {torch.get_num_threads()}")
    try:
        os.makedirs(tcfg.out, exist_ok=True)
        state = resume_state(tcfg, dcfg, mcfg)
        torch.manual_seed(tcfg.seed)
        t = time.time()
        if state is None:
            splits, tokenizer, answers = load_data(dcfg)
        else:
            splits, tokenizer, answers = load_data(dcfg, Tokenizer.from_str(state["tokenizer"]), state["answers"])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    mcfg.image_size, mcfg.max_text_len = dcfg.image_size, dcfg.max_question_len
    mcfg.vocab_size, mcfg.num_answers = tokenizer.get_vocab_size(), len(answers)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"data: {dcfg.data} ({sizes} questions), {len(answers)} answers, {mcfg.vocab_size} tokens "
          f"({time.time() - t:.1f}s)")
    print("config:", json.dumps({"preset": args.preset, "data": asdict(dcfg), "model": asdict(mcfg), "train": asdict(tcfg)}))
    model = VLM(cfg=mcfg)
    if state is not None:
        model.load_state_dict(state["model"])
    elif os.path.exists(os.path.join(tcfg.out, "log.jsonl")):
        os.remove(os.path.join(tcfg.out, "log.jsonl"))
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {mcfg.depth} language-model layers of width {mcfg.dim}")
    train_backbone(model, splits, tokenizer, answers, dcfg, mcfg, tcfg, device, dtype, state)
    report_test(model, splits, device, dtype, tcfg)


if __name__ == "__main__":
    main()
