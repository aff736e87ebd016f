"""What the two commands do around the method; nothing here is needed to follow the paper.

  * train.py: every flag checked and the checkpoint the run starts from read, before any data is
    made or any step taken (a bad flag costs seconds and touches nothing written); --resume
    refuses other settings than the interrupted run's; --vit NAME takes its input size and
    normalisation from timm; the run's data; what each stage's checkpoint holds;
  * infer.py: its flags checked; a trained checkpoint rebuilt into the backbone and its exits;
    the files it reads and writes; the threshold --image uses.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, replace

from tokenizers import Tokenizer

from data import SPLITS, DataConfig, check_data_config, load_data
from free_min import FREE, RULES, ExitConfig, check_exit_config, resolve_exit_layers
from model import VLM, ModelConfig, check_model_config, describe_timm_vit, make_vit
from runtime import (CheckpointError, ConfigError, export_checkpoint, flag, is_main,
                     load_checkpoint, require, rng_state, save_atomic)


# --------------------------------------------------------------------------------------------------
# train.py's flags
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


def validate(dcfg: DataConfig, mcfg: ModelConfig, tcfg, ecfg: ExitConfig) -> dict | None:
    """Check every flag, and read the checkpoint the run starts from, before any data is made or
    any step is taken: a bad flag costs seconds and touches nothing written. Returns that
    checkpoint (the backbone of --stage exits, or the run to --resume) or None."""
    check_data_config(dcfg)
    require(tcfg, ("epochs", "batch_size", "lr"), 0, strict=True)
    require(
        tcfg,
        ("weight_decay", "warmup_steps", "grad_clip", "aux_weight", "scene_weight", "threads",
         "scene_workers"),
        0,
        strict=False,
    )
    if tcfg.backbone and tcfg.stage != "exits":
        raise ConfigError(
            "--backbone is read by --stage exits only (the other stages train their own backbone)")
    try:
        mcfg.image_size, mcfg.max_text_len = dcfg.image_size, dcfg.max_question_len
        if tcfg.stage == "exits" and not tcfg.resume:
            named = ("--backbone" if tcfg.backbone
                     else "--stage exits (no --backbone, so OUT/ckpt.pt):")
            state = load_checkpoint(tcfg.backbone or os.path.join(tcfg.out, "ckpt.pt"), named)
        else:
            if mcfg.vit:
                adopt_timm_encoder(dcfg, mcfg)
            check_model_config(mcfg)
            state = resume_state(tcfg, dcfg, mcfg, ecfg)
        depth = state["model_config"]["depth"] if state is not None else mcfg.depth
        check_exit_config(ecfg, depth)
        layers = resolve_exit_layers(ecfg.exit_layers, depth)
        ecfg.exit_layers = ",".join(map(str, layers))                  # recorded written out
    except ValueError as e:   # the config checks of model.py and free_min.py
        raise ConfigError(str(e))
    return state


# --resume: the same run, with the same settings
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


def resume_state(tcfg, dcfg, mcfg, ecfg) -> dict | None:
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
# infer.py's flags, and a trained checkpoint rebuilt
# --------------------------------------------------------------------------------------------------
def check_infer_config(cfg) -> None:
    """Refuse settings that cannot work, naming the flag (ConfigError)."""
    for name in ("batch_size", "timing_samples", "repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.threads < 0 or not 0 < cfg.max_drop < 100:
        raise ConfigError(
            f"--threads must be >= 0 and --max-drop in (0, 100) points (got {cfg.threads}, "
            f"{cfg.max_drop})")
    if not 0 < cfg.delta < 1:
        raise ConfigError(f"--delta must be a probability in (0, 1) (got {cfg.delta})")
    spec, t = RULES[cfg.rule], cfg.threshold
    if t != -1 and not (spec.bounds[0] <= t <= spec.bounds[1] and (not spec.whole or t == int(t))):
        kind = "a whole number" if spec.whole else "a number"
        raise ConfigError(f"--threshold {t:g}: {cfg.rule} takes {kind} from {spec.bounds[0]:g} to "
                          f"{spec.bounds[1]:g} (or -1: the calibrated one)")
    refusals = [
        (
            cfg.image and not cfg.question.strip(),
            "--image needs a question: give --question with the text to answer (it is empty)",
        ),
        (cfg.question and not cfg.image, "--question needs --image, the picture it asks about"),
        (
            cfg.eval and cfg.image,
            "--eval reports on a whole split and --image answers one question: give one of them",
        ),
        (cfg.explain and not cfg.image, "--explain goes with --image and --question"),
        (not (cfg.eval or cfg.image), "nothing to do: give --eval, or --image and --question"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)


def load_free(cfg):
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


# --------------------------------------------------------------------------------------------------
# train.py's run: its data, and what each stage's checkpoint holds (OUT/ckpt.pt, written atomically)
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: its settings (train.parse_args) and where it writes."""
    data: DataConfig
    model: ModelConfig
    train: object                  # train.TrainConfig
    exits: ExitConfig
    describe: dict                 # what the run prints and logs as its config

    @property
    def ckpt(self) -> str:
        return os.path.join(self.train.out, "ckpt.pt")


def load_run_data(run, state: dict | None):
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


def trained_backbone(run, state: dict) -> tuple[VLM, dict, dict]:
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


def start_fresh(out: str) -> None:
    """A new run in OUT: drop the log and report an earlier run left there, so that nothing in OUT
    describes another run (checkpoints are replaced atomically when this run saves)."""
    for name in ("log.jsonl", "report.json", "speedup.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def stage1_saver(run, model: VLM, tokenizer: Tokenizer, answers: list[str], scenes):
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


def record_test(run, res: dict) -> None:
    """Stage 1's test accuracy into its checkpoint, then --export."""
    test = {"test_accuracy": res["accuracy"], "test_per_family": res["per_family"]}
    save_atomic(run.ckpt, load_checkpoint(run.ckpt) | test)
    if run.train.export:
        export_checkpoint(run.train.export, run.ckpt)


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


def stage2_saver(run, free: FREE, state: dict, source: dict):
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
# infer.py's files, and the threshold --image uses
# --------------------------------------------------------------------------------------------------
SHIPPED_EXITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backbones",
                             "shapes-default-free.pt")


def default_checkpoint() -> str:
    """No --ckpt: train.py's output (out/ckpt.pt) if there is one, else the exits the repo ships."""
    return "out/ckpt.pt" if os.path.isfile("out/ckpt.pt") else SHIPPED_EXITS


def report_paths(cfg) -> tuple[str, str]:
    """--json and --plot, or beside the checkpoint: report.json and speedup.png for the test
    split (the names train.py gives the same report), report_SPLIT.json and speedup_SPLIT.png for
    another split."""
    folder = os.path.dirname(os.path.abspath(cfg.ckpt))
    tail = "" if cfg.split == "test" else f"_{cfg.split}"
    return (cfg.json or os.path.join(folder, f"report{tail}.json"),
            cfg.plot or os.path.join(folder, f"speedup{tail}.png"))


def pick_threshold(free, cfg, calibrated: dict) -> tuple[float, list[int] | None, str]:
    """The threshold and exits --image uses, and how they were chosen: --threshold if given; else
    the run's calibrated point for this rule (none evaluated, i.e. the full model, where
    calibration found no point that keeps its promise); else the rule's default."""
    default = RULES[cfg.rule].default
    if cfg.threshold != -1:
        return cfg.threshold, None, f"threshold {cfg.threshold:g}"
    if calibrated.get("rule") == cfg.rule and calibrated.get("threshold") is not None:
        exits = [free.exit_layers.index(l) for l in calibrated["exit_layers"]]
        how = f"calibrated, {calibrated.get('calibration', 'empirical')}"
        return calibrated["threshold"], exits, f"threshold {calibrated['threshold']:g} ({how})"
    if calibrated.get("rule") == cfg.rule:
        return default, [], "no exit: calibration found no point that keeps its promise"
    return default, None, f"threshold {default:g} (the rule's default; not calibrated)"
