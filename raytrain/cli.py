"""`raytrain` on the command line: a thin shell over the Python API.

Errors in the user's input print as one line, `raytrain: error: ...`, with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from raytrain.errors import RaytrainError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "tune_configs"
# The quickstart's synthetic set: small enough to make, shard and learn on 2 CPU cores in minutes.
QUICKSTART_COUNT, QUICKSTART_SIZE, QUICKSTART_SEED = 400, (192, 64), 0


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raytrain"


def _synth(args) -> None:
    from raytrain.config import parse_size
    from raytrain.data.synth import write_synthetic_kitti

    try:
        size = parse_size(args.size)
    except ValueError as err:
        raise RaytrainError(f"--size: {err}") from None
    if args.count < 1:
        raise RaytrainError(f"--count must be at least 1, got {args.count}")
    started = time.perf_counter()
    try:
        out = write_synthetic_kitti(args.out, args.count, seed=args.seed, size=size)
    except FileExistsError:
        raise RaytrainError(f"{args.out}: already exists and is not empty") from None
    print(f"wrote {args.count} scenes ({size[0]}x{size[1]}) to {out} in {time.perf_counter() - started:.1f}s")


def _shard(args) -> None:
    from raytrain.data.shards import write_shards

    def on_skip(message: str) -> None:
        print(f"skipped: {message}", file=sys.stderr)

    manifest = write_shards(
        args.src, args.format, args.out, val_fraction=args.val_fraction, seed=args.seed,
        skip_bad=args.skip_bad, classes=args.classes, on_skip=on_skip,
    )
    counts = manifest["num_samples"]
    print(f"wrote {counts['train']} train and {counts['val']} val samples to {args.out}")


def _load(args):
    from raytrain.config import load_config

    return load_config(args.config, args.set)


def _train(args) -> None:
    from raytrain import launch

    config = _load(args)
    launch.ensure_ray(args.num_cpus)
    result = launch.train(config)
    if result.error:
        raise RaytrainError(f"training failed: {result.error}")
    print(json.dumps({k: v for k, v in result.metrics.items() if k.startswith(("val_", "train_", "epoch"))}, indent=2))
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")


def print_trials(grid, config) -> None:
    """One row per trial, best first: searched values, val_f1, val_iou, epochs run."""
    metric, mode = config.search.metric, config.search.mode
    rows = []
    for result in grid:
        if not result.metrics:
            continue
        history = result.metrics_dataframe
        best = history.loc[history[metric].idxmax() if mode == "max" else history[metric].idxmin()]
        params = result.config.get("search", {})
        rows.append((best[metric], params, best.get("val_f1"), best.get("val_iou"), int(history["epoch"].max())))
    rows.sort(key=lambda row: row[0], reverse=(mode == "max"))
    keys = list(config.search.space)
    header = ["#", *keys, "val_f1", "val_iou", "epochs"]
    table = [
        [str(i), *(_short(params.get(k)) for k in keys), f"{f1:.4f}", f"{iou:.4f}", str(epochs)]
        for i, (_, params, f1, iou, epochs) in enumerate(rows, start=1)
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *table)]
    for line in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _tune(args) -> None:
    from raytrain import launch
    from raytrain.api import best_checkpoint

    config = _load(args)
    launch.ensure_ray(args.num_cpus)
    grid = launch.tune(config, resume=args.resume)
    print_trials(grid, config)
    best = best_checkpoint(f"{launch.storage_root(config)}/{config.name}", config.search.metric, config.search.mode)
    print(f"best {config.search.metric}: {best.metrics[config.search.metric]:.4f}")
    print(f"best checkpoint: {best.path}")


def _quickstart(args) -> None:
    from raytrain import launch
    from raytrain.api import best_checkpoint
    from raytrain.config import load_config
    from raytrain.data.shards import MANIFEST, write_shards
    from raytrain.data.synth import write_synthetic_kitti

    started = time.perf_counter()
    data_dir = Path(args.data_dir).expanduser()
    raw, shards = data_dir / "synthetic", data_dir / "synthetic_shards"
    if not (shards / MANIFEST).is_file():
        if not raw.is_dir():
            print(f"making {QUICKSTART_COUNT} synthetic road scenes in {raw}")
            write_synthetic_kitti(raw, QUICKSTART_COUNT, seed=QUICKSTART_SEED, size=QUICKSTART_SIZE)
        write_shards(raw, "kitti", shards)
    config = load_config(REPO_CONFIGS / "quickstart.yaml", [f"data.path={shards}", *args.set])
    search = config.search
    concurrent = search.max_concurrent_trials or 1
    launch.ensure_ray(args.num_cpus or max(os.cpu_count() or 1, concurrent * config.train.num_workers + 2))
    grid = launch.tune(config)
    print_trials(grid, config)
    best = best_checkpoint(f"{launch.storage_root(config)}/{config.name}", search.metric, search.mode)
    print(f"best {search.metric}: {best.metrics[search.metric]:.4f} (val_f1 {best.metrics['val_f1']:.4f})")
    print(f"best checkpoint: {best.path}")
    print(f"quickstart took {time.perf_counter() - started:.0f}s")


def _best(args) -> None:
    from raytrain.api import best_checkpoint

    best = best_checkpoint(args.experiment, args.metric, args.mode)
    if args.json:
        print(json.dumps({"path": str(best.path), "metrics": best.metrics, "config": best.config.model_dump(mode="json")}))
    else:
        print(best.path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrain", description="Road segmentation on Ray: train, search, predict.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub):
        sub.add_argument("config", help="YAML config (see tune_configs/)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
        sub.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
        return sub

    quick = commands.add_parser("quickstart", help="synthetic data -> shards -> a small search, end to end")
    quick.add_argument("--data-dir", default=str(_cache_dir()), help="where the synthetic data goes (default: %(default)s)")
    quick.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    quick.add_argument("--num-cpus", type=int)
    quick.set_defaults(func=_quickstart)

    data = commands.add_parser("data", help="make and shard datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic road scenes in the KITTI road layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--count", type=int, default=200)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default="384x128", help="WIDTHxHEIGHT")
    synth.set_defaults(func=_synth)
    shard = data.add_parser("shard", help="validate a dataset and write Parquet shards with a manifest")
    shard.add_argument("src")
    shard.add_argument("--format", required=True, choices=["kitti", "camvid", "folder"])
    shard.add_argument(
        "--classes", type=lambda text: [name.strip() for name in text.split(",") if name.strip()], default=None,
        help="comma-separated target classes: one (e.g. road) for a binary mask; default all classes of the format",
    )
    shard.add_argument("--out", required=True)
    shard.add_argument("--val-fraction", type=float, default=0.2)
    shard.add_argument("--seed", type=int, default=0)
    shard.add_argument("--skip-bad", action="store_true", help="skip bad samples (listed) instead of stopping")
    shard.set_defaults(func=_shard)

    with_config(commands.add_parser("train", help="one DDP training run")).set_defaults(func=_train)
    tune = with_config(commands.add_parser("tune", help="a hyperparameter search"))
    tune.add_argument("--resume", action="store_true", help="continue an interrupted search")
    tune.set_defaults(func=_tune)

    best = commands.add_parser("best", help="the best checkpoint of an experiment")
    best.add_argument("experiment")
    best.add_argument("--metric", default="val_iou")
    best.add_argument("--mode", default="max", choices=["min", "max"])
    best.add_argument("--json", action="store_true")
    best.set_defaults(func=_best)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RaytrainError as err:
        print(f"raytrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raytrain: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
