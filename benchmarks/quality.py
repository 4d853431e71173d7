"""Model quality within a stated CPU budget: the quickstart's synthetic val IoU, and CamVid val
road IoU (binary) and 11-class mIoU.

    python benchmarks/quality.py [--camvid-size 160x120] [--camvid-epochs 10] [--skip-quickstart] [--set KEY=VALUE]
    python benchmarks/quality.py --camvid-road-recipe [--budget-s 1680]

Every run is a plain `raytrain train` of the quickstart settings (tune_configs/quickstart.yaml: the
lab's U-Net with batch norm, Adam lr 3e-3, batch 4, 2 DDP workers of 1 CPU) without the search:
- quickstart: its 400 synthetic scenes 192x64 (seed 0), its 8 epochs;
- CamVid (SegNet's 11-class version, /work/shared/datasets/camvid or RAYTRAIN_CAMVID; skipped when
  absent): its own train (367) / val (101) split, resized to --camvid-size, --camvid-epochs epochs,
  once with road as the one class (binary road IoU) and once with all 11 classes (mean IoU over
  the classes present, void ignored). Loss: bce (binary), cross-entropy (11 classes).
Reported: the val IoU of the best epoch and of the last, the epoch count and the wall time of each
run (the budget), on this machine. Prints one JSON object.

--camvid-road-recipe instead measures the held-out-drive road recipe (issue 14): CamVid sharded as
data/README.md recommends (binary road, drive 0006R0 held out for val), then, one after the other,
- the recipe: `raytrain tune camvid_road` as it ships (its search stops at its time budget);
- the baseline: the quickstart settings above at the recipe's image size as one run, no search, for
  the same time budget (a one-trial `raytrain tune quickstart` with time_budget_s, so both get the
  same minutes);
each a `raytrain` process of its own, timed. Both best checkpoints are then scored with `raytrain
evaluate` (at CamVid's full 480x360) on the held-out drive with and without flip TTA, and per drive
on the train split (drives the model has seen, for contrast).

--selection instead measures how well a search's pick generalises (issue 28's protocol): CamVid
sharded as binary road with train = drive 0016E5, selection = drive 0006R0, unseen = drive 0001TP
(the dusk drive: neither trained nor selected on). Both other drives are val groups, so every epoch
of every trial reports val_iou@0006R0 (what the search and every rule see) and val_iou@0001TP
(what nothing sees: the score of the checkpoint a rule hands back). Per seed, two searches of the
same seeded trials (camvid_road's space, plus train.ema as a grid of none and --ema, so each
sampled setting runs with and without weight averaging): FIFO (every trial to its last epoch) and
ASHA (camvid_road's scheduler, its grace half the epochs). Per search, EMA subset and rule
(search.select best, last, mean_last; through raytrain.selection.trial_score): each trial's
selection score and unseen IoU, their Spearman correlation, the pick's unseen IoU and its regret
(the best unseen IoU among the checkpoints the rule would hand back, minus the pick's); and per EMA
subset, how much a trial's selection IoU moves from epoch to epoch over its second half.

    python benchmarks/quality.py --selection [--seeds 0 1] [--keep DIR]
    python benchmarks/quality.py --selection-from DIR    # the searches already in DIR, analysed again
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import NOISE_NOTE, camvid_root, emit, header, log, scratch_dir, synthetic_shards, timed_fit

from raytrain import api
from raytrain.launch import session
from raytrain.config import WORST_GROUP, load_config, parse_size
from raytrain.data.formats import CAMVID_CLASSES
from raytrain.data.shards import write_shards
from raytrain.reporting import read_trials

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
HELD_OUT_DRIVE = "0006R0"  # data/README.md's recommended split: train on 0001TP and 0016E5


def train_and_score(config, scratch: Path, name: str) -> dict:
    log(f"{name}: {config.train.epochs} epochs at {config.data.size[0]}x{config.data.size[1]} ...")
    run = timed_fit(config, scratch / "reports.jsonl", name=name)
    scores = [report["val_iou"] for report in run["reports"]]
    best = max(range(len(scores)), key=scores.__getitem__)
    result = {
        "classes": len(config.classes),
        "size": f"{config.data.size[0]}x{config.data.size[1]}",
        "epochs": len(scores),
        "best_val_iou": round(scores[best], 4),
        "best_epoch": best + 1,
        "last_val_iou": round(scores[-1], 4),
        "val_iou_per_epoch": [round(s, 4) for s in scores],
        "wall_s": round(run["total_s"], 1),
    }
    if len(config.classes) == 1:
        result["best_val_f1"] = round(run["reports"][best]["val_f1"], 4)
    else:
        result["best_val_iou_per_class"] = {
            name: (round(v, 4) if v is not None else None)
            for name in config.classes for v in [run["reports"][best].get(f"val_iou_{name}")]
        }
    log(f"  best val IoU {result['best_val_iou']} (epoch {best + 1}) in {result['wall_s']}s")
    return result


SETTINGS: list[str] = []  # --set KEY=VALUE, applied to every run


def quickstart_config(shards: Path, storage: Path, **overrides):
    config = load_config(REPO / "tune_configs/quickstart.yaml", {
        "data.path": str(shards), "train.num_workers": WORKERS, "train.storage_path": str(storage),
        "train.max_failures": 0, **overrides,
    })
    return load_config(config, SETTINGS)


def timed_raytrain(args: list[str]) -> float:
    """`raytrain ARGS` in a process of its own, as a user runs it (output to stderr); its wall seconds."""
    log("$ raytrain " + " ".join(args))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raytrain.cli", *args], stdout=sys.stderr, check=True)
    return time.perf_counter() - started


def held_out_scores(experiment: Path, shards: Path) -> dict:
    """The experiment's best checkpoint scored on the held-out drive (with and without flip TTA) and
    per drive on the train split."""
    best = api.best_checkpoint(experiment)
    scores = {"checkpoint_val_iou": round(best.metrics["val_iou"], 4), "epoch": best.metrics["epoch"]}
    for tta in (None, "flip"):
        result = api.evaluate(best, shards, tta=tta)
        scores[f"held_out_iou{'_flip' if tta else ''}"] = round(result[f"iou@{HELD_OUT_DRIVE}"], 4)
        scores[f"held_out_f1{'_flip' if tta else ''}"] = round(result[f"f1@{HELD_OUT_DRIVE}"], 4)
    seen = api.evaluate(best, shards, split="train")
    groups = [key.removeprefix("iou@") for key in seen if key.startswith("iou@") and key != f"iou@{WORST_GROUP}"]
    scores["per_drive_iou"] = {HELD_OUT_DRIVE + " (held out)": scores["held_out_iou"],
                               **{f"{group} (trained on)": round(seen[f"iou@{group}"], 4) for group in groups}}
    return scores


def trials_summary(experiment: Path) -> list[dict]:
    return [{"trial": trial.name, **trial.params, "epochs": len(trial.history),
             "best_val_iou": round(max(row["val_iou"] for row in trial.history), 4) if trial.history else None}
            for trial in read_trials(experiment)]


def road_recipe(camvid: Path, scratch: Path, budget_s: float) -> dict:
    shards, storage = scratch / "camvid_road_by_drive", scratch / "ray_results"
    write_shards(camvid, "camvid", shards, classes=["road"], group_by="^[^_]+", val_groups=[HELD_OUT_DRIVE])
    common = ["--set", f"data.path={shards}", "--set", f"train.storage_path={storage}",
              "--set", f"search.time_budget_s={budget_s}"]
    recipe = ["tune", "camvid_road", *common]
    size = load_config("camvid_road").data.size
    baseline = ["tune", "quickstart", *common, "--set", f"data.size={size[0]}x{size[1]}", "--set", "train.epochs=200",
                "--set", "search.space={}", "--set", "search.num_samples=1", "--set", "search.scheduler.name=fifo",
                "--set", "search.max_concurrent_trials=1"]
    results = {}
    for name, args in (("recipe", recipe), ("baseline", baseline)):
        wall = timed_raytrain(args)
        experiment = api.runs(storage)[0].path  # the newest: the one just run
        results[name] = {"command": "raytrain " + " ".join(args), "wall_s": round(wall, 1),
                         **held_out_scores(Path(experiment), shards), "trials": trials_summary(Path(experiment))}
        log(f"  {name}: held-out road IoU {results[name]['held_out_iou']} (flip {results[name]['held_out_iou_flip']}), {wall:.0f} s")
    return results


SELECTION_DRIVE, UNSEEN_DRIVE = "0006R0", "0001TP"  # train: the remaining drive, 0016E5
RULES = {"best": 1, "last": 1, "mean_last": 3}  # search.select -> last_k


def protocol_config(shards: Path, storage: Path, seed: int, scheduler: str, args) -> str:
    """camvid_road's search, smaller, with the selection drive as its metric and EMA as a grid."""
    width, height = parse_size(args.size)
    config = load_config("camvid_road", {
        "data.path": str(shards), "data.size": [width, height], "train.storage_path": str(storage),
        "train.seed": seed, "train.epochs": args.epochs, "train.num_workers": 1, "train.max_failures": 0,
        "train.channels_last": True,  # faster on a CPU too (docs/decisions.md, the quickstart)
        "search.metric": f"val_iou@{SELECTION_DRIVE}", "search.num_samples": args.samples,
        "search.max_concurrent_trials": 2, "search.time_budget_s": None,
        "search.scheduler.name": scheduler, "search.scheduler.grace_period": max(1, args.epochs // 2),
    })
    config.search.space["train.ema"] = {"grid": [None, args.ema]}
    return load_config(config.model_dump(mode="json"), SETTINGS).to_yaml()


def run_selection_searches(camvid: Path, root: Path, args) -> None:
    """The protocol's searches into root, one `raytrain tune` process each; one already finished is kept."""
    shards = root / "camvid_road_3drives"
    if not (shards / "manifest.json").is_file():
        log("sharding CamVid: train 0016E5, val groups 0006R0 (selection) and 0001TP (unseen) ...")
        write_shards(camvid, "camvid", shards, classes=["road"], group_by="^[^_]+",
                     val_groups=[SELECTION_DRIVE, UNSEEN_DRIVE])
    for seed in args.seeds:
        for scheduler in args.schedulers:
            storage = root / f"seed{seed}_{scheduler}"
            if storage.is_dir() and any(run.status == "finished" for run in api.runs(storage)):
                continue
            config_file = root / f"seed{seed}_{scheduler}.yaml"
            config_file.write_text(protocol_config(shards, storage, seed, scheduler, args))
            wall = timed_raytrain(["tune", str(config_file)])
            (storage / "wall_s.txt").write_text(f"{wall:.1f}\n")


def spearman(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import spearmanr

    return None if len(xs) < 3 else round(float(spearmanr(xs, ys).statistic), 3)


def swing(values: list[float]) -> float | None:
    """Mean absolute change of the selection IoU between consecutive epochs of the second half."""
    half = values[len(values) // 2:]
    steps = [abs(b - a) for a, b in zip(half, half[1:])]
    return round(sum(steps) / len(steps), 4) if steps else None


def analyse_search(experiment: Path) -> dict:
    from raytrain.selection import trial_score

    selection, unseen = f"val_iou@{SELECTION_DRIVE}", f"val_iou@{UNSEEN_DRIVE}"
    trials = [trial for trial in read_trials(experiment) if trial.history]
    result = {"experiment": str(experiment), "trials": len(trials)}
    for ema_label, subset in (("no_ema", [t for t in trials if not t.params.get("train.ema")]),
                              ("ema", [t for t in trials if t.params.get("train.ema")])):
        if not subset:
            continue
        by_rule = {}
        for rule, last_k in RULES.items():
            rows = []
            for trial in subset:
                values = [row[selection] for row in trial.history]
                score, epoch = trial_score(values, rule, last_k, "max")
                rows.append({"trial": trial.name, "epochs": len(values), "epoch": epoch + 1,
                             "val": round(score, 4), "unseen": round(trial.history[epoch][unseen], 4)})
            pick = max(rows, key=lambda row: row["val"])
            best_unseen = max(row["unseen"] for row in rows)
            by_rule[rule if rule != "mean_last" else f"mean_last_{last_k}"] = {
                "spearman": spearman([r["val"] for r in rows], [r["unseen"] for r in rows]),
                "pick": pick["trial"], "pick_val": pick["val"], "pick_unseen": pick["unseen"],
                "best_unseen": best_unseen, "regret": round(best_unseen - pick["unseen"], 4),
                "median_unseen": round(float(np.median([r["unseen"] for r in rows])), 4),
                "trials": rows,
            }
        swings = [swing([row[selection] for row in t.history]) for t in subset]
        swings = [value for value in swings if value is not None]
        by_rule["epoch_to_epoch_swing_median"] = round(float(np.median(swings)), 4) if swings else None
        by_rule["oracle_unseen"] = round(max(row[unseen] for t in subset for row in t.history), 4)
        result[ema_label] = by_rule
    return result


def selection_main(args) -> int:
    camvid = camvid_root()
    if camvid is None and not args.selection_from:
        emit({**header("quality_selection"), "skipped": "no CamVid folder (set RAYTRAIN_CAMVID or place it at ../shared/datasets/camvid)"})
        return 0
    root = Path(args.selection_from or args.keep or scratch_dir("quality-selection"))
    root.mkdir(parents=True, exist_ok=True)
    if not args.selection_from:
        run_selection_searches(camvid, root, args)
    searches = {}
    for storage in sorted(path for path in root.iterdir() if path.is_dir() and path.name.startswith("seed")):
        finished = [run for run in api.runs(storage) if run.status == "finished"]
        if finished:
            wall = storage / "wall_s.txt"
            searches[storage.name] = {"wall_s": float(wall.read_text()) if wall.is_file() else None,
                                      **analyse_search(Path(finished[0].path))}
    emit({
        **header("quality_selection"),
        "setup": {
            "split": f"binary road; train drive 0016E5, selection drive {SELECTION_DRIVE}, unseen drive {UNSEEN_DRIVE}",
            "searches": f"camvid_road's space and model, plus train.ema grid [none, ema]; {' and '.join(args.schedulers)} per seed",
            "size": args.size, "epochs": args.epochs, "samples": args.samples, "schedulers": args.schedulers, "ema": args.ema, "seeds": args.seeds,
            "workers": "1 worker of 1 CPU a trial, 2 trials at a time",
            "scored": "val_iou@<drive> at the training size, every epoch of every trial (Tune's result.json)",
            "regret": "best unseen IoU among the checkpoints the rule hands back, minus the pick's",
        },
        "searches": searches,
        "note": NOISE_NOTE,
    })
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid-size", default="160x120", help="WIDTHxHEIGHT for CamVid (its images are 480x360)")
    parser.add_argument("--camvid-epochs", type=int, default=10)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, as raytrain's --set (repeatable)")
    parser.add_argument("--camvid-road-recipe", action="store_true", help="the held-out-drive road recipe against the baseline")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="--camvid-road-recipe: each run's time budget (default: camvid_road's search.time_budget_s)")
    parser.add_argument("--selection", action="store_true", help="issue 28's protocol: how well each selection rule generalises")
    parser.add_argument("--selection-from", metavar="DIR", help="--selection's analysis of the searches already in DIR")
    parser.add_argument("--keep", metavar="DIR", help="--selection: keep the data and searches in DIR (reused when run again)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="--selection: train.seed of each pair of searches")
    parser.add_argument("--size", default="160x120", help="--selection: WIDTHxHEIGHT")
    parser.add_argument("--epochs", type=int, default=8, help="--selection: epochs a trial")
    parser.add_argument("--samples", type=int, default=5, help="--selection: sampled settings, each with and without EMA")
    parser.add_argument("--schedulers", nargs="+", choices=["fifo", "asha"], default=["fifo", "asha"],
                        help="--selection: the searches of each seed (ASHA's full trials repeat FIFO's exactly)")
    parser.add_argument("--ema", type=float, default=0.99, help="--selection: the EMA decay of the trials with it")
    args = parser.parse_args()
    SETTINGS.extend(args.set)
    if args.selection or args.selection_from:
        return selection_main(args)
    if args.camvid_road_recipe:
        return recipe_main(args.budget_s or load_config("camvid_road").search.time_budget_s)
    camvid_size = parse_size(args.camvid_size)

    scratch = scratch_dir("quality")
    storage = scratch / "ray_results"
    session.ensure_ray(WORKERS + 1)  # one CPU per worker, one for Ray Data
    results = {}
    if not args.skip_quickstart:
        log("making the quickstart data ...")
        shards = synthetic_shards(scratch / "quickstart")
        results["quickstart"] = train_and_score(quickstart_config(shards, storage), scratch, "quickstart")

    camvid = camvid_root()
    if camvid is None:
        results["camvid"] = {"skipped": "no CamVid folder (set RAYTRAIN_CAMVID or place it at ../shared/datasets/camvid)"}
    else:
        for name, classes, loss in (("camvid_road", ["road"], "bce"), ("camvid_11", list(CAMVID_CLASSES), "ce")):
            log(f"sharding CamVid for {name} ...")
            shards = scratch / name
            write_shards(camvid, "camvid", shards, classes=classes)
            config = quickstart_config(shards, storage, **{
                "classes": classes, "loss.name": loss, "data.size": list(camvid_size),
                "train.epochs": args.camvid_epochs,
            })
            results[name] = train_and_score(config, scratch, name)

    emit({
        **header("quality"),
        "setup": {
            "model": "quickstart unet (batch norm), Adam lr 3e-3, batch 4", "workers": WORKERS, "cpus_per_worker": 1,
            "ray_cpus": WORKERS + 1, "metric": "val_iou: binary road IoU; for 11 classes the mean IoU over present classes",
        },
        **results,
        "note": NOISE_NOTE,
    })
    return 0


def recipe_main(budget_s: float) -> int:
    camvid = camvid_root()
    if camvid is None:
        emit({**header("quality_camvid_road"), "skipped": "no CamVid folder (set RAYTRAIN_CAMVID or place it at ../shared/datasets/camvid)"})
        return 0
    results = road_recipe(camvid, scratch_dir("quality-road"), budget_s)
    emit({
        **header("quality_camvid_road"),
        "setup": {
            "split": f"binary road; train drives 0001TP (dusk) + 0016E5, val drive {HELD_OUT_DRIVE} (held out)",
            "budget_s_each": budget_s, "cpus": "2 DDP workers of 1 CPU per run, one run at a time",
            "scored": "raytrain evaluate at 480x360 on the held-out drive; per_drive_iou: train split drives for contrast",
            "caveat": "one run each; the recipe's search and both runs' best epoch are picked on the held-out drive itself",
        },
        **results,
        "note": NOISE_NOTE,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
