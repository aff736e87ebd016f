"""Both stages under torchrun (two processes, gloo on the CPU) against one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (--scene-workers 0: each epoch's scenes drawn in the test's own process, not a second interpreter's;
# test_devices.py covers the drawing processes)
MICRO = ["--preset", "tiny", "--train-images", "40", "--val-images", "8", "--test-images", "8", "--threads", "1",
         "--batch-size", "16", "--epochs", "2", "--scene-workers", "0"]
# a launcher that stops after the first checkpoint is written, as an interrupted run would (the main guard, as
# in train.py: the process that draws the next scenes imports the launching script again)
CRASH_AFTER_FIRST_SAVE = """import sys, train
from util import checkpoints
real = checkpoints.save_atomic
def save_then_stop(path, state):
    real(path, state)
    raise SystemExit("stopped after the first checkpoint")
if __name__ == "__main__":
    checkpoints.save_atomic = save_then_stop
    train.main(sys.argv[1:])
"""


def torchrun(script: str, *args: str, expect_ok: bool = True) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-2000:] + proc.stderr[-3000:]


def log(folder, key: str) -> list[dict]:
    return [r for r in map(json.loads, open(folder / "log.jsonl")) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1 in one process and under torchrun (2 processes, the same global batch of 16)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    train.main(MICRO + ["--stage", "backbone", "--out", str(tmp / "one")])
    torchrun("train.py", *MICRO, "--stage", "backbone", "--out", str(tmp / "two"))
    return tmp


def test_stage1_under_torchrun_follows_the_single_process_run(runs):
    """The same train loss after each epoch as one process, to 0.1 % (the conv stem's BatchNorm normalises each
    process's half batch with its own statistics on the CPU); one checkpoint, one log, written once."""
    one, two = log(runs / "one", "train_loss"), log(runs / "two", "train_loss")
    assert [r["epoch"] for r in two] == [1, 2] and [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert sorted(os.listdir(runs / "two")) == ["ckpt.pt", "log.jsonl"]
    a, b = (torch.load(runs / name / "ckpt.pt", weights_only=False)["model"] for name in ("one", "two"))
    gap = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert max(v for k, v in gap.items() if "running_" not in k) < 0.02                  # the weights
    assert max(v for k, v in gap.items() if "running_" in k) < 0.1     # process 0's BatchNorm statistics


def test_a_torchrun_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Stopped after its first epoch under torchrun, a run continues in one process with --resume, and ends
    where an uninterrupted run ends (to 0.1 %). (A checkpoint of one process read under torchrun: the stage-2
    test below. A last global batch smaller than the processes, left out in both stages: the dry run of
    experiments/gpu_check.sh, tests/test_experiments.py.)"""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_AFTER_FIRST_SAVE)
    torchrun(str(script), *MICRO, "--stage", "backbone", "--out", str(tmp_path / "a"), expect_ok=False)
    assert [r["epoch"] for r in log(tmp_path / "a", "train_loss")] == [1]
    train.main(MICRO + ["--stage", "backbone", "--out", str(tmp_path / "a"), "--resume"])
    final = log(runs / "one", "train_loss")[-1]["train_loss"]
    assert [r["epoch"] for r in log(tmp_path / "a", "train_loss")] == [1, 2]
    assert log(tmp_path / "a", "train_loss")[-1]["train_loss"] == pytest.approx(final, rel=1e-3)


def test_stage2_under_torchrun_keeps_the_backbone_and_matches_one_process(runs, tmp_path):
    """Stage 2 under torchrun, with so few labels (1 %) that many half-batches hold none, and an odd global
    batch (15: halves of 8 and 7): the backbone bit-identical, the same statistics logged as by one process
    (every key, each weighted by its process's share of the batch), and every exit within a point of the
    single-process exits on test."""
    args = MICRO + ["--stage", "exits", "--backbone", str(runs / "one" / "ckpt.pt"), "--exit-epochs", "2", "--no-final-eval",
                    "--label-fraction", "0.01", "--batch-size", "15"]
    train.main(args + ["--out", str(tmp_path / "one")])
    torchrun("train.py", *args, "--out", str(tmp_path / "two"))
    backbone = torch.load(runs / "one" / "ckpt.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(backbone[k], two["model"][k]) for k in backbone)
    a, b = (log(tmp_path / name, "test_exits")[-1] for name in ("one", "two"))
    assert all(abs(x["accuracy"] - y["accuracy"]) <= 1.0 for x, y in zip(a["test_exits"], b["test_exits"]))
    assert len(log(tmp_path / "two", "val_exits")) == 2
    one, two = (log(tmp_path / name, "val_exits")[0] for name in ("one", "two"))
    assert set(one) == set(two) and {"adv", "kd", "ce", "d_loss"} <= set(one)
    for key in ("adv", "kd", "ce", "g_loss", "d_loss", "d_real_acc", "d_fake_acc"):    # to float32's rounding
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
