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


def _verbosity(args) -> int:
    from raytrain import launch

    return launch.QUIET if args.quiet else launch.RAY_LOGS if args.verbose else launch.EPOCH_LINES


def _train(args) -> None:
    config = _load(args)  # before importing Ray and torch: a bad config fails in a blink
    from raytrain import launch

    result = launch.train(config, num_cpus=args.num_cpus, verbosity=_verbosity(args))
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
    config = _load(args)  # before importing Ray and torch: a bad config fails in a blink
    from raytrain import launch
    from raytrain.api import best_checkpoint

    grid = launch.tune(config, resume=args.resume, num_cpus=args.num_cpus, verbosity=_verbosity(args))
    if grid.errors and len(grid.errors) == len(grid):
        raise grid.errors[0]  # every trial failed: main() prints the first one's cause in one line
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
    grid = launch.tune(config, num_cpus=args.num_cpus, verbosity=_verbosity(args))
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


def _report(args) -> None:
    from raytrain.report import write_report

    print(write_report(args.experiment, args.out, args.metric, args.mode))


def _evaluate(args) -> None:
    from raytrain.predict import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, device=args.device)
    if args.json:
        print(json.dumps(metrics))
        return
    for key, value in metrics.items():
        print(f"{key:<16} {value:.4f}" if isinstance(value, float) else f"{key:<16} {value}")


def _progress_bar(label: str):
    """A one-line progress bar on stderr when it is a terminal; silence in logs and pipes."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = int(30 * done / max(total, 1))
        end = "\n" if done >= total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def _predict(args) -> None:
    from raytrain.predict import predict_files

    written = predict_files(args.checkpoint, args.inputs, args.out, device=args.device, progress=_progress_bar("predict"))
    print(f"wrote {len(written) // 2} masks and overlays to {args.out}")


def _export(args) -> None:
    from raytrain.predict import export_model

    default = "model.torchscript.pt" if args.format == "torchscript" else "model.pt2"
    print(export_model(args.checkpoint, args.out or Path(args.checkpoint) / default, args.format))


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line like every other raytrain error, instead of argparse's usage block; subcommands inherit it.
        self.exit(2, f"raytrain: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="raytrain", description="Road segmentation on Ray: train, search, predict.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_output(sub):
        loudness = sub.add_mutually_exclusive_group()
        loudness.add_argument("-q", "--quiet", action="store_true", help="print only the results")
        loudness.add_argument("-v", "--verbose", action="store_true", help="also print Ray's own logs and tables")
        return sub

    def with_config(sub):
        sub.add_argument("config", help="YAML config (see tune_configs/)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
        sub.add_argument("--num-cpus", type=_positive_int, help="logical CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
        return with_output(sub)

    quick = commands.add_parser("quickstart", help="synthetic data -> shards -> a small search, end to end")
    quick.add_argument("--data-dir", default=str(_cache_dir()), help="where the synthetic data goes (default: %(default)s)")
    quick.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    quick.add_argument("--num-cpus", type=_positive_int)
    with_output(quick).set_defaults(func=_quickstart)

    data = commands.add_parser("data", help="make and shard datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic road scenes in the KITTI road layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--count", type=_positive_int, default=200)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", default="384x128", help="WIDTHxHEIGHT")
    synth.set_defaults(func=_synth)
    shard = data.add_parser("shard", help="validate a dataset and write Parquet shards with a manifest")
    shard.add_argument("src", help="dataset folder: a local path or a URI (file://, s3://, gs://, ...)")
    shard.add_argument("--format", required=True, choices=["kitti", "camvid", "folder"])
    shard.add_argument(
        "--classes", type=lambda text: [name.strip() for name in text.split(",") if name.strip()], default=None,
        help="comma-separated target classes: one (e.g. road; kitti: road or lane) for a binary mask; default all classes",
    )
    shard.add_argument("--out", required=True, help="output folder, local or a URI; written atomically")
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

    report = commands.add_parser("report", help="PNG plots, the best model's overlays and index.html of an experiment")
    report.add_argument("experiment")
    report.add_argument("--out", required=True, help="folder for the PNGs and index.html")
    report.add_argument("--metric", default="val_iou")
    report.add_argument("--mode", default="max", choices=["min", "max"])
    report.set_defaults(func=_report)

    evaluate = commands.add_parser("evaluate", help="every metric of a checkpoint on a sharded dataset")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("data", help="a sharded dataset (the folder or URI with manifest.json)")
    evaluate.add_argument("--split", default="val", choices=["train", "val"])
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="mask PNGs and red overlays at each image's own size")
    predict.add_argument("checkpoint")
    predict.add_argument("inputs", nargs="+", help="image files or folders of images")
    predict.add_argument("--out", required=True)
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(func=_predict)

    export = commands.add_parser("export", help="a checkpoint as a TorchScript file")
    export.add_argument("checkpoint")
    export.add_argument("--format", default="torchscript", choices=["torchscript", "torch.export"])
    export.add_argument("--out", help="default: CHECKPOINT/model.torchscript.pt (or model.pt2)")
    export.set_defaults(func=_export)
    return parser


def _user_error_inside(err: BaseException) -> RaytrainError | None:
    """The RaytrainError behind `err`: itself, or the one a Ray Train worker or Tune trial raised,
    which reaches the driver wrapped (TrainingFailedError's worker_failures, RayTaskError's cause)."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # RayTaskError.cause; Ray Train's UserExceptionWithTraceback keeps the worker's exception in _base_exc.
        wrapped = getattr(current, "cause", None) or getattr(current, "_base_exc", None)
        if isinstance(current, RaytrainError) and wrapped is None:
            return current
        pending += [wrapped, getattr(current, "controller_failure", None), *getattr(current, "worker_failures", {}).values()]
        pending += [current.__cause__, current.__context__]
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        # Read when Ray is imported: no start-up chatter, Ray Data INFO lines or progress bars on stderr.
        for name, value in {"RAY_LOGGER_LEVEL": "error", "RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
            os.environ.setdefault(name, value)
    try:
        args.func(args)
    except Exception as err:
        user_error = _user_error_inside(err)
        if user_error is None:
            raise  # a bug, not the user's input: keep the traceback
        print(f"raytrain: error: {user_error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raytrain: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
