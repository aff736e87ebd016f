"""What train.py and infer.py need in order to run, and nothing a reader needs to follow the paper:
the device, the CPU threads and the precision; several processes (torchrun): each one's slice of a
batch, the gradients' mean, sums of numbers; a stage-1 epoch's running scores; an inference copy of
a model (BatchNorm folded into the convolutions); a frozen encoder's token cache; stage 1's clock.

Public: RUN, WORLD, setup, use_device, autocast, grad_scaler, to_device, synchronize, on_gpu,
is_main, shard, average_gradients, all_sum, read_sums, progress_bar, inference_copy,
pick_device, pick_threads, pick_dtype, device_of.
"""
import copy
import math
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from util.config import ConfigError


# --------------------------------------------------------------------------------------------------
# Device, threads and precision
# --------------------------------------------------------------------------------------------------
# The run's device and autocast dtype, set once by setup(); the defaults are a CPU in float32.
RUN = {"device": torch.device("cpu"), "dtype": torch.float32}


def pick_device(choice: str) -> torch.device:
    """--device: auto (cuda, then mps, then cpu) or the one named; ConfigError if torch does not
    see it."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if choice == "auto":
        choice = "cuda" if cuda else ("mps" if mps else "cpu")
    if (choice == "cuda" and not cuda) or (choice == "mps" and not mps):
        raise ConfigError(f"--device {choice}: torch sees no {choice.upper()} device here "
                          f"(use --device auto or cpu)")
    return torch.device(choice)


def pick_threads(requested: int) -> tuple[int, str]:
    """--threads: the number asked for; for 0, what OMP_NUM_THREADS says if it is set, else the
    cores that other work leaves free (the cores this process may use minus the 1-minute load
    average, rounded), at least 1. Why: small models on a CPU with every core already busy run
    several times slower with a thread per core than with fewer (RESULTS.md).
    Returns the number and the reason, to print."""
    if requested > 0:
        return requested, "--threads"
    if "OMP_NUM_THREADS" in os.environ:          # set by the user, or by torchrun for its processes
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, round(cores - load)))
    return free, (f"{cores} cores, {load:.1f} of them busy with other work (load average); "
                  f"--threads N to choose")


def pick_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype and why: mixed precision on CUDA (bf16 where supported, else fp16 with
    loss scaling), float32 elsewhere (on CPUs, bf16 autocast was slower than float32,
    RESULTS.md)."""
    # including_emulation=False: a GPU without bf16 units (T4, V100, RTX 20xx) would emulate it
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16, ("bf16 autocast: this GPU computes in bfloat16 "
                                "(no loss scaling needed)")
    if device.type == "cuda":
        return torch.float16, "fp16 autocast with a grad scaler: this GPU has no bfloat16"
    return torch.float32, (f"float32: mixed precision is used on CUDA only, and this is "
                           f"{device.type}")


def setup(device_choice: str, threads: int) -> str:
    """Join the processes (under torchrun), set the threads, the device and the dtype (RUN);
    returns the line that says what was chosen and why."""
    init_distributed(device_choice)
    threads, why_threads = pick_threads(threads)
    torch.set_num_threads(threads)
    why = use_device(device_choice)
    line = f"device: {RUN['device']} ({why}); torch threads: {threads} ({why_threads})"
    if WORLD["size"] > 1:
        line += f"; {WORLD['size']} processes (torchrun), each on its slice of every batch"
    return line


def use_device(device_choice: str) -> str:
    """Set RUN's device (--device) and its autocast dtype; returns why that dtype."""
    RUN["device"] = pick_device(device_choice)
    RUN["dtype"], why = pick_dtype(RUN["device"])
    return why


def autocast():
    """The forward passes' precision context (a no-op in float32)."""
    device, dtype = RUN["device"], RUN["dtype"]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def grad_scaler() -> torch.amp.GradScaler:
    """fp16's loss scaling (a no-op in any other dtype)."""
    return torch.amp.GradScaler(RUN["device"].type, enabled=RUN["dtype"] == torch.float16)


def load_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """A checkpoint's grad-scaler state into `scaler`, across dtypes: a run saved in float32 or bf16
    (a disabled scaler saves {}) continues in fp16 from a fresh scale (the scaler finds its level
    in a few steps); an fp16 run continued in another dtype needs none."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled():
        print("note: the checkpoint was written without fp16 loss scaling; it starts afresh here")


def device_of(model: nn.Module) -> torch.device:
    """The device a model is on: what a function given a model (infer.py, the report) computes on.
    The run's own device, where train.py places its models, is RUN['device'], set once by setup()."""
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch of model inputs to `device` (absent inputs stay None). The copies are
    synchronous: a batch is made fresh in pageable memory, from which an asynchronous copy buys
    nothing on CUDA and, on Apple GPUs, can read memory freed before the copy runs
    (pytorch/pytorch#189690)."""
    return {k: None if v is None else v.to(device) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU calls return before they finish): a timer must see
    it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def on_gpu(params) -> bool:
    """Whether AdamW may use its fused CUDA kernel: one launch for all parameters instead of
    several."""
    return all(p.is_cuda for p in params)


# --------------------------------------------------------------------------------------------------
# Several processes (torchrun --standalone --nproc_per_node=N train.py ...): data parallel
# --------------------------------------------------------------------------------------------------
# Every process holds the whole model and takes its slice of each global batch (--batch-size stays
# the global batch, so the schedule is the one of a single process); after every backward the
# gradients are averaged over the processes with one all_reduce, and every process takes the same
# step. Only process 0 evaluates, prints, logs and writes files; the others wait for it at the end
# of each epoch.
# NOTE: DistributedDataParallel's wrapper does the same averaging with bucketed all-reduces that
# overlap the backward; it is not used because stage 2 alternates two optimisers (D's, then the
# exits') over two parameter sets, each step's backward reaching only one of them, which its reducer
# is not made for. Each process's loss is scaled by its share of the global batch (shard's weight).
WORLD = {"rank": 0, "size": 1}


def init_distributed(device_choice: str) -> None:
    """Under torchrun (RANK in the environment): join the process group, NCCL on CUDA and gloo on
    CPU, one GPU per process; silence the standard output of every process but process 0."""
    if "RANK" not in os.environ:
        return
    cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda")
    if cuda:                                  # before the group: NCCL binds each process to its GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    WORLD.update(rank=dist.get_rank(), size=dist.get_world_size())
    if WORLD["rank"] > 0:
        sys.stdout = open(os.devnull, "w")


def close_distributed() -> None:
    if WORLD["size"] > 1:
        dist.destroy_process_group()


def is_main() -> bool:
    return WORLD["rank"] == 0


def shard(ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's slice of a global batch, and its weight: the one that makes the average of the
    processes' mean losses, each times its weight, the mean over the global batch (1 alone)."""
    local = ids.tensor_split(WORLD["size"])[WORLD["rank"]]
    return local, len(local) * WORLD["size"] / len(ids)


def average_gradients(params: list) -> None:
    """The gradients' mean over the processes (one all_reduce of them all, flattened); none in
    one."""
    if WORLD["size"] == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.div_(WORLD["size"]).split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def collective_device(backend: str) -> torch.device:
    """Where a tensor must live for the process group's collectives: NCCL serves CUDA tensors
    only (this process's GPU), gloo serves CPU tensors."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sums over the processes of a few numbers (the values themselves in one process)."""
    if WORLD["size"] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(dist.get_backend()))
    dist.all_reduce(t)
    return t.tolist()


# The training loops read nothing back from the device at a step: on a GPU every read waits for all
# the work queued before it, and the CPU then has nothing queued ahead. The losses are summed where
# they are computed and read every CHECK_EVERY steps (and at the end of an epoch, before its
# checkpoint): to show them, and to stop on a non-finite one.
CHECK_EVERY = 50


def read_sums(sums: dict) -> dict[str, float]:
    """Running sums of losses (name -> tensor), read back in one copy; FloatingPointError if one is
    not finite."""
    keys = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]).tolist()
    read = dict(zip(keys, values))
    if not all(map(math.isfinite, values)):
        raise FloatingPointError(f"non-finite loss ({read})")
    return read


def wait_for_main() -> None:
    """The other processes wait here while process 0 evaluates and writes."""
    if WORLD["size"] > 1:
        dist.barrier()


def progress_bar(iterable, desc: str):
    """A progress bar (process 0 only)."""
    disable = None if is_main() else True                   # None: off where output is no terminal
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=disable)


class EpochScores:
    """A stage-1 epoch's running loss and score, overall and per family (this process's
    questions). add() keeps them on the device; read() scores what was added since the last
    read and says how the epoch goes (every CHECK_EVERY steps)."""

    def __init__(self):
        self.sums = {"loss": 0.0, "objective": 0.0}       # on the device: answer loss x batch, L
        self.loss = self.hits = self.seen = 0.0            # read: answer loss x batch, scores, n
        self.pending = []                               # (ids, predicted answers on the device)
        self.by_family = defaultdict(lambda: [0.0, 0.0])              # family -> [sum of scores, n]

    def add(self, ids: torch.Tensor, loss: torch.Tensor, total: torch.Tensor,
            logits: torch.Tensor) -> None:
        self.sums = {"loss": self.sums["loss"] + loss * len(ids),
                     "objective": self.sums["objective"] + total}
        self.pending.append((ids, logits.argmax(dim=1)))

    def read(self, split) -> dict:
        """The progress bar's running loss and accuracy, after scoring the pending batches (one
        copy from the device); FloatingPointError if the objective is not finite."""
        self.loss = read_sums(self.sums)["loss"]
        ids = torch.cat([i for i, _ in self.pending])
        scores = split.score(ids, torch.cat([p for _, p in self.pending]).cpu())
        self.pending, self.seen = [], self.seen + len(ids)
        self.hits += scores.sum().item()
        for i, s in zip(ids.tolist(), scores.tolist()):
            family = self.by_family[split.records[i]["family"]]
            family[0], family[1] = family[0] + s, family[1] + 1
        return {"loss": f"{self.loss / self.seen:.3f}",
                "acc": f"{100 * self.hits / self.seen:.1f}%"}

    def family_accuracy(self, families: list[str]) -> dict[str, float]:
        """Family -> accuracy (%) over all processes (each sums the same list of `families`)."""
        totals = all_sum([x for f in families for x in self.by_family[f]])    # [sum, n] per family
        return {f: 100 * totals[2 * i] / totals[2 * i + 1]
                for i, f in enumerate(families) if totals[2 * i + 1]}


# --------------------------------------------------------------------------------------------------
# An inference copy, a frozen encoder's tokens, and stage 1's clock
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that follows a Conv2d (the conv stem's) into that convolution, in
    place. In eval mode BN(conv(x)) = g (w * x + c - mean) / sqrt(var + eps) + b = w' * x + c',
    with w' = w g / sqrt(var + eps) and c' = b + (c - mean) g / sqrt(var + eps): one operation,
    not two."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                seq[i], seq[i + 1] = folded_conv(conv, bn), nn.Identity()
    return model


def folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """The convolution w' * x + c' that computes bn(conv(x)) in eval mode (see fold_batchnorm)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)                       # (C_out,)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True).to(conv.weight.device)
    fused.weight.copy_(conv.weight * scale[:, None, None, None])               # (C_out, C_in, k, k)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


def inference_copy(free):
    """A copy of `free` for evaluation and timing: eval mode, the conv stem's BatchNorms folded,
    and on a CPU the convolution weights channels-last (the layout oneDNN convolves fastest in;
    kept to the CPU, since Apple GPUs have convolved such weights wrongly). Same answers up to
    float rounding; the full model and early exit both run on it, so the image encoder, a cost no
    exit can skip, is trimmed for both alike."""
    copied = copy.deepcopy(free).eval()
    fold_batchnorm(copied.backbone)
    if device_of(copied).type == "cpu":
        # only 4-D tensors (conv weights) change
        copied.backbone.to(memory_format=torch.channels_last)
    return copied


@torch.no_grad()
def cache_patches(model, splits: dict) -> None:
    """A frozen encoder's tokens, computed once per image (fp16, in memory) and served by every
    split in place of its images (Split.patches), so that no epoch runs the encoder again."""
    model.eval()
    for name, split in splits.items():
        chunks = [model.patch_features(imgs.contiguous().float().div(255).to(RUN["device"]))
                  .half().cpu()                                                     # (b, P, Dv)
                  for imgs in progress_bar(split.images.split(64), f"{name} image tokens")]
        split.patches = torch.cat(chunks)                                           # (n_img, P, Dv)


class StepClock:
    """Says once, early, what the rest of stage 1 will cost here: steps 6-25 are timed (the first
    ones warm up allocators and caches and would overstate it)."""

    def __init__(self, steps_left: int, device: torch.device):
        self.start, self.steps_left, self.device, self.n = time.time(), steps_left, device, 0

    def elapsed(self) -> float:
        return time.time() - self.start

    def tick(self) -> None:
        self.n += 1
        if self.n in (5, 25):                   # the steps queued so far done (the clock's 2 syncs)
            synchronize(self.device)
        if self.n == 5:
            self.t5 = time.perf_counter()
        if self.n == 25 and self.steps_left > 50:
            per_step = (time.perf_counter() - self.t5) / 20
            minutes = per_step * (self.steps_left - 25) / 60
            tqdm.write(f"stage 1 will take about {minutes:.1f} min more here ({per_step:.3f} s a "
                       f"step on {self.device}, {torch.get_num_threads()} threads; evaluations "
                       f"not included)")
