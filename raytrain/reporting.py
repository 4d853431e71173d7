"""A finished experiment -> PNG plots, the best model's overlays and one index.html. No Ray here.

Trials and their histories are selection.experiment_trials' (Tune's result.json and params.json; a
plain `raytrain train` run's kept checkpoints), ranked by the experiment's selection rule
(search.select); the checkpoint that stands for the best trial is run on the val split of its own
config's data.
"""
from __future__ import annotations

import html
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure  # a Figure without pyplot: no GUI backend, no global state
from matplotlib.ticker import NullFormatter
from PIL import Image

from raytrain.checkpoints import CheckpointInfo
from raytrain.config import WORST_GROUP
from raytrain.data.manifest import read_manifest
from raytrain.data.transforms import decode_sample, row_name
from raytrain.errors import CheckpointError
from raytrain.experiments import resolve_experiment, selection_rule
from raytrain.inference.loading import load_model
from raytrain.inference.prediction import predict
from raytrain.metrics import SegmentationMetrics, kitti_precision_recall
from raytrain.selection import SelectionRule, Trial, best_of_trials, experiment_trials
from raytrain.storage import leftovers
from raytrain.storage.atomic import write_errors_named
from raytrain.viz import overlay_grid

OVERLAY_SAMPLES = 4
CURVES = {  # file stem -> (title, [(metric key, line style)])
    "loss": ("loss", [("val_loss", "-"), ("train_loss", "--")]),
    "accuracy": ("val accuracy", [("val_accuracy", "-")]),
    "f1": ("val F1", [("val_f1", "-")]),
    "iou": ("val IoU", [("val_iou", "-")]),
}


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def read_trials(experiment_path: str | os.PathLike) -> list[Trial]:
    """Every trial of a Tune experiment, or the one run of a `raytrain train` directory."""
    trials = experiment_trials(experiment_path)
    if not any(trial.history for trial in trials):
        raise CheckpointError(f"{experiment_path}: no trial has reported any metrics (not a raytrain experiment?)")
    return [trial for trial in trials if trial.history or trial.params]


INDEX = "index.html"  # the report's page, moved into the output folder after its figures


def val_samples(checkpoint: CheckpointInfo) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The val images and masks of the checkpoint's dataset, at its training size, by sample id."""
    config = checkpoint.config
    # One file at a time: pyarrow resolves a URI (s3://) only when it is given alone.
    paths = read_manifest(config.data.path).shard_paths("val")
    if not paths:
        return [], []
    table = pa.concat_tables([pq.read_table(path, columns=["id", "image", "mask"]) for path in paths]).sort_by("id")
    pairs = [
        decode_sample(image, mask, config.data.size, row_name(config.data.path, sample_id))
        for sample_id, image, mask in zip(*(table.column(name).to_pylist() for name in ("id", "image", "mask")))
    ]
    return [image for image, _ in pairs], [mask for _, mask in pairs]


def precision_recall_curve(histogram) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, threshold) over the KITTI thresholds, from SegmentationMetrics' histogram."""
    return tuple(values.numpy() for values in kitti_precision_recall(torch.as_tensor(np.asarray(histogram))))


# --- plots -------------------------------------------------------------------------------------


def _figure(width=6.4, height=4.0) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _trial_label(trial: Trial) -> str:
    values = ", ".join(f"{key.split('.')[-1]}={_short(value)}" for key, value in trial.params.items())
    return f"{trial.name} ({values})" if values else trial.name


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_curves(trials: list[Trial], best: Trial, out_dir: Path) -> list[tuple[str, Path]]:
    """One figure per entry of CURVES: every trial a line, the best one bold; -> (caption, path)."""
    written = []
    for stem, (title, series) in CURVES.items():
        figure = _figure()
        axes = figure.add_subplot()
        drawn = False
        for index, trial in enumerate(trials):
            colour = f"C{index % 10}"
            for key, style in series:
                points = [(row["epoch"], row[key]) for row in trial.history if _number(row.get(key)) is not None]
                if not points:
                    continue
                epochs, values = zip(*points)
                is_best = trial is best
                label = f"{_trial_label(trial)}{' best' if is_best else ''} {key}"
                axes.plot(epochs, values, style, color=colour, marker="o", markersize=3,
                          linewidth=3 if is_best else 1, alpha=1 if is_best else 0.6, label=label)
                drawn = True
        if not drawn:
            continue
        axes.set(title=title, xlabel="epoch", ylabel=stem)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, loc="best")
        path = out_dir / f"{stem}.png"
        figure.savefig(path)
        written.append((f"{title} per epoch (best trial bold)", path))
    return written


def plot_params(trials: list[Trial], best: Trial, rule: SelectionRule, out_dir: Path) -> Path | None:
    keys = list(dict.fromkeys(key for trial in trials for key in trial.params))
    scored = [(trial, trial.score(rule)) for trial in trials]
    scored = [(trial, found[0]) for trial, found in scored if found is not None]
    if not keys or not scored:
        return None
    figure = _figure(max(5.0, 4.0 * len(keys)), 3.8)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), index + 1)
        values = [trial.params.get(key) for trial, _ in scored]
        numeric = all(_number(value) is not None for value in values)
        if numeric:
            x = [float(value) for value in values]
            positive = all(value > 0 for value in x)
            if positive and (key.split(".")[-1] in ("lr", "weight_decay") or max(x) / min(x) >= 100):
                axes.set_xscale("log")
                axes.xaxis.set_minor_formatter(NullFormatter())  # a range within one decade gets unreadable labels
            distinct = sorted(set(x))
            if len(distinct) <= 6:  # few trials: tick exactly the values that were tried
                axes.set_xticks(distinct, [_short(value) for value in distinct], rotation=20)
        else:
            categories = sorted({str(value) for value in values})
            x = [categories.index(str(value)) for value in values]
            axes.set_xticks(range(len(categories)), categories, rotation=20)
            axes.set_xlim(-0.5, len(categories) - 0.5)
        colours = ["C3" if trial is best else "C0" for trial, _ in scored]
        sizes = [80 if trial is best else 30 for trial, _ in scored]
        axes.scatter(x, [score for _, score in scored], c=colours, s=sizes)
        axes.set(xlabel=key, ylabel=f"best {rule.metric}" if rule.select == "best" else rule.score_name)
        axes.grid(alpha=0.3)
    figure.suptitle(f"{rule.metric} by searched value (best trial red)")
    path = out_dir / "params.png"
    figure.savefig(path)
    return path


def plot_pr_curve(histogram, out_dir: Path) -> tuple[Path, float]:
    recall, precision, _ = precision_recall_curve(histogram)
    f_measure = 2 * precision * recall / (precision + recall + 1e-10)
    best = int(np.argmax(f_measure))
    figure = _figure(5.0, 4.5)
    axes = figure.add_subplot()
    axes.plot(recall, precision, color="C0", label="best model, val split")
    axes.plot(recall[best], precision[best], "o", color="C3", markersize=8,
              label=f"MaxF {f_measure[best]:.4f} (P {precision[best]:.3f}, R {recall[best]:.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="road precision-recall")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    path = out_dir / "pr_curve.png"
    figure.savefig(path)
    return path, float(f_measure[best])


# --- the report --------------------------------------------------------------------------------


def results_rows(trials: list[Trial], rule: SelectionRule) -> tuple[list[str], list[tuple[Trial, list[str]]]]:
    """(header, [(trial, cells)]) of the results table, best trial first by `rule` (its score the
    first score column, the other scores those of the epoch that stands for it), unscored trials
    last. Where the scores carry a 95% interval (metrics.py: {metric}_low, {metric}_high), two more
    columns: that epoch's interval, and "tied" for each trial whose interval overlaps the best's."""
    keys = list(dict.fromkeys(key for trial in trials for key in trial.params))
    ranked = [(trial, trial.score(rule)) for trial in trials]
    sign = -1 if rule.mode == "max" else 1
    ranked.sort(key=lambda item: (item[1] is None, sign * item[1][0] if item[1] else 0))
    scores = [key for key in ("val_f1", "val_iou") if key != rule.metric]
    best = _interval(ranked[0][1][1] if ranked and ranked[0][1] else None, rule.metric)
    epoch = "best epoch" if rule.select == "best" else "last epoch"
    header = ["#", "trial", *keys, rule.score_name, *scores, *(["95% interval", "vs best"] if best else []), epoch, "epochs"]
    rows = []
    for rank, (trial, found) in enumerate(ranked, start=1):
        score, row = found if found else (None, None)

        def cell(key):
            value = _number(row.get(key)) if row else None
            return "" if value is None else f"{value:.4f}"

        interval = _interval(row, rule.metric)
        compared = []
        if best:
            tied = interval and rank > 1 and interval[0] <= best[1] and interval[1] >= best[0]
            compared = [f"{interval[0]:.4f}-{interval[1]:.4f}" if interval else "", "best" if rank == 1 else "tied" if tied else ""]
        rows.append((trial, [str(rank), trial.name, *(_short(trial.params.get(key, "")) for key in keys),
                             "" if score is None else f"{score:.4f}", *(cell(key) for key in scores), *compared,
                             str(row["epoch"]) if row else "", str(len(trial.history))]))
    return header, rows


def _interval(row: dict | None, metric: str) -> tuple[float, float] | None:
    low, high = (_number(row.get(f"{metric}_{end}")) if row else None for end in ("low", "high"))
    return None if low is None or high is None else (low, high)


def trials_table(experiment_path: str | os.PathLike, rule: SelectionRule = SelectionRule()) -> str:
    """The results table as aligned plain text: what `raytrain tune` prints at the end."""
    header, rows = results_rows(read_trials(experiment_path), rule)
    table = [header, *(cells for _, cells in rows)]
    widths = [max(len(cell) for cell in column) for column in zip(*table)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def _results_table(trials: list[Trial], best: Trial, rule: SelectionRule) -> str:
    header, rows = results_rows(trials, rule)
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for trial, cells in rows:
        style = ' class="best"' if trial is best else ""
        lines.append(f"<tr{style}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def group_rows(metrics: dict) -> list[list[str]]:
    """[group, val IoU, val F1] for each group a checkpoint's metrics hold (a dataset sharded with
    --group-by), worst IoU first, then every group pooled; [] without groups."""
    groups = [key.removeprefix("val_iou@") for key in metrics if key.startswith("val_iou@") and key != f"val_iou@{WORST_GROUP}"]
    if not groups:
        return []

    def cell(key: str) -> str:
        value = _number(metrics.get(key))
        return "" if value is None else f"{value:.4f}"

    groups.sort(key=lambda group: (_number(metrics.get(f"val_iou@{group}")) is None, _number(metrics.get(f"val_iou@{group}"))))
    rows = [[group, cell(f"val_iou@{group}"), cell(f"val_f1@{group}")] for group in groups]
    return rows + [["all groups", cell("val_iou"), cell("val_f1")]]


def _groups_table(checkpoint: CheckpointInfo) -> str:
    rows = group_rows(checkpoint.metrics)
    if not rows:
        return ""
    epoch = checkpoint.metrics.get("epoch", "?")
    lines = [f"<h2>best model by group (val split, epoch {html.escape(str(epoch))}, worst first)</h2>", "<table>",
             "<tr><th>group</th><th>val IoU</th><th>val F1</th></tr>"]
    lines += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    return "\n".join([*lines, "</table>"])


def _html(title: str, table: str, best_path: Path, figures: list[tuple[str, Path]]) -> str:
    images = "\n".join(
        f'<figure><a href="{html.escape(path.name)}"><img src="{html.escape(path.name)}" alt="{html.escape(caption)}"></a>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, path in figures
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}
tr.best {{ font-weight: bold; background: #fde8e8; }}
figure {{ display: inline-block; margin: 1em; vertical-align: top; }}
img[src="overlays.png"] {{ image-rendering: pixelated; min-width: 30em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>best checkpoint: <code>{html.escape(str(best_path))}</code></p>
{table}
{images}
</body></html>
"""


def write_report(experiment_path: str | os.PathLike, out_dir: str | os.PathLike, metric: str | None = None,
                 mode: str | None = None, select: str | None = None, last_k: int | None = None, progress=None) -> Path:
    """Plots, overlays and index.html for the experiment in `out_dir`; returns index.html's path.
    metric, mode, select, last_k: the rule that ranks trials (experiments.selection_rule: each one not
    given is the experiment's own). progress: called with (val images scored, total) after each batch.

    Everything is read and computed before `out_dir` is touched, so bad input leaves nothing behind.
    """
    root = resolve_experiment(experiment_path)
    rule = selection_rule(root, metric, mode, select, last_k)
    skipped: list[str] = []
    trials = experiment_trials(root, skipped)
    if not any(trial.history for trial in trials):
        raise CheckpointError(f"{root}: no trial has reported any metrics (not a raytrain experiment?)")
    chosen = best_of_trials(trials, rule, root, skipped)
    checkpoint, best = chosen.checkpoint, chosen.trial
    trials = [trial for trial in trials if trial.history or trial.params]
    images, masks = val_samples(checkpoint)
    probabilities, histogram = _predict_val(checkpoint, images, masks, keep=OVERLAY_SAMPLES, progress=progress)

    out = Path(out_dir).expanduser()
    with write_errors_named(out):  # a full disk: one line naming out
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written whole in a hidden folder beside out, then moved in, index.html last: a full disk or
        # a kill leaves out as it was (a previous report intact), never a partial plot. The folder is
        # marked as this process's, so the next report to out removes it should this one be killed.
        staging = Path(leftovers.make_temp_dir(pafs.LocalFileSystem(), str(out.absolute()), str(out)))
        try:
            _write_report_files(staging, root, trials, best, rule, checkpoint, images, masks, probabilities, histogram)
            out.mkdir(exist_ok=True)
            written = [path for path in staging.iterdir() if path.name != leftovers.MARKER]
            for path in sorted(written, key=lambda path: path.name == INDEX):
                os.replace(path, out / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out / INDEX


def _write_report_files(out: Path, root: str, trials: list[Trial], best: Trial, rule: SelectionRule,
                        checkpoint: CheckpointInfo, images, masks, probabilities, histogram) -> None:
    """The report's plots, overlays and index.html, into `out`."""
    binary = checkpoint.config.num_classes == 1
    figures = plot_curves(trials, best, out)
    params_plot = plot_params(trials, best, rule, out)
    if params_plot:
        figures.append((f"searched values against {rule.score_name}", params_plot))
    if histogram is not None and histogram[1].sum() > 0:
        path, maxf = plot_pr_curve(histogram, out)
        figures.append((f"precision-recall of the best model on the val split (MaxF {maxf:.4f})", path))
    count = len(probabilities)
    if count:
        grid = overlay_grid(np.stack(images[:count]), np.stack(masks[:count]),
                            np.stack(probabilities[:count]), checkpoint.classes)
        path = out / "overlays.png"
        Image.fromarray(grid).save(path)
        legend = "road: probability > 0.5 in red" if binary else "classes in their palette colours"
        figures.append((f"best model on val images: prediction | ground truth ({legend})", path))
    title = "raytrain report: " + "/".join(root.rstrip("/").rsplit("/", 2)[-2:])
    tables = _results_table(trials, best, rule) + "\n" + _groups_table(checkpoint)
    (out / INDEX).write_text(_html(title, tables, checkpoint.path, figures))


def _predict_val(checkpoint: CheckpointInfo, images, masks, keep: int, batch_size: int = 8, progress=None):
    """The first `keep` probability maps (C, H, W), and for binary road the KITTI score histogram
    of the whole split; batch by batch, so a large val split never sits in memory as floats."""
    import torch

    model = load_model(checkpoint)
    binary = checkpoint.config.num_classes == 1
    metrics = SegmentationMetrics(1) if binary else None
    kept = []
    for start in range(0, len(images), batch_size):
        if metrics is None and len(kept) == keep:
            break  # multi-class: only the overlays need predictions
        chunk = [p if p.ndim == 3 else p[None] for p in predict(model, images[start : start + batch_size])]
        kept += chunk[: keep - len(kept)]
        if metrics is not None:
            for probs, mask in zip(chunk, masks[start : start + batch_size]):
                metrics.update(torch.from_numpy(probs)[None], torch.from_numpy(np.array(mask))[None])
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    histogram = metrics.histogram if metrics is not None else None
    return kept, (histogram.numpy() if histogram is not None else None)
