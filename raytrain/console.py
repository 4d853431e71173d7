"""What raytrain prints while it works: verbosity levels, per-epoch lines, progress bars."""
from __future__ import annotations

import sys
import time

# How much train and tune print: 0 only the results, 1 one line per epoch, 2 also Ray's own logs and tables.
QUIET, EPOCH_LINES, RAY_LOGS = 0, 1, 2


def epoch_line(label: str, metrics: dict, epochs: int) -> str:
    """One progress line: who, epoch, train loss, val F1 and IoU, images/s, time left for this run."""
    epoch = int(metrics.get("epoch", 0))
    seconds_left = (epochs - epoch) * (metrics.get("epoch_s") or 0.0)
    minutes, seconds = divmod(int(round(seconds_left)), 60)

    def number(key: str, digits: int = 4) -> str:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    return (
        f"{label}  epoch {epoch}/{epochs}  loss {number('train_loss')}  val_f1 {number('val_f1')}  "
        f"val_iou {number('val_iou')}  {number('images_per_s', 1)} img/s  ETA {minutes}m{seconds:02d}s"
    )


def progress_bar(label: str):
    """A one-line progress bar on stderr when it is a terminal; silence in logs and pipes."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = int(30 * done / max(total, 1))
        end = "\n" if done >= total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def progress_lines(label: str, every_s: float = 10.0):
    """A line on stderr at most every `every_s` seconds and at the end: images done/total and images/s,
    for runs long enough to be followed in a log (ray job logs) as well as on a terminal."""
    started = time.monotonic()
    last = started

    def show(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done < total and now - last < every_s:
            return
        last = now
        print(f"{label}: {done}/{total} images, {done / max(now - started, 1e-9):.1f} images/s", file=sys.stderr, flush=True)

    return show
