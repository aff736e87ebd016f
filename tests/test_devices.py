"""The device paths a CPU can check: where collectives' tensors live, which copies may overlap, which GPUs
get bf16, resuming with fewer GPUs, one accuracy for one model, and the scenes of the next epoch drawn while
the current one trains."""
import os
import subprocess
import sys
import time

import torch

import data
from model import VLM
import free_min
from free_min import FREE, ExitConfig
import train
import infer
from util import checkpoints, runtime, scenes


def test_collectives_use_the_device_their_backend_serves(monkeypatch):
    """NCCL all-reduces CUDA tensors only (this process's GPU), gloo CPU ones: all_sum's tensor follows."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert runtime.collective_device("nccl") == torch.device("cuda", 3)
    assert runtime.collective_device("gloo") == torch.device("cpu")


def test_batches_are_copied_to_the_device_synchronously():
    """to_device never asks for an asynchronous copy: batches are made in pageable memory, from which a
    non_blocking copy buys nothing on CUDA and can read freed memory on Apple GPUs."""
    asked = []

    class Recorder:
        def to(self, device, **kwargs):
            asked.append(kwargs)
            return self
    runtime.to_device({"images": Recorder(), "tokens": Recorder(), "patches": None}, torch.device("cuda"))
    assert asked == [{}, {}]


def test_gpus_that_would_emulate_bf16_get_fp16(monkeypatch):
    """A GPU without bf16 units (T4, V100) reports bf16 'supported' through emulation; it gets fp16 + loss
    scaling instead, and a GPU with bf16 units gets bf16."""
    for native, expected in ((False, torch.float16), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        assert runtime.pick_dtype(torch.device("cuda"))[0] == expected
    assert runtime.pick_dtype(torch.device("cpu"))[0] == torch.float32


def test_resume_on_a_machine_with_fewer_gpus():
    """A checkpoint saved with the RNG states of 2 GPUs resumes on a machine with none (this CPU): the
    states of the GPUs it has are restored, the CPU's exactly."""
    torch.manual_seed(5)
    state = checkpoints.rng_state() | {"cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    expected = torch.rand(3)
    torch.manual_seed(6)
    checkpoints.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def tiny_model_and_splits():
    torch.manual_seed(0)
    splits, tok, answers = data.load_data(data.DataConfig(train_images=20, val_images=30, test_images=30,
                                                          calib_images=30), only=data.SPLITS)
    cfg = train.ModelConfig(image_size=64, max_text_len=24, vocab_size=tok.get_vocab_size(), num_answers=len(answers),
                            dim=32, depth=2, heads=2)
    return VLM(cfg=cfg), splits


def test_stage1_evaluation_and_the_report_give_one_accuracy():
    """The test accuracy stage 1 records and the report's full model are the same number: both in float32
    (on a GPU, stage 1 trains under autocast but evaluates as the report does)."""
    model, splits = tiny_model_and_splits()
    with torch.no_grad():                                   # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    free = FREE(model, ExitConfig(exit_layers="1"))
    recorded = train.evaluate(model, splits["test"], torch.device("cpu"))["accuracy"]
    cfg = infer.InferConfig(timing=False)
    assert infer.build_report(free, splits, "test", cfg)["full"]["accuracy"] == recorded


def fresh_split(cfg, epoch, tok, answers, weights=None):
    """Epoch `epoch`'s train split, drawn in this process."""
    return scenes.fresh_split(cfg, epoch, weights, (0, 1), tok, {a: i for i, a in enumerate(answers)})


def test_the_next_epochs_scenes_are_drawn_while_this_one_trains():
    """TrainScenes: epoch 0 is the split given; asking for epoch e starts epoch e + 1 in the background, so that
    it is ready when its turn comes (the epoch after next is never waited for), and it equals what
    scenes.fresh_split draws in this process."""
    cfg = data.DataConfig(train_images=30, val_images=1, test_images=1)
    splits, tok, answers = data.load_data(cfg, only=("train", "val", "test"))
    drawn = scenes.TrainScenes(cfg, splits["train"], tok, answers, epochs=3)
    try:
        assert drawn(0) is splits["train"]
        assert 1 in drawn.pending                          # started at once, before epoch 0 trains
        first = drawn(1)
        assert 2 in drawn.pending and 3 not in drawn.pending      # the last epoch is 2
        deadline = time.time() + 60                         # "training" epoch 1 while epoch 2 is drawn
        while not all(f.done() for f in drawn.pending[2]) and time.time() < deadline:
            time.sleep(0.1)
        assert all(f.done() for f in drawn.pending[2])
        second = drawn(2)
    finally:
        drawn.close()
    for epoch, split in ((1, first), (2, second)):
        assert_same_split(split, fresh_split(cfg, epoch, tok, answers))
    assert not torch.equal(first.images, second.images)


def assert_same_split(a, b):
    for name in ("images", "image_index", "tokens", "text_mask", "answer_idx", "answer_score", "pixel_labels", "facts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.records == b.records


def test_one_and_three_workers_draw_the_same_epochs():
    """Each image of an epoch comes from its own seed, so three processes, each drawing and building a third of
    the split, give the epochs one draws (scenes.fresh_split in one part, which the test above shows one worker
    gives), weighted families included, image for image."""
    cfg = data.DataConfig(train_images=31, val_images=1, test_images=1)
    splits, tok, answers = data.load_data(cfg, only=("train", "val", "test"))
    heavy = dict.fromkeys(data.FAMILIES, 1.0) | {"relate": 5.0}
    drawn = scenes.TrainScenes(cfg, splits["train"], tok, answers, epochs=3, workers=3)
    try:
        drawn(0)
        drawn.weights = heavy                                                 # epoch 2 is drawn with them
        three = [drawn(1), drawn(2)]
    finally:
        drawn.close()
    one = [fresh_split(cfg, 1, tok, answers), fresh_split(cfg, 2, tok, answers, heavy)]
    for a, b in zip(one, three):
        assert_same_split(a, b)
    assert one[1].families.count("relate") > one[0].families.count("relate")
    assert len(three[0].images) == 31 and three[0].image_index.max() == 30


def test_threads_default_to_the_cores_other_work_leaves_free(monkeypatch):
    """--threads 0 on 2 cores: 2 when the machine is idle, 1 when another job holds a core (or both:
    never 0); a number given is taken as it is, and so is OMP_NUM_THREADS (torchrun sets it)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for load, expected in ((0.1, 2), (1.0, 1), (2.7, 1)):
        monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, load, load))
        threads, why = runtime.pick_threads(0)
        assert threads == expected and "2 cores" in why
    assert runtime.pick_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.pick_threads(0) == (torch.get_num_threads(), "OMP_NUM_THREADS")


def test_weighted_epochs_draw_the_families_asked_for_and_resume_alike():
    """With weights, an epoch's questions follow them (relate 9 : 1 for every other family); a run resumed
    from TrainScenes.progress draws the next epochs exactly as the uninterrupted one does."""
    cfg = data.DataConfig(train_images=60, val_images=1, test_images=1)
    splits, tok, answers = data.load_data(cfg)
    heavy = dict.fromkeys(data.FAMILIES, 1.0) | {"relate": 9.0}
    drawn = fresh_split(cfg, 1, tok, answers, heavy).families
    assert drawn.count("relate") / len(drawn) > 0.45
    one = scenes.TrainScenes(cfg, splits["train"], tok, answers, epochs=4, workers=0)
    one(0)
    one.weights = heavy                                  # learned after epoch 0: epoch 2 is drawn with it
    splits_one = [one(1), one(2)]
    saved = one.progress(1)
    other = scenes.TrainScenes(cfg, splits["train"], tok, answers, epochs=4, workers=0)
    other.resume(saved, 2)
    assert other(2).records == splits_one[1].records and one.drawn_with[1] is None


def test_family_weights_follow_the_training_error():
    weights = scenes.family_weights({"exist": 100.0, "relate": 50.0}, ["exist", "relate", "count"])
    assert weights == {"exist": scenes.FAMILY_FLOOR, "relate": 0.5 + scenes.FAMILY_FLOOR, "count": 1 + scenes.FAMILY_FLOOR}


PARENT = """import sys, time, data
from util import scenes
if __name__ == "__main__":
    cfg = data.DataConfig(train_images=4, val_images=1, test_images=1)
    splits, tok, answers = data.load_data(cfg)
    drawn = scenes.TrainScenes(cfg, splits["train"], tok, answers, epochs=3)
    drawn(0)                                             # starts the process that draws epoch 1
    print(*drawn.pool._processes, flush=True)
    time.sleep(120)
"""


def test_the_drawing_process_ends_when_the_training_process_is_killed(tmp_path):
    """A training run killed outright (no clean-up) leaves no process drawing scenes behind."""
    (tmp_path / "parent.py").write_text(PARENT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=root, text=True,
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"))
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(worker, 0)                           # still there?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, 9)
    raise AssertionError("the drawing process outlived the training process")


def test_stage2_reads_the_frozen_states_in_float32_under_mixed_precision(monkeypatch):
    """Stage 2 trains the exits on states computed once, and the report evaluates them on float32 states: so
    those are computed in float32 even where the run's dtype is bf16 (forced here on the CPU)."""
    model, splits = tiny_model_and_splits()
    free = FREE(model, ExitConfig(exit_layers="1")).eval()
    monkeypatch.setitem(runtime.RUN, "dtype", torch.bfloat16)
    states = train.frozen_states(free, splits["val"])
    with torch.no_grad():
        exact, _ = model.hidden_states(**splits["val"].batch(torch.arange(len(splits["val"]))))
    assert torch.equal(states["real"], exact[-1][:, 0].float())


def test_stage1_evaluation_runs_in_float32_whatever_the_runs_dtype(monkeypatch):
    """train.evaluate, whose accuracy a checkpoint records, runs no forward under autocast even where the run
    trains in bf16 (forced here on the CPU): it reads what the report reads."""
    model, splits = tiny_model_and_splits()
    monkeypatch.setitem(runtime.RUN, "dtype", torch.bfloat16)
    entered, real = [], torch.autocast

    class Recording(real):
        def __enter__(self):
            entered.append(self._enabled)
            return super().__enter__()
    monkeypatch.setattr(torch, "autocast", Recording)
    with runtime.autocast():                                          # the run's context is recorded ...
        pass
    assert entered == [True]
    train.evaluate(model, splits["test"], torch.device("cpu"))          # ... and evaluate enters none enabled
    assert not any(entered[1:]), entered


def test_only_a_cpu_copy_gets_channels_last_convolutions():
    """inference_copy lays the conv weights out channels-last on a CPU only (Apple GPUs have convolved such
    weights wrongly): a copy on another device (the meta device stands in) keeps them contiguous."""
    model, _ = tiny_model_and_splits()
    free = FREE(model, ExitConfig(exit_layers="1"))
    conv = lambda f: next(p for p in f.backbone.vit.parameters() if p.dim() == 4)
    assert conv(runtime.inference_copy(free)).is_contiguous(memory_format=torch.channels_last)
    on_meta = runtime.inference_copy(free.to("meta"))
    assert next(on_meta.parameters()).device.type == "meta"
    assert conv(on_meta).is_contiguous() and not conv(on_meta).is_contiguous(memory_format=torch.channels_last)


def test_infer_runs_where_the_machine_offers_unless_told():
    """infer.py's --device defaults to auto (cuda, then mps, then cpu), as train.py's does."""
    assert infer.InferConfig().device == "auto" == train.TrainConfig().device


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")       # each waits for the GPU


def spy_reads(monkeypatch) -> list:
    """Every read of a tensor's values back to the host made by free-min's own code (not torch's), as (what,
    file): on a GPU each one waits for all the work queued before it."""
    calls = []
    for name in READS:
        def spy(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.dirname(caller) == PROJECT:
                calls.append((_name, os.path.basename(caller)))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_the_training_steps_read_nothing_back_but_the_text_cut(monkeypatch):
    """A stage-2 step reads nothing back from the device; a stage-1 step only what model.embed reads to cut the
    text to the batch's longest question; early exit one count per exit evaluated, besides that. The losses are
    read every CHECK_EVERY steps (runtime.read_sums), not at each."""
    model, splits = tiny_model_and_splits()
    tr, ids, tcfg = splits["train"], torch.arange(16), train.TrainConfig()
    heads = train.aux_heads(model, tr, tcfg)
    opt, scaler = train.stage1_optimizer(model, heads, tcfg), torch.amp.GradScaler("cpu", enabled=False)
    batch = train.backbone_batch(model, tr, ids) | {"weight": 1.0}
    free = FREE(model, ExitConfig(exit_layers="1", label_fraction=0.5))
    opts = train.exit_optimizers(free)
    exit_batch = train.exit_batch(free, None, tr, ids, train.labelled_mask(len(tr), 0.5, 0))
    exit_batch |= {"ce_weight": 1.0, "weight": 1.0}
    calls = spy_reads(monkeypatch)
    train.backbone_step(model, heads, batch, opt, scaler, tcfg.grad_clip)
    assert calls == [("tolist", "model.py")]
    calls.clear()
    free.train()
    train.exit_step(free, exit_batch, opts, scaler)
    assert calls == []
    free.eval()
    out = free_min.early_exit_predict(free, splits["val"].batch(torch.arange(30)), "maxprob", 0.0)
    assert calls == [("tolist", "model.py"), ("__int__", "free_min.py")] and (out["exit"] == 0).all()
