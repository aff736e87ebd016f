"""Stage 1's training scenes: every epoch draws new ones (the generator is unlimited, so the model
cannot learn the training scenes by heart), in background processes while the epoch before trains,
each process building its part of the split; by-error family sampling.

Public: TrainScenes, family_weights, FAMILY_FLOOR, fresh_split, join_splits.
"""
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from data import DataConfig, Split, make_split
from util.shapes import fresh_scenes


def fresh_split(cfg: DataConfig, epoch: int, family_weights: dict | None, part: tuple[int, int],
                tokenizer: Tokenizer, answer_to_idx: dict[str, int]) -> "Split":
    """fresh_scenes' part of an epoch as a Split (what a drawing process returns)."""
    return make_split(*fresh_scenes(cfg, epoch, family_weights, part), tokenizer, answer_to_idx)


def join_splits(parts: list["Split"]) -> "Split":
    """Splits of consecutive parts of one epoch as one Split (each part's image indices moved past
    the images of the parts before it)."""
    if len(parts) == 1:
        return parts[0]
    starts = np.cumsum([0] + [len(p.images) for p in parts[:-1]]).tolist()
    width = max(p.answer_idx.shape[1] for p in parts)          # M, the most scored answers
    pad = lambda t, value: F.pad(t, (0, width - t.shape[1]), value=value)
    return Split(
        images=torch.cat([p.images for p in parts]),
        image_index=torch.cat([p.image_index + s for p, s in zip(parts, starts)]),
        tokens=torch.cat([p.tokens for p in parts]),
        text_mask=torch.cat([p.text_mask for p in parts]),
        answer_idx=torch.cat([pad(p.answer_idx, -1) for p in parts]),
        answer_score=torch.cat([pad(p.answer_score, 0.0) for p in parts]),
        records=[r | {"image_index": r["image_index"] + s} for p, s in zip(parts, starts)
                 for r in p.records],
        pixel_labels=torch.cat([p.pixel_labels for p in parts]),
        facts=torch.cat([p.facts for p in parts]),
    )


def exit_with_parent(parent: int) -> None:
    """In a drawing process: end when the process that started it, `parent`, ends (killed, or
    crashed, even before this one finished starting), instead of living on as an orphan that
    holds its output open."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


# Spend the steps where the learning is (train.py --sample-families by-error): the easy families are
# learned in a third of stage 1, and after that their questions teach little. Each later epoch's
# scenes then ask every family in proportion to its error on training questions (the floor keeps
# the learned ones from being forgotten): epoch e + 1 is drawn while epoch e trains, so its weights
# are the errors of epoch e - 1, the last epoch finished when its drawing starts. Training
# questions, not val: no choice is made on val here.
FAMILY_FLOOR = 0.05


def family_weights(per_family_accuracy: dict[str, float], families: list[str]) -> dict[str, float]:
    """Family -> sampling weight: its error rate plus FAMILY_FLOOR (1 + floor if not yet seen)."""
    return {f: 1 - per_family_accuracy.get(f, 0.0) / 100 + FAMILY_FLOOR for f in families}


class TrainScenes:
    """The train split of every epoch of stage 1 on shapes data: epoch 0's is `first`, each later
    one is fresh_scenes', drawn by `workers` background processes while the epoch before it trains
    (drawing 6,000 scenes takes seconds during which a GPU would wait), each building its part of
    the split; 0 workers: drawn here, when asked for. The epochs are the same for any number of
    workers. Call it with the epoch; close() when done. `weights` (family -> weight, or None:
    families in turn) is what the epochs not yet started are drawn with; `drawn_with` records, per
    epoch started, the weights it was drawn with."""

    def __init__(self, cfg: DataConfig, first: "Split", tokenizer: Tokenizer, answers: list[str],
                 epochs: int, workers: int = 1):
        self.cfg, self.first, self.tokenizer, self.epochs = cfg, first, tokenizer, epochs
        self.answer_to_idx = {a: i for i, a in enumerate(answers)}
        self.weights, self.drawn_with = None, {}
        self.pending = {}                   # epoch -> futures of its parts (fresh_split), in order
        # spawn: a fresh interpreter, which shares no threads or locks with the training process (it
        # imports the launching script again, so a script calling train.main needs `if __name__ ==
        # "__main__":`)
        self.pool, self.parts = None, max(1, workers)
        if workers > 0:
            self.pool = ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent,
                                            mp_context=multiprocessing.get_context("spawn"),
                                            initargs=(os.getpid(),))

    def start(self, epoch: int) -> None:
        """Begin drawing epoch `epoch`'s scenes in the background (if it is a later epoch of this
        run), one part per worker."""
        if 1 <= epoch < self.epochs and epoch not in self.pending:
            weights = self.drawn_with.setdefault(epoch, self.weights)
            self.pending[epoch] = [
                self.pool.submit(fresh_split, self.cfg, epoch, weights, (k, self.parts),
                                 self.tokenizer, self.answer_to_idx)
                for k in range(self.parts)] if self.pool else None

    def __call__(self, epoch: int) -> "Split":
        """Epoch `epoch`'s train split (waiting for its scenes only if they are not drawn yet);
        the next epoch's scenes start drawing."""
        self.start(epoch)
        self.start(epoch + 1)
        if epoch == 0:
            return self.first
        futures = self.pending.pop(epoch)
        here = lambda: fresh_split(self.cfg, epoch, self.drawn_with[epoch], (0, 1),
                                   self.tokenizer, self.answer_to_idx)
        if futures is None:
            return here()
        try:
            return join_splits([f.result() for f in futures])
        except BrokenProcessPool:                 # a drawing process died (killed, out of memory)
            print(f"note: a process drawing epoch {epoch + 1}'s scenes died; they are drawn here"
                  " instead")
            return here()

    def progress(self, epoch: int) -> dict:
        """After epoch `epoch`: what a resumed run needs to draw the next epochs as this one
        does."""
        return {"weights": self.weights, "next": self.drawn_with.get(epoch + 1)}

    def resume(self, progress: dict, epoch: int) -> None:
        """Continue from progress(epoch - 1) of an interrupted run, at epoch `epoch`."""
        self.weights, self.drawn_with[epoch] = progress["weights"], progress["next"]

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
