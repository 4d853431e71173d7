"""What raytrain prints while it works: verbosity levels, per-epoch lines, progress displays."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

from tqdm import tqdm

# How much train and tune print: 0 only the results, 1 one line per epoch, 2 also Ray's own logs and tables.
QUIET, EPOCH_LINES, RAY_LOGS = 0, 1, 2
PROGRESS_EVERY_S = 10.0  # between progress lines where stderr is not a terminal


def epoch_line(label: str, metrics: dict, epochs: int) -> str:
    """One progress line: who, epoch, train loss, val F1 and IoU, images/s, time left for this run."""
    epoch = int(metrics.get("epoch", 0))
    seconds_left = (epochs - epoch) * (metrics.get("epoch_s") or 0.0)

    def number(key: str, digits: int = 4) -> str:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    return (
        f"{label}  epoch {epoch}/{epochs}  loss {number('train_loss')}  val_f1 {number('val_f1')}  "
        f"val_iou {number('val_iou')}  {number('images_per_s', 1)} img/s  ETA {duration(seconds_left)}"
    )


def progress(label: str, unit: str = "images", every_s: float | None = None, *, leave: bool = True
             ) -> Callable[[int, int], None]:
    """How a long step shows how far it is: call the result with (done, total), as often as once a
    batch. On a terminal, a tqdm bar on stderr (leave=False: cleared once finished); otherwise (CI
    logs, `ray job logs`) a line on stderr every `every_s` seconds (RAYTRAIN_PROGRESS_EVERY_S, default
    10) until it is done, which the command's own last line then says. Both show the rate and the
    time left."""
    if sys.stderr.isatty():
        return _Bar(label, unit, leave)
    if every_s is None:
        every_s = float(os.environ.get("RAYTRAIN_PROGRESS_EVERY_S", PROGRESS_EVERY_S))
    return _Lines(label, unit, every_s)


def say(line: str) -> None:
    """A line on stdout that a progress bar on the same terminal does not garble."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class _Bar:
    def __init__(self, label: str, unit: str, leave: bool):
        self.bar = tqdm(desc=label, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True, leave=leave)

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


class _Lines:
    def __init__(self, label: str, unit: str, every_s: float):
        self.label, self.unit, self.every_s = label, unit, every_s
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        left = duration((total - done) / rate) if rate > 0 else "-"
        print(f"{self.label}: {done}/{total} {self.unit}, {rate:.1f} {self.unit}/s, {left} left", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"
