"""Checkpoints: what each stage's file holds, written atomically and read back with a clear error;
--resume, refused where a setting changed; --export; a trained checkpoint rebuilt into its backbone
and exits; the JSON log and the random states.

Public: save_atomic, load_checkpoint, log_json, export_checkpoint, build_from_checkpoint,
load_free, SHIPPED_EXITS, default_checkpoint (and train.py's savers: stage1_saver, stage2_saver,
record_test, record_calibrated, resume_state, resume_stage, resume_exits, exit_progress).
"""
import json
import os
import random
from dataclasses import asdict, replace

import numpy as np
import torch
from tokenizers import Tokenizer

from free_min import FREE, ExitConfig
from model import VLM, ModelConfig
from data import DataConfig
from util.config import CheckpointError, ConfigError, flag
from util.runtime import load_scaler


# --------------------------------------------------------------------------------------------------
# Checkpoints, the log and random states
# --------------------------------------------------------------------------------------------------
def save_atomic(path: str, obj) -> None:
    """Write obj to path (JSON for a .json path, torch.save otherwise) through a temp file and a
    rename, so that an interrupted write never leaves a half-written file in place of the old
    one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, flag_name: str = "") -> dict:
    """Read a checkpoint; CheckpointError naming the flag and file if it is missing, unreadable
    or not free-min's."""
    where = f"{flag_name} {path}".strip()
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which file, not a traceback
        raise CheckpointError(f"{where}: not a readable checkpoint ({e.__class__.__name__})")
    if not isinstance(state, dict) or not {"model", "model_config", "data_config"} <= set(state):
        raise CheckpointError(f"{where}: not a free-min checkpoint (no backbone weights and "
                              f"configs in it)")
    return state


def log_json(out: str, record: dict) -> None:
    """One JSON line per evaluation in OUT/log.jsonl."""
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore rng_state(); on a machine with fewer GPUs than the saving one, the GPUs it has
    (none on a CPU)."""
    torch.set_rng_state(state["torch"])
    for i, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(gpu_state, i)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# What only continuing a run needs: an exported checkpoint leaves it out, and stage 2 lets it go.
TRAINING_STATE = ("optimizer", "scaler", "rng", "aux", "step", "epoch", "scenes")


def export_checkpoint(path: str, ckpt: str) -> None:
    """A run's checkpoint, small enough to ship (how backbones/ is made): fp16 weights (loaded
    back in fp32), the configs, tokenizer, answers, the backbone's test accuracy
    (tests/test_shipped_backbone.py checks that it is still reached) and, after stage 2, the
    exits and their calibrated point; no optimizer or RNG state."""
    state = {k: v for k, v in load_checkpoint(ckpt).items() if k not in TRAINING_STATE}
    for key in ("model", "exits"):
        if key in state:
            state[key] = {k: v.half() if v.is_floating_point() else v
                          for k, v in state[key].items()}
    save_atomic(path, state)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


def resume_stage(state: dict, opt, scaler, heads: dict) -> tuple[int, int]:
    """Load an interrupted stage 1's optimizer, scaler, auxiliary heads and RNG; return (step, next
    epoch)."""
    opt.load_state_dict(state["optimizer"])
    load_scaler(scaler, state["scaler"])
    for name, (_, head) in heads.items():
        head.load_state_dict(state["aux"][name])
    set_rng_state(state["rng"])
    print(f"resumed stage 1 after epoch {state['epoch'] + 1} (step {state['step']})")
    return state["step"], state["epoch"] + 1


def exit_progress(epoch: int, opt_g, opt_d, scaler, order: torch.Generator) -> dict:
    """What continuing an interrupted stage 2 after `epoch` needs (resume_exits reads it back)."""
    return {"epoch": epoch, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "scaler": scaler.state_dict(), "batch_order": order.get_state(), "rng": rng_state()}


def resume_exits(progress: dict, opt_g, opt_d, scaler, order) -> int:
    """Load an interrupted stage 2's optimizers, scaler, batch order and RNG; return the next
    epoch."""
    opt_g.load_state_dict(progress["opt_g"])
    opt_d.load_state_dict(progress["opt_d"])
    load_scaler(scaler, progress["scaler"])
    order.set_state(progress["batch_order"])
    set_rng_state(progress["rng"])
    print(f"resumed stage 2 after epoch {progress['epoch'] + 1}")
    return progress["epoch"] + 1


# --------------------------------------------------------------------------------------------------
# --resume: the same run, with the same settings
# --------------------------------------------------------------------------------------------------
# Flags whose change would make a resumed run follow another schedule than the one it started.
SCHEDULE = {"backbone": ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip",
                         "aux_weight", "scene_weight", "sample_families", "seed"),
            "exits": ("batch_size", "seed")}
# What checkpoints from before the scene-fact flags trained with.
BEFORE_SCENE_FACTS = {"scene_weight": 0.0, "sample_families": "uniform"}
# Model options removed after they lost (RESULTS.md, 2026-12-07; `git checkout 4a8b9d2` has them),
# at the values every other model was built with: a checkpoint that names them at these values is
# today's model, one built otherwise is refused (model_config_of).
REMOVED = {"position": "learned", "coord_conv": False}


def model_config_of(state: dict, path: str = "the checkpoint") -> dict:
    """A checkpoint's model config without the removed options (ConfigError if it was built with
    one of them)."""
    saved = dict(state["model_config"])
    for key, value in REMOVED.items():
        built = saved.pop(key, value)
        if built != value:
            raise ConfigError(f"{path} was built with {flag(key)} {built!r}, an option since "
                              "removed (it lost; RESULTS.md, 2026-12-07): `git checkout 4a8b9d2` "
                              "runs it")
    return saved
# Settings made from the data or the encoder, not by the flags.
DERIVED = ("vocab_size", "num_answers", "max_text_len", "image_size", "pixel_mean", "pixel_std",
           "patch_size", "vit_dim", "crop_pct", "interpolation")


def refuse_changes(path: str, saved: dict, now: dict, keys, what: str) -> None:
    """ConfigError listing every setting in `keys` whose value differs from the checkpoint's."""
    diff = [k for k in keys if k in saved and k in now and saved[k] != now[k]]
    if diff:
        changes = ", ".join(f"{flag(k)} {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise ConfigError(
            f"--resume: {path} was made with other {what} ({changes}); resume with the "
            "same values, or start over without --resume")


def resume_state(tcfg: "TrainConfig", dcfg: DataConfig, mcfg: ModelConfig,
                 ecfg: ExitConfig) -> dict | None:
    """With --resume, the interrupted run in OUT (stage 1, or stage 2 when it holds exits in
    progress), checked to have been made with the same settings; without, None (and a note if a
    checkpoint will be replaced)."""
    path = os.path.join(tcfg.out, "ckpt.pt")
    if not tcfg.resume:
        if os.path.exists(path):
            print(f"note: {path} exists and will be replaced when this run saves (use --resume to "
                  f"continue it)")
        return None
    state = load_checkpoint(path, "--resume")
    if "exits" in state:
        if "exit_progress" not in state:
            raise ConfigError(
                f"--resume: {path} holds a finished run; there is nothing to resume (train "
                f"other exits with --stage exits --backbone {path} --out ANOTHER_FOLDER)")
        refuse_changes(path, state["exit_config"], asdict(ecfg), state["exit_config"],
                       "exit settings")
        refuse_changes(path, state["train_config"], asdict(tcfg), SCHEDULE["exits"],
                       "training settings")
        return state
    if tcfg.stage == "exits":
        raise ConfigError(
            f"--resume --stage exits: {path} holds a backbone but no interrupted stage 2 "
            "(drop --resume to train exits on it)")
    for name, cfg in (("data_config", dcfg), ("model_config", mcfg)):
        saved = model_config_of(state, path) if name == "model_config" else state[name]
        keys = [k for k in saved if k not in DERIVED]
        refuse_changes(path, saved, asdict(cfg), keys, "data or model settings")
    # a run from before these flags: without them
    made_with = BEFORE_SCENE_FACTS | state["train_config"]
    refuse_changes(path, made_with, asdict(tcfg), SCHEDULE["backbone"], "training settings")
    return state


# --------------------------------------------------------------------------------------------------
# What each stage's checkpoint holds (OUT/ckpt.pt)
# --------------------------------------------------------------------------------------------------
def start_fresh(out: str) -> None:
    """A new run in OUT: drop the log and report an earlier run left there, so that nothing in OUT
    describes another run (checkpoints are replaced atomically when this run saves)."""
    for name in ("log.jsonl", "report.json", "speedup.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def stage1_saver(run: "Run", model: VLM, tokenizer: Tokenizer, answers: list[str], scenes):
    """save(epoch, step, opt, scaler, heads), which writes stage 1's checkpoint: the weights, the
    configs, tokenizer and answers, and what continuing needs (optimizer, scaler, step, RNG, the
    auxiliary heads, the training scenes' progress)."""
    fixed = {"model_config": asdict(run.model), "data_config": asdict(run.data),
             "train_config": asdict(run.train), "answers": answers, "tokenizer": tokenizer.to_str()}

    def save(epoch, step, opt, scaler, heads):
        save_atomic(
            run.ckpt,
            fixed
            | {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": epoch,
                "rng": rng_state(),
                "aux": {k: h.state_dict() for k, (_, h) in heads.items()},
                "scenes": None if scenes is None else scenes.progress(epoch),
            },
        )
    return save


def record_test(ckpt: str, res: dict) -> None:
    """Stage 1's test accuracy into its checkpoint."""
    test = {"test_accuracy": res["accuracy"], "test_per_family": res["per_family"]}
    save_atomic(ckpt, load_checkpoint(ckpt) | test)


def record_calibrated(ckpt: str, calibrated: dict) -> None:
    """The report's calibrated point (rule, threshold, exits and its promise) into the checkpoint,
    where infer.py --image finds it."""
    keys = ("rule", "threshold", "exit_layers", "calibration", "risk", "max_drop", "delta")
    point = {k: calibrated.get(k) for k in keys}
    save_atomic(ckpt, load_checkpoint(ckpt) | {"calibrated": point})


# What a stage-2 checkpoint keeps of the backbone it starts from: the weights and what rebuilds
# them.
BACKBONE_KEYS = ("model", "model_config", "data_config", "answers", "tokenizer", "test_accuracy",
                 "test_per_family")


def stage2_saver(run: "Run", free: FREE, state: dict, source: dict):
    """save(progress), which writes stage 2's checkpoint: the backbone of `state`, `source`
    (where it came from), this run's exits and configs, and nothing else of another run;
    `progress` (None when stage 2 is done) is what continuing needs."""
    own = {k: state[k] for k in BACKBONE_KEYS if k in state} | {"backbone_source": source}

    def save(progress: dict | None) -> None:
        exits = {k: v for k, v in free.state_dict().items() if not k.startswith("backbone.")}
        ckpt = own | {
            "exits": exits,
            "exit_config": asdict(run.exits),
            "train_config": asdict(run.train),
        }
        save_atomic(run.ckpt, ckpt | ({} if progress is None else {"exit_progress": progress}))
    return save


# --------------------------------------------------------------------------------------------------
# A trained checkpoint rebuilt (infer.py, experiments)
# --------------------------------------------------------------------------------------------------
def load_free(cfg: "InferConfig"):
    """The checkpoint's FREE model (exits on their backbone), tokenizer, answers, data config and
    stored state."""
    state = load_checkpoint(cfg.ckpt, "--ckpt")
    try:
        _, free, tokenizer, answers, dcfg = build_from_checkpoint(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"--ckpt {cfg.ckpt}: not a free-min checkpoint "
                              f"({e.__class__.__name__}: {str(e)[:120]})")
    if free is None:
        raise CheckpointError(f"--ckpt {cfg.ckpt}: has a backbone but no exits; train them with "
                              f"python train.py --stage exits")
    return free, tokenizer, answers, dcfg, state


def build_from_checkpoint(state: dict):
    """Rebuild what a checkpoint holds, in eval mode: (backbone VLM, FREE or None, tokenizer,
    answers, DataConfig)."""
    cfg = ModelConfig(**model_config_of(state))
    # the weights come from the checkpoint: build without timm's download or the encoder's weights
    # file
    backbone = VLM(cfg=replace(cfg, vit_pretrained=False, vit_weights=""))
    backbone.cfg = cfg
    backbone.load_state_dict(state["model"])
    backbone.eval()
    free = None
    if "exits" in state:
        free = FREE(backbone, ExitConfig(**state["exit_config"]))
        free.load_exits(state["exits"])
        free.eval()
    tokenizer = Tokenizer.from_str(state["tokenizer"])
    return backbone, free, tokenizer, state["answers"], DataConfig(**state["data_config"])


SHIPPED_EXITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "backbones",
                             "shapes-default-free.pt")


def default_checkpoint() -> str:
    """No --ckpt: train.py's output (out/ckpt.pt) if there is one, else the exits the repo ships."""
    return "out/ckpt.pt" if os.path.isfile("out/ckpt.pt") else SHIPPED_EXITS
