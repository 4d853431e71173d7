"""cluster.yaml and the KubeRay RayJob: valid for the tools that read them, they run this package,
and they are locked down by default (README "Security of a deployment")."""
import json
import os
import re
import shlex
import subprocess

import pytest
import yaml

from raytrain.config import load_config, shipped_configs
from tests.helpers import REPO

GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def k8s_objects():
    """Every object in deploy/kuberay-rayjob.yaml, by kind (a list per kind)."""
    objects = {}
    for document in yaml.safe_load_all((REPO / "deploy/kuberay-rayjob.yaml").read_text()):
        objects.setdefault(document["kind"], []).append(document)
    return objects


@pytest.fixture(scope="module")
def rayjob(k8s_objects):
    (job,) = k8s_objects["RayJob"]
    return job


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


def _ray_pod_templates(rayjob):
    """(template, labels KubeRay adds) for the head and every worker group of the RayJob's cluster."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    yield cluster["headGroupSpec"]["template"], {"ray.io/node-type": "head"}
    for group in cluster["workerGroupSpecs"]:
        yield group["template"], {"ray.io/node-type": "worker"}


def _pod_labels(template, added):
    return {**template.get("metadata", {}).get("labels", {}), **added}


def _selects(selector, labels):
    """Whether a Kubernetes label selector (matchLabels only: this file uses nothing else) matches."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_rayjob_runs_the_package_from_its_image(rayjob):
    """The entrypoint's config ships inside the package, so the image alone runs the job."""
    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:2] == ["raytrain", "tune"]
    assert args[2] in shipped_configs()
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    config = load_config(args[2], overrides)
    assert config.train.storage_path.startswith("s3://") and config.data.path.startswith("s3://")


def test_rayjob_downloads_no_code_and_pins_its_image(rayjob):
    """No branch zip or pip install at run time: the code is an image referenced by digest."""
    runtime_env = yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML") or "{}") or {}
    assert not {"working_dir", "py_modules", "pip", "uv", "conda", "container", "image_uri"} & set(runtime_env)
    ray_version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    for template, _ in _ray_pod_templates(rayjob):
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert "@sha256:" in image, f"{image}: not pinned by digest"
            assert not image.split("@")[0].endswith(":latest")
    # The image is built from this repository with the same Ray.
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(ray_version)}-", dockerfile, re.M)
    assert re.search(rf'pip install .*/tmp/raytrain-src "ray\[[a-z,]+\]=={re.escape(ray_version)}"', dockerfile)
    assert re.search(r"^COPY .*raytrain /tmp/raytrain-src/raytrain$", dockerfile, re.M)
    assert "http" not in "".join(line for line in dockerfile.splitlines() if line.startswith(("RUN", "ADD", "    ")))


def test_rayjob_enables_ray_token_authentication(rayjob):
    """KubeRay (>= 1.5.1) makes a token Secret and sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every
    Ray container and the submitter; Ray >= 2.52 then refuses requests without it."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(int(part) for part in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
    # The Ray installed here has the mode that the cluster is told to use.
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR
    from ray._raylet import AuthenticationMode

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE" and hasattr(AuthenticationMode, "TOKEN")


def test_network_policies_admit_only_this_jobs_pods_and_the_job_api_clients(k8s_objects, rayjob):
    policies = k8s_objects.get("NetworkPolicy", [])
    assert policies, "no NetworkPolicy: every pod of the Kubernetes cluster reaches the Ray ports"
    own_labels = None
    for template, added in _ray_pod_templates(rayjob):
        labels = _pod_labels(template, added)
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert selecting, f"no NetworkPolicy selects the Ray pods labelled {labels}"
        assert all("Ingress" in p["spec"]["policyTypes"] for p in selecting)
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every pod"
                for peer in rule["from"]:
                    assert "ipBlock" not in peer
                    assert peer.get("podSelector", {}).get("matchLabels"), f"{peer}: admits a whole namespace"
                    if "namespaceSelector" in peer:
                        assert peer["namespaceSelector"].get("matchLabels"), f"{peer}: any namespace"
                    if _selects(peer["podSelector"], labels) and "namespaceSelector" not in peer:
                        own_labels = peer["podSelector"]["matchLabels"]
                        continue  # the job's own Ray pods: any port
                    # Anyone else: the head's dashboard/job API only.
                    assert added["ray.io/node-type"] == "head", f"{policy['metadata']['name']} admits {peer} to workers"
                    assert rule.get("ports") == [{"protocol": "TCP", "port": 8265}], rule
    assert own_labels, "the Ray pods do not admit each other"
    # The own-pods selector is specific to this job, not every Ray pod of the namespace.
    assert "ray.io/is-ray-node" not in own_labels and set(own_labels) - {"ray.io/node-type"}
    # The two outside clients: the submitter Job (named after the RayJob) and the operator.
    peers = [peer for p in policies for rule in p["spec"].get("ingress", []) for peer in rule["from"]]
    submitter = {"batch.kubernetes.io/job-name": rayjob["metadata"]["name"]}
    assert any(peer["podSelector"]["matchLabels"] == submitter for peer in peers)
    assert any(peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
               and "namespaceSelector" in peer for peer in peers)


def test_head_does_not_expose_the_ray_client_port(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    ports = {port["containerPort"] for c in _containers(head) for port in c.get("ports", [])}
    assert 10001 not in ports


def test_ray_pods_get_s3_through_an_irsa_service_account(k8s_objects, rayjob):
    (account,) = k8s_objects["ServiceAccount"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::[A-Z0-9_]+:role/[\w+=,.@-]+", role), role
    for template, added in _ray_pod_templates(rayjob):
        assert template["spec"].get("serviceAccountName") == account["metadata"]["name"], added
        if added["ray.io/node-type"] == "worker":  # only the head's autoscaler calls the Kubernetes API
            assert template["spec"].get("automountServiceAccountToken") is False


def test_ray_pods_run_unprivileged(rayjob):
    for template, added in _ray_pod_templates(rayjob):
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, added
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", added
        for container in template["spec"]["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, container["name"]
            assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            assert not context.get("privileged", False)
            assert not context.get("capabilities", {}).get("add")
    autoscaler = rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"]["drop"] == ["ALL"]
    # The image's own user is numeric and not root, as runAsNonRoot checks.
    assert re.search(r"^USER 1000(:\d+)?$", (REPO / "deploy/Dockerfile").read_text(), re.M)


# cluster.yaml: what `ray up` would do in AWS, without calling AWS.

@pytest.fixture
def aws_config():
    """Ray's AWS bootstrap module (ray.autoscaler._private.aws.config), what `ray up` runs first.
    The steps tested here return before any AWS call; the ones that would call AWS are replaced by
    `_fail_if_called`."""
    from ray.autoscaler._private.aws import config

    return config


def _fail_if_called(name):
    def called(*args, **kwargs):
        raise AssertionError(f"`ray up` would call {name}")
    return called


def test_ray_up_creates_no_security_group_and_no_open_ssh_rule(cluster, aws_config, monkeypatch):
    """Ray's own group allows SSH from 0.0.0.0/0 (and provider.security_group.IpPermissions only add
    rules to it). With SecurityGroupIds on every node type, Ray neither creates nor changes a group."""
    from ray.autoscaler._private.util import prepare_config

    assert {"CidrIp": "0.0.0.0/0"} in aws_config._create_default_ssh_inbound_rules()[0]["IpRanges"]
    monkeypatch.setattr(aws_config, "_upsert_security_groups", _fail_if_called("_upsert_security_groups"))
    configured = aws_config._configure_security_group(prepare_config(cluster))
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in configured["available_node_types"].values()}
    assert len(groups) == 1  # one group: the nodes reach each other through its self-referencing rule
    assert "0.0.0.0/0" not in json.dumps(cluster.get("provider", {}).get("security_group", {}))


def _run_security_group_script(tmp_path, *args):
    """deploy/aws/security-group.sh with a stand-in `aws` that records its arguments."""
    fake_aws = tmp_path / "bin" / "aws"
    fake_aws.parent.mkdir(exist_ok=True)
    fake_aws.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$AWS_CALLS"; echo "---" >> "$AWS_CALLS"\n'
                        '[[ $2 == create-security-group ]] && echo sg-0123456789abcdef0; exit 0\n')
    fake_aws.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{fake_aws.parent}:{os.environ['PATH']}", "AWS_CALLS": str(calls)}
    result = subprocess.run(["bash", str(REPO / "deploy/aws/security-group.sh"), *args],
                            env=env, capture_output=True, text=True)
    recorded = calls.read_text().split("---\n")[:-1] if calls.exists() else []
    return result, [call.splitlines() for call in recorded]


def test_security_group_script_opens_ssh_to_the_given_cidr_only(tmp_path):
    result, calls = _run_security_group_script(tmp_path, "vpc-0abc", "203.0.113.7/32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sg-0123456789abcdef0"
    (create, authorize) = calls
    assert create[:2] == ["ec2", "create-security-group"]
    assert authorize[:2] == ["ec2", "authorize-security-group-ingress"]
    rules = authorize[authorize.index("--ip-permissions") + 1:]
    assert rules == [
        "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-0123456789abcdef0,Description=between-the-cluster-nodes}]",
        "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.7/32,Description=ssh-for-ray-up}]",
    ]
    for i, too_wide in enumerate(["0.0.0.0/0", "10.0.0.0/4", "not-a-cidr"]):
        (tmp_path / str(i)).mkdir()
        result, calls = _run_security_group_script(tmp_path / str(i), "vpc-0abc", too_wide)
        assert result.returncode != 0 and calls == [], too_wide


def test_no_node_gets_ray_autoscaler_v1(cluster, aws_config, monkeypatch):
    """Without a head profile Ray creates ray-autoscaler-v1 (AmazonEC2FullAccess and AmazonS3FullAccess).
    Here each node type names its own profile: the head's for the autoscaler, the workers' for S3."""
    from ray.autoscaler._private.util import prepare_config

    for name in ("_get_instance_profile", "_get_role", "_client", "_resource"):
        monkeypatch.setattr(aws_config, name, _fail_if_called(name))
    aws_config._configure_iam_role(prepare_config(cluster))
    profiles = {name: spec["node_config"]["IamInstanceProfile"]["Arn"]
                for name, spec in cluster["available_node_types"].items()}
    assert not any("ray-autoscaler" in arn for arn in profiles.values()), profiles
    head = profiles.pop(cluster["head_node_type"])
    assert head not in profiles.values()  # workers do not get the autoscaler's EC2 rights


def _statements(path):
    return json.loads((REPO / path).read_text())["Statement"]


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_the_worker_policy_is_the_bucket_and_nothing_else():
    statements = _statements("deploy/aws/s3-bucket-policy.json")
    for statement in statements:
        assert statement["Effect"] == "Allow"
        for action in _as_list(statement["Action"]):
            assert action.startswith("s3:") and "*" not in action, action
        for resource in _as_list(statement["Resource"]):
            assert resource in ("arn:aws:s3:::YOUR_BUCKET", "arn:aws:s3:::YOUR_BUCKET/*"), resource


def test_the_head_policy_is_what_the_autoscaler_calls(cluster):
    statements = _statements("deploy/aws/ray-head-policy.json")
    actions = {action for s in statements for action in _as_list(s["Action"])}
    assert not any(action.endswith("*") for action in actions), actions
    # The EC2 calls AWSNodeProvider makes with cache_stopped_nodes false (no stop/start), and PassRole.
    assert cluster["provider"]["cache_stopped_nodes"] is False
    assert actions == {"ec2:DescribeInstances", "ec2:DescribeImages", "ec2:RunInstances", "ec2:CreateTags",
                       "ec2:TerminateInstances", "iam:PassRole"}
    (terminate,) = [s for s in statements if "ec2:TerminateInstances" in _as_list(s["Action"])]
    assert terminate["Condition"]["StringEquals"] == {"aws:ResourceTag/ray-cluster-name": cluster["cluster_name"]}
    (pass_role,) = [s for s in statements if s["Action"] == "iam:PassRole"]
    worker_profile = cluster["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"]
    assert pass_role["Resource"].rsplit("/", 1)[1] == worker_profile.rsplit("/", 1)[1]  # role named as its profile


def test_every_node_starts_ray_with_token_authentication(cluster):
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key]
              if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in command for command in starts), starts
    # The token reaches every node where Ray looks for it (the head copies file_mounts to the workers).
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert cluster["auth"]["ssh_user"] == "ubuntu"
