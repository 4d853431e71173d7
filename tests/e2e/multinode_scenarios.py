"""Multi-node Ray scenarios on one machine, each in a process of its own (ray.init is once per process).

    python -m tests.e2e.multinode_scenarios {node_loss|search_node_loss|batch_predict} WORKDIR

Starts a real cluster with ray.cluster_utils.Cluster: a head with 1 CPU (Ray Data tasks, the Tune
trial) and worker nodes node_a, node_b[, node_c] with 2 CPUs and a custom resource of their own name.
Every DDP worker asks for 2 CPUs, so no two share a node and none fits on the head. The scenario
writes what happened to WORKDIR/result.json; tests/test_multinode.py judges it. Run with RAY_TMPDIR
set to a private directory so that this cluster is invisible to other Ray drivers on the machine.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import ray
import ray.train
from ray.cluster_utils import Cluster

from raytrain import experiments
from raytrain.data.manifest import read_manifest
from raytrain.launch.trainer import TRAIN_RUN_NAME, make_trainer
from raytrain.launch.tuner import run_search
from raytrain.checkpoints import METRICS_FILE
from raytrain.data.shards import write_shards
from raytrain.data.synthetic import write_synthetic_kitti
from raytrain.launch.trainer import train_worker
from tests.helpers import free_port, tiny_config, wait_for

TIMEOUT_S = 480  # a guard against hanging, not a speed goal


def start_cluster(node_names: list[str], cpus_per_node: int = 2) -> tuple[Cluster, dict]:
    # A dashboard port of its own: the State API (Ray Train's cleanup, list_actors) lives there.
    # A killed node refuses the GCS's health checks at once: 3 refusals a second apart declare it
    # dead (Ray's default, 5 checks 3 s apart, is 10 s more a scenario); a slow node still has the
    # default 10 s to answer each check.
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": free_port(),
                                                            "_system_config": health})
    nodes = {name: cluster.add_node(num_cpus=cpus_per_node, resources={name: 1}) for name in node_names}
    cluster.wait_for_nodes()
    cluster.connect()
    return cluster, nodes


def node_names_by_id(names: list[str]) -> dict[str, str]:
    by_id = {}
    for node in ray.nodes():
        custom = [name for name in names if name in node["Resources"]]
        by_id[node["NodeID"]] = custom[0] if custom else "head"
    return by_id


def tiny_shards(workdir: Path) -> Path:
    images = write_synthetic_kitti(workdir / "synth", 24, seed=1, size=(64, 32))
    write_shards(images, "kitti", workdir / "shards", val_fraction=0.25, rows_per_shard=4)
    return workdir / "shards"


def recording(log: Path):
    """train_worker that first appends (rank, node, epochs already done) to `log`: one line per worker start."""

    def train_and_record(config_dict: dict) -> None:
        resumed_from = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as directory:
                resumed_from = json.loads((Path(directory) / METRICS_FILE).read_text())["epoch"]
        line = {"rank": ray.train.get_context().get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
                "resumed_from": resumed_from}
        with open(log, "a") as out:
            out.write(json.dumps(line) + "\n")
        train_worker(config_dict)

    return train_and_record


def checkpoint_epochs(run_dir: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["epoch"] for p in run_dir.glob(f"checkpoint_*/{METRICS_FILE}"))


def registered_epoch(run_dir: Path) -> int:
    """Epochs in the run's latest checkpoint as Ray Train's controller has registered it (what a
    restart resumes from); a checkpoint directory alone may not be registered yet."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return 0
    return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))


def in_background(function) -> dict:
    """Run `function` in a thread; its return value (or error) lands in the returned dict."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except Exception as err:  # reported in result.json, judged by the test
            outcome["error"] = repr(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def node_loss(workdir: Path) -> dict:
    """Kill the node of rank 0 once the first checkpoint exists; node_c is the spare."""
    cluster, nodes = start_cluster(["node_a", "node_b", "node_c"])
    names = node_names_by_id(list(nodes))
    storage, log = workdir / "storage", workdir / "workers.jsonl"
    epochs = 4
    config = tiny_config(tiny_shards(workdir), storage, **{"train.epochs": epochs, "train.cpus_per_worker": 2,
                                                           "train.checkpoints_to_keep": 10, "train.max_failures": 1})
    run_dir = storage / "node_loss"

    def kill_rank0_node_after_first_checkpoint():
        wait_for(lambda: registered_epoch(run_dir) >= 1, "the first registered checkpoint", TIMEOUT_S)
        rank0 = next(w for w in map(json.loads, log.read_text().splitlines()) if w["rank"] == 0)
        victim = names[rank0["node_id"]]
        registered = registered_epoch(run_dir)
        cluster.remove_node(nodes[victim], allow_graceful=False)
        return {"node": victim, "registered_epoch_before": registered}

    kill = in_background(kill_rank0_node_after_first_checkpoint)
    result = make_trainer(config, read_manifest(config.data.path), storage_path=str(storage), name="node_loss", train_fn=recording(log)).fit()
    kill["thread"].join(timeout=TIMEOUT_S)
    cluster_shutdown(cluster)
    return {
        "epochs": epochs,
        "error": repr(result.error) if result.error else None,
        "final_epoch": result.metrics.get("epoch"),
        "checkpoint_epochs": checkpoint_epochs(run_dir),
        "killed": kill.get("value"),
        "kill_error": kill.get("error"),
        "workers": [dict(w, node=names[w["node_id"]]) for w in map(json.loads, log.read_text().splitlines())],
    }


def search_node_loss(workdir: Path) -> dict:
    """A 2-trial FIFO search, one trial at a time; a node of the running trial dies after trial 1 has finished."""
    from ray.util.state import list_actors

    # 3 CPUs a node: still one 2-CPU DDP worker per node, with room beside it for a trial's
    # 0.01-CPU driver, which would otherwise block a whole node from the restarted worker group.
    cluster, nodes = start_cluster(["node_a", "node_b", "node_c"], cpus_per_node=3)
    names = node_names_by_id(list(nodes))
    storage = workdir / "storage"
    epochs = 2
    config = tiny_config(tiny_shards(workdir), storage, **{
        "name": "search", "train.epochs": epochs, "train.cpus_per_worker": 2, "train.max_failures": 1,
        "train.checkpoints_to_keep": 10, "search.scheduler.name": "fifo", "search.max_concurrent_trials": 1,
        "search.space": {"optim.lr": {"grid": [1e-3, 3e-3]}},
    })
    experiment = Path(experiments.create_experiment(config, "tune"))

    def finished_and_running_trials():
        progress = {t.name: registered_epoch(t / TRAIN_RUN_NAME) for t in experiment.glob("trial_*")}
        finished = [t for t, epoch in progress.items() if epoch == epochs]
        running = [t for t, epoch in progress.items() if 0 < epoch < epochs]
        return (finished, running) if finished and running else None

    def kill_a_node_of_a_later_trial():
        finished, running = wait_for(finished_and_running_trials, "a finished trial and a later one with a checkpoint", TIMEOUT_S)
        files = {str(p): p.stat().st_size for t in finished
                 for p in (experiment / t / TRAIN_RUN_NAME).glob("checkpoint_*/*")}
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        victim = next(names[w.node_id] for w in workers if names.get(w.node_id, "head") != "head")
        cluster.remove_node(nodes[victim], allow_graceful=False)
        return {"node": victim, "finished_trials": finished, "running_trials": running, "finished_files": files}

    kill = in_background(kill_a_node_of_a_later_trial)
    grid = run_search(config, read_manifest(config.data.path), str(experiment))
    kill["thread"].join(timeout=TIMEOUT_S)
    killed = kill.get("value") or {}
    files_after = {path: Path(path).stat().st_size for path in killed.get("finished_files", {}) if Path(path).is_file()}
    trials = [{"trial": Path(r.path).name, "error": repr(r.error) if r.error else None,
               "final_epoch": (r.metrics or {}).get("epoch"),
               "checkpoint_epochs": checkpoint_epochs(Path(r.path) / TRAIN_RUN_NAME)} for r in grid]
    cluster_shutdown(cluster)
    return {
        "epochs": epochs,
        "killed": {k: v for k, v in killed.items() if k != "finished_files"},
        "kill_error": kill.get("error"),
        "finished_files_before": len(killed.get("finished_files", {})),
        "finished_files_unchanged": files_after == killed.get("finished_files"),
        "trials": trials,
    }


def batch_predict(workdir: Path) -> dict:
    """20 images and an unreadable file, predicted by two model actors of 2 CPUs: one on each worker node."""
    from ray.util.state import list_actors

    import raytrain
    from tests.helpers import checkpoint
    from tests.helpers import write_images

    cluster, nodes = start_cluster(["node_a", "node_b"])
    write_images(workdir / "images", 20, (24, 40))
    (workdir / "images" / "broken.png").write_bytes(b"not a png")
    error, summary = None, None
    try:
        summary = raytrain.predict_folder(checkpoint(workdir), workdir / "images", workdir / "masks", workers=2,
                                          cpus_per_worker=2)
    except Exception as err:  # reported in result.json, judged by the test
        error = repr(err)
    names = node_names_by_id(list(nodes))

    def nodes_of_model_actors() -> list[str]:
        # Where the pool's two model actors ran, alive or ended (events reach the State API a moment
        # late). Not where their tasks ran: on a loaded machine one actor can be ready seconds before
        # the other and predict all 20 images alone. The address: other Ray clusters here must not answer.
        actors = list_actors(address=cluster.address, filters=[("class_name", "=", "MapWorker(MapBatches(ModelActor))")])
        return sorted(names[actor.node_id] for actor in actors if actor.node_id)

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: len(nodes_of_model_actors()) == 2, "both model actors' nodes", 30)
    actor_nodes = nodes_of_model_actors()
    cluster_shutdown(cluster)
    return {
        "error": error,
        "actor_nodes": actor_nodes,
        "written": summary and summary.written,
        "already_done": summary and summary.already_done,
        "unreadable": list(summary.unreadable) if summary else None,
    }


def cluster_shutdown(cluster: Cluster) -> None:
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    started = time.monotonic()
    scenarios = {"node_loss": node_loss, "search_node_loss": search_node_loss, "batch_predict": batch_predict}
    outcome = scenarios[scenario](workdir)
    outcome["seconds"] = round(time.monotonic() - started, 1)
    (workdir / "result.json").write_text(json.dumps(outcome, indent=2))
