"""`raytrain` on the command line: a thin shell over the Python API, built from it. Its choices are
the API's constants, its defaults the API functions' defaults, and its argument types the rules
the API enforces too (errors.Rule).

Errors in the user's input print as one line, `raytrain: error: ...`, with exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shlex
import signal
import sys
import threading
import time
import warnings

from raytrain import api
from raytrain.config import parse_size
from raytrain.console import EPOCH_LINES, QUIET, RAY_LOGS, progress
from raytrain.errors import FRACTION, NON_NEGATIVE, PORT, POSITIVE, POSITIVE_NUMBER, RaytrainError, Rule, one_line
from raytrain.storage.paths import location_of


def _synth(args) -> None:
    try:
        size = parse_size(args.size)
    except ValueError as err:
        raise RaytrainError(f"--size: {err}") from None
    started = time.perf_counter()
    with _notes():  # leftovers of interrupted runs: removed, or where they are
        out = api.synth(args.out, args.count, seed=args.seed, size=size)
    print(f"wrote {args.count} scenes ({size[0]}x{size[1]}) to {out} in {time.perf_counter() - started:.1f}s")


def _shard(args) -> None:
    def on_skip(message: str) -> None:
        print(f"skipped: {one_line(message)}", file=sys.stderr)

    with _notes():  # leftovers of interrupted runs: removed, or where they are
        manifest = api.shard(args.src, args.format, args.out, classes=args.classes, val_fraction=args.val_fraction,
                             seed=args.seed, skip_bad=args.skip_bad, on_skip=on_skip,
                             group_by=args.group_by, val_groups=args.val_groups, rows_per_shard=args.rows_per_shard,
                             progress=progress("data shard", "samples"))
    counts = manifest["num_samples"]
    print(f"wrote {counts['train']} train and {counts['val']} val samples to {args.out}")
    for split, groups in manifest.get("groups", {}).items():
        print(f"{split} groups: {', '.join(f'{name} ({count})' for name, count in groups.items())}")


def _verbosity(args) -> int:
    return QUIET if args.quiet else RAY_LOGS if args.verbose else EPOCH_LINES


def _launch(args, kind: str):
    run = api.train if kind == "train" else api.tune
    result = run(args.config, args.set, resume=args.resume, dry_run=args.dry_run, num_cpus=args.num_cpus,
                 verbosity=_verbosity(args))
    if args.dry_run:
        _print_plan(result)
    return result


def _print_plan(plan: dict) -> None:
    print("dry run: nothing started")
    for key, value in plan.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        print(f"{key + ':':<22} {value}")


def _train(args) -> None:
    config = None if args.dry_run else api.resolved_config(args.config, args.set, kind="train", resume=args.resume)
    result = _launch(args, "train")
    if args.dry_run:
        return
    print(json.dumps({k: v for k, v in (result.metrics or {}).items() if k.startswith(("val_", "train_", "epoch"))}, indent=2))
    checkpoint = location_of(result.checkpoint) if result.checkpoint else None
    experiment = location_of(result)
    print(f"checkpoint: {checkpoint}")
    print(f"experiment: {experiment}")
    if checkpoint:
        _print_next_steps(checkpoint, experiment, config.data.path)


def _tune(args) -> None:
    # The config the search runs with (a resumed one's own): what the table ranks by.
    search = None if args.dry_run else api.resolved_config(args.config, args.set, kind="tune", resume=args.resume).search
    grid = _launch(args, "tune")
    if not args.dry_run:
        experiment = location_of(grid)
        best = _print_search(experiment, search)
        _print_next_steps(best.path, experiment, best.config.data.path)


def _print_search(experiment: str, search):
    """The trials ranked by the search's rule, then the best one's score and the checkpoint that stands for it."""
    from raytrain.reporting import trials_table
    from raytrain.selection import SelectionRule, select_best

    rule = SelectionRule.of(search)
    print(trials_table(experiment, rule))
    with _notes():  # a damaged or unkept checkpoint passed over
        chosen = select_best(experiment, rule)
    best = chosen.checkpoint
    print(f"best {rule.score_name}: {chosen.score:.4f} ({chosen.trial.name}, epoch {best.metrics.get('epoch', '?')}: "
          f"val_f1 {best.metrics.get('val_f1', float('nan')):.4f})")
    print(f"best checkpoint: {best.path}")
    print(f"experiment: {experiment}")
    return best


def _print_next_steps(checkpoint, experiment, data) -> None:
    """The commands that use what a run made, with its paths: the end of train, tune and quickstart."""
    checkpoint, experiment, data = (shlex.quote(str(path)) for path in (checkpoint, experiment, data))
    print("next:")
    print(f"  raytrain serve {checkpoint}")
    print(f"  raytrain predict {checkpoint} IMAGES... --out predictions")
    print(f"  raytrain evaluate {checkpoint} {data}")
    print(f"  raytrain report {experiment} --out report")
    print(f"  tensorboard --logdir {experiment}")


def _quickstart(args) -> None:
    started = time.perf_counter()
    best = api.quickstart(args.data_dir, args.set, num_cpus=args.num_cpus, verbosity=_verbosity(args))
    _print_search(best.experiment, best.config.search)
    print(f"quickstart took {time.perf_counter() - started:.0f}s")
    _print_next_steps(best.path, best.experiment, best.config.data.path)


@contextlib.contextmanager
def _notes():
    """Warnings raised inside, printed as `raytrain: note: ...` lines once it succeeds (an error
    stays the one line on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # libraries' news for developers, not the user's notes
        yield
    for warning in caught:
        print(f"raytrain: note: {one_line(warning.message)}", file=sys.stderr)


def _best(args) -> None:
    with _notes():
        best = api.best_checkpoint(args.experiment, args.metric, args.mode, args.select, args.last_k)
    if args.json:
        print(json.dumps({"path": str(best.path), "experiment": best.experiment, "metrics": best.metrics,
                          "config": best.config.model_dump(mode="json")}))
    else:
        print(best.path)


def _runs(args) -> None:
    found = api.runs(args.storage)
    if args.json:
        print(json.dumps([run.to_dict() for run in found], indent=2))
        return
    header = ["name", "created", "kind", "trials", "status", "best", "path"]
    rows = [[run.name, run.created, run.kind, str(run.trials), run.status,
             f"{run.score_name} {run.best:.4f}" if run.best is not None else "-", run.path] for run in found]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _configs(args) -> None:
    print("\n".join(api.list_configs()))


def _config_show(args) -> None:
    print(api.show_config(args.config, args.set), end="")


def _report(args) -> None:
    with _notes():  # a damaged checkpoint passed over; an interrupted report's folder removed
        index = api.report(args.experiment, args.out, metric=args.metric, mode=args.mode, select=args.select,
                           last_k=args.last_k, progress=progress("report"))
    print(index)


def _evaluate(args) -> None:
    metrics = api.evaluate(args.checkpoint, args.data, split=args.split, device=args.device, tta=args.tta,
                           progress=progress("evaluate"))
    if args.json:
        print(json.dumps(metrics))
        return
    for key, value in metrics.items():
        print(f"{key:<16} {value:.4f}" if isinstance(value, float) else f"{key:<16} {value}")


def _predict(args) -> None:
    if args.workers is None:
        summary = api.predict_folder(args.checkpoint, args.inputs, args.out, device=args.device,
                                     batch_size=args.batch_size, progress=progress("predict"), tta=args.tta)
        print(f"wrote {summary.written} masks and overlays to {args.out}")
        return
    summary = api.predict_folder(args.checkpoint, args.inputs, args.out, workers=args.workers, device=args.device,
                                 batch_size=args.batch_size, progress=progress("predict"), tta=args.tta)
    print(f"wrote {summary.written} masks and overlays to {args.out} ({summary.images_per_s:.1f} images/s); "
          f"skipped {summary.already_done} already done")
    if summary.unreadable:
        print(f"raytrain: note: skipped {len(summary.unreadable)} unreadable inputs, listed in {summary.unreadable_list}",
              file=sys.stderr)


def _serve(args) -> None:
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines on deploying and shutting down
    with _notes():  # which experiment's best, when given a name's folder
        server = api.serve(args.checkpoint, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                           host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                           batch_wait_timeout_s=args.batch_wait_timeout_s, body_timeout_s=args.body_timeout_s,
                           max_ongoing_requests=args.max_ongoing_requests, metric=args.metric, mode=args.mode,
                           select=args.select, last_k=args.last_k, num_cpus=args.num_cpus, tta=args.tta)
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)  # ray.init put in its own, which exits without cleaning up
        print(f"serving {server.checkpoint} at {server.url} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how a server is meant to stop, so exit code 0
        pass
    finally:
        server.shutdown()
    print("raytrain: stopped serving", file=sys.stderr)


def _typed(rule: Rule):
    """An argparse type for `rule`: the text converted, then checked as the API checks the value."""

    def parse(text: str):
        try:
            value = rule.convert(text)
        except ValueError:
            value = None
        if value is None or not rule.holds(value):
            raise argparse.ArgumentTypeError(f"expected {rule.expected}, got {text!r}")
        return value

    parse.__name__ = rule.expected  # argparse names the type in some of its messages
    return parse


_positive_int, _positive_float, _non_negative_float, _fraction, _port = map(
    _typed, (POSITIVE, POSITIVE_NUMBER, NON_NEGATIVE, FRACTION, PORT))


def _default(function, parameter: str):
    """The API's default for one of its arguments: the CLI's default too."""
    return inspect.signature(function).parameters[parameter].default


def _export(args) -> None:
    print(api.export(args.checkpoint, args.out, format=args.format, tta=args.tta))


def _device(text: str) -> str:
    if text == "cpu":  # the default: no torch import just to parse the command line
        return text
    from raytrain.inference.loading import check_device

    try:
        check_device(text)
    except RaytrainError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _names(text: str) -> list[str]:
    """A comma-separated list: `road,car` -> ["road", "car"]."""
    return [name.strip() for name in text.split(",") if name.strip()]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line like every other raytrain error, instead of argparse's usage block; subcommands inherit it.
        self.exit(2, f"raytrain: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from raytrain import __version__

    parser = _Parser(prog="raytrain", description="Road segmentation on Ray: train, search, predict.")
    parser.add_argument("--version", action="version", version=f"raytrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_add_run_commands, _add_data_commands, _add_result_commands):
        add_commands(commands)
    return parser


def _with_output(sub):
    loudness = sub.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only the results")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also print Ray's own logs and tables")
    return sub


def _with_config(sub, kind):
    sub.add_argument("config", help="a YAML file, or the name of a shipped config (raytrain configs)")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted config key")
    sub.add_argument("--num-cpus", type=_positive_int, help="logical CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
    sub.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="EXPERIMENT",
        help=f"continue the latest {kind} of the config's name, or the given experiment directory",
    )
    sub.add_argument("--dry-run", action="store_true", help="check everything, print what would run, start nothing")
    return _with_output(sub)


def _add_run_commands(commands) -> None:
    """quickstart, train, tune, runs, configs, config show."""
    quick = commands.add_parser("quickstart", help="synthetic data -> shards -> a small search, end to end")
    quick.add_argument("--data-dir", help="where the synthetic data goes (default: ~/.cache/raytrain)")
    quick.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    quick.add_argument("--num-cpus", type=_positive_int)
    _with_output(quick).set_defaults(func=_quickstart)

    _with_config(commands.add_parser("train", help="one DDP training run, in a new experiment directory"), "train").set_defaults(func=_train)
    _with_config(commands.add_parser("tune", help="a hyperparameter search, in a new experiment directory"), "tune").set_defaults(func=_tune)

    runs = commands.add_parser("runs", help="the experiments in a storage folder, newest first")
    runs.add_argument("storage", nargs="?", help="default: the config default train.storage_path, ~/raytrain_results")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=_runs)

    commands.add_parser("configs", help="the configs shipped with raytrain").set_defaults(func=_configs)
    config = commands.add_parser("config", help="show a resolved config").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="the fully resolved config as YAML")
    show.add_argument("config", help="a YAML file or a shipped config's name")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_config_show)


def _add_data_commands(commands) -> None:
    """data synth, data shard."""
    data = commands.add_parser("data", help="make and shard datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic road scenes in the KITTI road layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--count", type=_positive_int, default=_default(api.synth, "count"))
    synth.add_argument("--seed", type=int, default=_default(api.synth, "seed"))
    synth.add_argument("--size", default="x".join(map(str, _default(api.synth, "size"))), help="WIDTHxHEIGHT")
    synth.set_defaults(func=_synth)
    shard = data.add_parser("shard", help="validate a dataset and write Parquet shards with a manifest")
    shard.add_argument("src", help="dataset folder: a local path or a URI (file://, s3://, gs://, ...)")
    shard.add_argument("--format", required=True, choices=api.SHARD_FORMATS)
    shard.add_argument(
        "--classes", type=_names, default=None,
        help="comma-separated target classes: one (e.g. road; kitti: road or lane) for a binary mask; default all classes",
    )
    shard.add_argument("--out", required=True, help="output folder, local or a URI; written atomically")
    shard.add_argument("--val-fraction", type=_fraction, default=_default(api.shard, "val_fraction"),
                       help="share of samples in val: 0 (no val split) up to, not including, 1")
    shard.add_argument("--seed", type=int, default=_default(api.shard, "seed"))
    shard.add_argument(
        "--group-by", metavar="REGEX",
        help="regex on the sample id naming its group (e.g. '^[^_]+': CamVid's drive, KITTI's category); "
             "whole groups go to val, and val metrics are also given per group",
    )
    shard.add_argument(
        "--val-groups", type=_names, metavar="A,B",
        help="with --group-by: the groups that make up val (default: a seeded choice of about --val-fraction of the samples)",
    )
    shard.add_argument("--skip-bad", action="store_true", help="skip bad samples (listed) instead of stopping")
    shard.add_argument(
        "--rows-per-shard", type=_positive_int, metavar="N", default=_default(api.shard, "rows_per_shard"),
        help="samples per Parquet file (default %(default)s); each file is one read task, so smaller files let more CPUs decode",
    )
    shard.set_defaults(func=_shard)


def _with_tta(sub) -> None:
    sub.add_argument("--tta", choices=api.TTA_CHOICES, help="test-time augmentation: flip averages each image with its mirror image")


def _with_metric(sub, function, what: str) -> None:
    """The rule that picks an experiment's best trial (docs: Search); each one not given is the experiment's own."""
    sub.add_argument("--metric", default=_default(function, "metric"),
                     help=f"what {what} (default: the experiment's search.metric, e.g. val_iou)")
    sub.add_argument("--mode", default=_default(function, "mode"), choices=api.MODES, help="default: the experiment's search.mode")
    sub.add_argument("--select", default=_default(function, "select"), choices=api.SELECTS,
                     help="which score stands for a trial: its best epoch's, its last epoch's, or the mean of its "
                          "last --last-k epochs' (default: the experiment's search.select)")
    sub.add_argument("--last-k", type=_positive_int, default=_default(function, "last_k"), metavar="K",
                     help="mean_last: how many last epochs are averaged (default: the experiment's search.last_k)")


def _add_result_commands(commands) -> None:
    """best, report, evaluate, predict, export: what a finished run gives."""
    best = commands.add_parser("best", help="the best checkpoint of an experiment")
    best.add_argument("experiment", help="an experiment directory, or a name's folder (its latest experiment)")
    _with_metric(best, api.best_checkpoint, "ranks the trials")
    best.add_argument("--json", action="store_true")
    best.set_defaults(func=_best)

    report = commands.add_parser("report", help="PNG plots, the best model's overlays and index.html of an experiment")
    report.add_argument("experiment")
    report.add_argument("--out", required=True, help="folder for the PNGs and index.html")
    _with_metric(report, api.report, "ranks the trials")
    report.set_defaults(func=_report)

    evaluate = commands.add_parser("evaluate", help="every metric of a checkpoint on a sharded dataset")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("data", help="a sharded dataset (the folder or URI with manifest.json)")
    evaluate.add_argument("--split", default=_default(api.evaluate, "split"), choices=api.SPLITS)
    evaluate.add_argument("--device", type=_device, default=_default(api.evaluate, "device"), help="cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--json", action="store_true")
    _with_tta(evaluate)
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser("predict", help="mask PNGs and red overlays at each image's own size")
    predict.add_argument("checkpoint")
    predict.add_argument("inputs", nargs="+", help="image files or folders of images: local paths or URIs (s3://, gs://, ...)")
    predict.add_argument("--out", required=True, help="folder or URI for the PNGs (created if missing)")
    predict.add_argument("--device", type=_device, help="cpu (the default), cuda, cuda:1, ...: the device of a run in this process")
    predict.add_argument(
        "--workers", type=_positive_int, metavar="N",
        help="predict on the Ray cluster (RAY_ADDRESS, or a local one) with N model actors, one GPU each when it has GPUs; "
             "images already done in --out are skipped, unreadable ones skipped and listed",
    )
    predict.add_argument("--batch-size", type=_positive_int, default=_default(api.predict_folder, "batch_size"),
                         help="images per model call")
    _with_tta(predict)
    predict.set_defaults(func=_predict)

    export = commands.add_parser("export", help="a checkpoint as a TorchScript, torch.export or ONNX file")
    export.add_argument("checkpoint")
    export.add_argument("--format", default=_default(api.export, "format"), choices=api.EXPORT_FORMATS,
                        help="onnx needs pip install 'raytrain[onnx]'")
    export.add_argument("--out", help="default: CHECKPOINT/model.torchscript.pt (model.pt2, model.onnx); required for a remote CHECKPOINT")
    _with_tta(export)
    export.set_defaults(func=_export)
    _add_serve_command(commands)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="a checkpoint over HTTP on Ray Serve: POST an image, get its mask")
    serve.add_argument("checkpoint", help="a checkpoint, or an experiment (its best checkpoint by --metric)")
    serve.add_argument("--replicas", type=_positive_int, default=_default(api.serve, "replicas"),
                       help="model replicas, one CPU each")
    serve.add_argument("--gpus-per-replica", type=_non_negative_float, default=_default(api.serve, "gpus_per_replica"),
                       help="GPUs per replica (may be a fraction)")
    serve.add_argument("--host", default=_default(api.serve, "host"), help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=_default(api.serve, "port"))
    serve.add_argument("--max-batch-size", type=_positive_int, default=_default(api.serve, "max_batch_size"),
                       help="requests per model call (1: no batching)")
    serve.add_argument("--batch-wait-timeout-s", type=_non_negative_float, default=_default(api.serve, "batch_wait_timeout_s"),
                       help="how long a batch waits to fill before it runs")
    serve.add_argument("--body-timeout-s", type=_positive_float, default=_default(api.serve, "body_timeout_s"),
                       help="seconds a request's body may take to arrive; a later one gets a 408, so a stalled client frees its slot")
    serve.add_argument("--max-ongoing-requests", type=_positive_int,
                       help="requests a replica holds at once, arriving or waiting for a batch "
                            "(default: 2 x --max-batch-size + 32)")
    _with_metric(serve, api.serve, "picks an experiment's best checkpoint")
    serve.add_argument("--num-cpus", type=_positive_int, help="logical CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
    _with_tta(serve)
    serve.set_defaults(func=_serve)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every cleanup path for Ctrl-C runs for it too."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        # Read when Ray is imported: no start-up chatter, Ray Data INFO lines or progress bars on stderr.
        for name, value in {"RAY_LOGGER_LEVEL": "error", "RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
            os.environ.setdefault(name, value)
    # Only over the default handler, in the main thread, and only while the command runs: a program
    # that embeds main() keeps its own SIGTERM handling.
    own_sigterm = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if own_sigterm:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.func(args)
    except RaytrainError as err:  # the user's input; anything else is a bug and keeps its traceback
        print(f"raytrain: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Terminated:
        print("raytrain: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("raytrain: interrupted", file=sys.stderr)
        return 130
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
