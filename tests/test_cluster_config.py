"""cluster.yaml and the KubeRay RayJob: valid for the tools that read them, and they run this package."""
import shlex
from pathlib import Path

import pytest
import yaml

from raytrain.config import load_config

REPO = Path(__file__).resolve().parents[1]
GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((REPO / "deploy/kuberay-rayjob.yaml").read_text())


def test_cluster_yaml_passes_the_autoscalers_own_validation(cluster):
    """What `ray up` does before it contacts AWS: merge the provider defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_schema_validation_catches_a_misspelt_key(cluster):
    """The check above can fail: the schema Ray ships rejects unknown keys."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = prepare_config(cluster)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(broken)


def test_head_has_no_gpu_and_takes_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # no trial or DDP worker lands on the head
    assert not head["node_config"]["InstanceType"].startswith(GPU_INSTANCE_FAMILIES)
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is never a spot node


def test_an_autoscaling_gpu_worker_type(cluster):
    workers = {name: spec for name, spec in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    gpu_types = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type offers a GPU"
    for name, spec in gpu_types.items():
        assert spec["node_config"]["InstanceType"].split(".")[0] in GPU_INSTANCE_FAMILIES, name
        assert 0 <= spec["min_workers"] < spec["max_workers"] <= cluster["max_workers"], name


def test_every_node_installs_this_package_from_the_synced_repository(cluster):
    mounts = {remote: (REPO / local).resolve() for remote, local in cluster["file_mounts"].items()}
    repo_mounts = [remote for remote, local in mounts.items() if local == REPO]
    assert repo_mounts, "the repository (with tune_configs/) is not mounted on the nodes"
    assert (REPO / "tune_configs").is_dir()
    installs = [shlex.split(command) for command in cluster["setup_commands"] if "pip install" in command]
    installed = {args[-1] for args in installs}
    assert installed & set(repo_mounts), f"setup_commands install {installed}, not the mounted repository"
    assert ".gitignore" in cluster["rsync_filter"]  # not the local .venv or generated data


def test_kitti_search_config_loads_with_cluster_storage():
    config = load_config(REPO / "tune_configs/kitti_search.yaml", ["train.storage_path=s3://bucket/raytrain"])
    assert config.train.storage_path == "s3://bucket/raytrain"
    assert config.train.use_gpu


def test_a_gpu_node_fits_a_kitti_search_worker_and_its_data_tasks(cluster, rayjob):
    """The head has no CPUs for Ray Data, so each GPU node needs one beyond the DDP worker's."""
    train = load_config(REPO / "tune_configs/kitti_search.yaml").train
    gpu_node = cluster["available_node_types"]["gpu_worker"]["resources"]
    assert gpu_node["GPU"] >= train.gpus_per_worker and gpu_node["CPU"] >= train.cpus_per_worker + 1
    (pod,) = _containers(rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0])
    assert float(pod["resources"]["limits"]["cpu"]) >= train.cpus_per_worker + 1


def _containers(group):
    return group["template"]["spec"]["containers"]


def test_rayjob_has_a_cpu_head_and_an_autoscaling_gpu_group(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in _containers(head))
    (gpu_group,) = [g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in _containers(g)[0]["resources"]["limits"]]
    assert int(_containers(gpu_group)[0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert 0 <= gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    images = {c["image"] for g in [head, *cluster["workerGroupSpecs"]] for c in _containers(g)}
    assert len(images) == 1  # one Ray version everywhere
    assert cluster["rayVersion"] in images.pop()


def test_rayjob_installs_this_package_and_its_entrypoint_config_loads(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert any(requirement.startswith("raytrain") for requirement in runtime_env["pip"])
    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:2] == ["raytrain", "tune"]
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    config = load_config(REPO / args[2], overrides)
    assert config.train.storage_path.startswith("s3://")
