"""How fast stage 1's new scenes are drawn: scenes per second with 1, 2, ... drawing processes.

    python experiments/scene_rate.py [--workers 1 2] [--images 6000] [--epochs 3]

Each setting draws `--epochs` whole epochs of the default train split (`--images` scenes each, questions
tokenized and the split built, as scenes.TrainScenes hands it to the training loop) one after the other, with
nothing training meanwhile, and prints the scenes per second of the fastest epoch. Compare them with the
scenes per second stage 1 trains on (train.py's epoch time): the GPU waits on nothing while drawing is
faster. The processes start before the clock does (a run starts them once).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                                         # noqa: E402
from util import scenes                                             # noqa: E402


def rate(cfg: data.DataConfig, workers: int, epochs: int, first, tok, answers) -> float:
    """Scenes per second of the fastest of `epochs` epochs drawn by `workers` processes (0: this one)."""
    drawn = scenes.TrainScenes(cfg, first, tok, answers, epochs=epochs + 1, workers=workers)
    try:
        if drawn.pool:                                            # start the processes, off the clock
            list(drawn.pool.map(abs, range(2 * workers)))
        seconds = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            drawn.start(epoch)                                    # one part per process
            parts = drawn.pending.pop(epoch)
            split = (scenes.join_splits([f.result() for f in parts]) if parts else
                     scenes.fresh_split(cfg, epoch, None, (0, 1), tok, drawn.answer_to_idx))
            seconds.append(time.perf_counter() - start)
            assert len(split.images) == cfg.train_images
    finally:
        drawn.close()
    return cfg.train_images / min(seconds)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="numbers of drawing processes to time (0: drawn in this process)")
    p.add_argument("--images", type=int, default=data.DataConfig.train_images, help="scenes per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs drawn per setting (the fastest is reported)")
    args = p.parse_args(argv)
    cfg = data.DataConfig(train_images=args.images)
    splits, tok, answers = data.load_data(data.DataConfig(train_images=600), only=("train",))
    print(f"cores: {os.cpu_count()}; {args.images} scenes an epoch, fastest of {args.epochs} epochs")
    for workers in args.workers:
        print(f"{workers} drawing process{'es' if workers != 1 else ''}: "
              f"{rate(cfg, workers, args.epochs, splits['train'], tok, answers):,.0f} scenes/s")


if __name__ == "__main__":
    main()
