"""What every benchmark shares: the JSON header (machine, versions, command), tiny synthetic shards,
a local Ray of its own, and printing one JSON object on stdout (progress goes to stderr)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# The quickstart's data, as `raytrain quickstart` makes it (raytrain/api.py).
from raytrain.api import QUICKSTART_COUNT, QUICKSTART_SEED, QUICKSTART_SIZE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# stdout carries the one JSON object and nothing else: Ray (its raylet warnings, its subprocesses)
# writes to file descriptor 1 too, so that descriptor is pointed at stderr and the result goes to a copy.
_RESULT_OUT = os.fdopen(os.dup(sys.stdout.fileno()), "w")
sys.stdout.flush()
os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
NOISE_NOTE = (
    "a small shared machine where other work may run on the same cores: read the spread over repeats, "
    "and compare ratios measured side by side, not absolute rates across machines"
)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("raytrain", "ray", "torch", "numpy", "pyarrow", "segmentation-models-pytorch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def header(benchmark: str) -> dict:
    return {
        "benchmark": benchmark,
        "machine": machine(),
        "versions": versions(),
        "command": " ".join(["python", *sys.argv]),
    }


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2), file=_RESULT_OUT, flush=True)


def median(values) -> float:
    return statistics.median(values)


def spread(values) -> dict:
    """Median, min and max over repeats, as a README figure states them; None (a target never
    reached) ranks above every number."""
    ranked = sorted(values, key=lambda value: (value is None, value if value is not None else 0))
    n = len(ranked)
    middle = ranked[(n - 1) // 2: n // 2 + 1]
    median_value = None if None in middle else round(sum(middle) / len(middle), 4)
    return {"median": median_value, "min": ranked[0], "max": ranked[-1], "n": n}


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the process exits (data, Ray storage)."""
    import atexit

    path = Path(tempfile.mkdtemp(prefix=f"raytrain-bench-{prefix}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def synthetic_shards(root: Path, count: int = QUICKSTART_COUNT, size=QUICKSTART_SIZE, seed: int = QUICKSTART_SEED,
                     rows_per_shard: int = 64) -> Path:
    """Synthetic KITTI-layout scenes sharded to Parquet under root; returns the shards' directory."""
    from raytrain.data.shards import write_shards
    from raytrain.data.synthetic import write_synthetic_kitti

    raw = write_synthetic_kitti(root / "synthetic", count, seed=seed, size=tuple(size))
    return Path(write_shards(raw, "kitti", root / "shards", rows_per_shard=rows_per_shard) and root / "shards")


def start_ray(num_cpus: int) -> None:
    import ray

    ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)


def camvid_root() -> Path | None:
    """The shared CamVid copy beside the repository, or RAYTRAIN_CAMVID; None when absent."""
    path = Path(os.environ.get("RAYTRAIN_CAMVID") or REPO.parents[0] / "shared/datasets/camvid")
    return path if (path / "train").is_dir() and (path / "val").is_dir() else None


def timed_fit(config, reports_file: Path, name: str) -> dict:
    """One Ray Train run of raytrain's own worker loop; returns rank 0's reports, each with the
    driver-clock wall time of its epoch, and the run's total wall time (start-up included)."""
    import time

    import ray.train

    from raytrain.data.manifest import read_manifest
    from raytrain.launch.trainer import make_trainer

    class ReportClock(ray.train.UserCallback):
        """Runs in the Train controller, another process: appends each report (time + rank 0's metrics) to a file."""

        def after_report(self, run_context, metrics, checkpoint):
            with open(reports_file, "a") as out:
                out.write(json.dumps({"time": time.time(), **metrics[0]}) + "\n")

    reports_file.unlink(missing_ok=True)
    started_wall, started = time.time(), time.perf_counter()
    run = make_trainer(config, read_manifest(config.data.path), storage_path=config.train.storage_path, name=name,
                       callbacks=[ReportClock()])
    run.fit()
    total = time.perf_counter() - started
    reports = [json.loads(line) for line in reports_file.read_text().splitlines()]
    times = [started_wall] + [report["time"] for report in reports]
    return {
        "images_per_s": [report["images_per_s"] for report in reports],
        "epoch_s": [later - earlier for earlier, later in zip(times, times[1:])],
        "total_s": total,
        "reports": reports,
    }


def steady_summary(runs: list[dict]) -> dict:
    """Medians over repeats of each run's epochs 2..E (steady state) and of its first epoch."""
    steady = [median(run["images_per_s"][1:]) for run in runs]
    return {
        "steady_images_per_s_median": round(median(steady), 2),
        "steady_images_per_s_per_repeat": [round(v, 2) for v in steady],
        "first_epoch_images_per_s_median": round(median(run["images_per_s"][0] for run in runs), 2),
        "steady_epoch_wall_s_median": round(median(median(run["epoch_s"][1:]) for run in runs), 2),
        "first_epoch_wall_s_median": round(median(run["epoch_s"][0] for run in runs), 2),
        "total_s_median": round(median(run["total_s"] for run in runs), 2),
        # What a run costs beyond its epochs at the steady pace: process and worker start, set-up, teardown.
        "fixed_startup_s_median": round(median(
            run["total_s"] - len(run["epoch_s"]) * median(run["epoch_s"][1:]) for run in runs), 2),
    }
