"""clusters/*.yaml: Ray's own launcher validator accepts each cluster-launcher config (and rejects broken
copies), and each config keeps the properties the platform relies on: token authentication on, the
dashboard bound to 127.0.0.1, torch installed before the project, MLFLOW_TRACKING_URI in the environment
every Ray node starts with. The KubeRay manifest is checked structurally (no cluster needed).

Validation runs the same two steps as `ray up` (`prepare_config`: merge the provider's defaults.yaml;
`validate_config`: Ray's ray-schema.json plus its cross-field checks) and stops before the provider
bootstrap, the only part that needs boto3 / googleapiclient, credentials or network.
"""
import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

ALL_YAML = sorted(CLUSTERS.glob("*.yaml"))
DOCS = {path.name: yaml.safe_load(path.read_text()) for path in ALL_YAML}
LAUNCHER = sorted(name for name, doc in DOCS.items() if isinstance(doc, dict) and "apiVersion" not in doc)
MANIFESTS = sorted(name for name, doc in DOCS.items() if isinstance(doc, dict) and "apiVersion" in doc)

RAY_START = re.compile(r"\bray start\b")
DISABLED_AUTH = re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", re.IGNORECASE)
TORCH_INSTALL = re.compile(r"\bpip3? install\b.*\btorch==\d")
PROJECT_INSTALL = re.compile(r"\bpip3? install\b.*(?:robustune|git\+)")


def check_launcher_config(config: dict) -> dict:
    """Reject `config` as `ray up` would, before anything touches a cloud; return the prepared config.

    The raw file is checked against Ray's schema first: `prepare_config` merges the provider's
    defaults, which would otherwise fill in (and so hide) a missing section."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(name: str) -> dict:
    return copy.deepcopy(DOCS[name])


def start_command(commands: list[str]) -> str:
    found = [command for command in commands if RAY_START.search(command)]
    assert len(found) == 1, f"expected one `ray start` command, got {found}"
    return found[0]


def start_environment(start: str, setup_commands: list[str]) -> dict[str, str]:
    """Variables `ray start` runs with: assignments and exports before it on its command line, and the
    exports of the files it sources there, as written by the node's setup commands (echo ... > file)."""
    prefix = RAY_START.split(start, maxsplit=1)[0]
    env = dict(re.findall(r"(?:^|[\s;&(])(?:export\s+)?([A-Z_][A-Z0-9_]*)=([^\s;&]+)", prefix))
    for sourced in re.findall(r"(?:\bsource|(?:^|[\s;&])\.)\s+(\S+)", prefix):
        for command in setup_commands:
            for name, value, target in re.findall(
                    r"echo\s+'export\s+([A-Z_][A-Z0-9_]*)=([^']*)'\s*>>?\s*(\S+)", command):
                if target == sourced:
                    env[name] = value
    return env


def test_the_expected_cluster_files_exist():
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"} <= set(LAUNCHER)
    assert "kuberay.yaml" in MANIFESTS
    assert (CLUSTERS / "README.md").is_file()


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_validator_without_cloud_sdks(name, monkeypatch):
    # A None entry makes `import boto3` (etc.) raise ImportError: validation must not need them.
    for module in ("boto3", "botocore", "googleapiclient", "google.oauth2", "azure"):
        monkeypatch.setitem(sys.modules, module, None)
    prepared = check_launcher_config(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_keeps_token_auth_on(name):
    text = (CLUSTERS / name).read_text()
    assert not DISABLED_AUTH.search(text), f"{name} switches Ray token authentication off"
    prepared = check_launcher_config(load(name))
    for kind in ("head", "worker"):
        start = start_command(prepared[f"{kind}_start_ray_commands"])
        env = start_environment(start, prepared[f"{kind}_setup_commands"])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: {kind} `ray start` lacks RAY_AUTH_MODE=token"
    # Every node (and the client that ran `ray up`) shares the token file generated with
    # `ray get-auth-token --generate`.
    assert any(remote.rstrip("/").endswith(".ray/auth_token") for remote in prepared["file_mounts"]), \
        f"{name} does not mount the Ray auth token on the nodes"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_binds_the_dashboard_to_localhost(name):
    prepared = check_launcher_config(load(name))
    head = start_command(prepared["head_start_ray_commands"])
    assert "--head" in head
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", head), f"{name}: dashboard not on 127.0.0.1"
    assert "0.0.0.0" not in (CLUSTERS / name).read_text()


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_installs_torch_before_the_project(name):
    prepared = check_launcher_config(load(name))
    for kind in ("head", "worker"):
        commands = prepared[f"{kind}_setup_commands"]  # setup_commands merged in front by prepare_config
        torch_at = [i for i, command in enumerate(commands) if TORCH_INSTALL.search(command)]
        project_at = [i for i, command in enumerate(commands) if PROJECT_INSTALL.search(command)]
        assert torch_at and project_at, f"{name}: {kind} nodes must install a pinned torch and the project"
        assert torch_at[0] < project_at[0], f"{name}: {kind} nodes install the project before torch"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_the_mlflow_tracking_uri_to_ray(name):
    prepared = check_launcher_config(load(name))
    for kind in ("head", "worker"):
        start = start_command(prepared[f"{kind}_start_ray_commands"])
        uri = start_environment(start, prepared[f"{kind}_setup_commands"]).get("MLFLOW_TRACKING_URI", "")
        # A shared tracking server: a file or SQLite store on one node would split the runs up.
        assert re.match(r"https?://\S+", uri), f"{name}: {kind} `ray start` has no MLFLOW_TRACKING_URI server"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_runs_the_clients_ray_version(name):
    config = load(name)
    image = config.get("docker", {}).get("image", "")
    pinned = re.search(r"ray\[[^\]]*\]==([\w.]+)", " ".join(config.get("setup_commands", [])))
    versions = {re.sub(r"-.*", "", image.rsplit(":", 1)[-1])} if image else set()
    versions |= {pinned.group(1)} if pinned else set()
    assert versions == {ray.__version__}, f"{name}: cluster Ray {versions} vs client Ray {ray.__version__}"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_configs_autoscale_gpu_workers_from_zero(name):
    prepared = check_launcher_config(load(name))
    workers = {key: node for key, node in prepared["available_node_types"].items()
               if key != prepared["head_node_type"]}
    assert workers
    for node in workers.values():
        assert node["min_workers"] == 0 < node["max_workers"] <= prepared["max_workers"]
    if prepared["provider"]["type"] == "gcp":
        for node in workers.values():
            assert node["resources"].get("GPU", 0) >= 1
            assert node["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1
            assert node["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    else:
        assert all(re.match(r"(g|p)\d", node["node_config"]["InstanceType"]) for node in workers.values())


# --- the validator is able to fail --------------------------------------------------------------------


def _unknown_top_level_key(config):
    config["max_worker"] = 4  # typo of max_workers


def _no_provider(config):
    del config["provider"]


def _node_type_without_resources(config):
    del config["available_node_types"][config["head_node_type"]]["resources"]


def _head_type_not_defined(config):
    config["head_node_type"] = "no_such_node_type"


def _negative_max_workers(config):
    config["max_workers"] = -1


@pytest.mark.parametrize("break_it, error, says", [
    (_unknown_top_level_key, jsonschema.ValidationError, "max_worker"),
    (_no_provider, jsonschema.ValidationError, "provider"),
    (_node_type_without_resources, jsonschema.ValidationError, "resources"),
    (_head_type_not_defined, ValueError, "head_node_type"),
    (_negative_max_workers, jsonschema.ValidationError, "-1"),
])
def test_broken_launcher_config_is_rejected(break_it, error, says):
    config = load("aws-gpu.yaml")
    check_launcher_config(copy.deepcopy(config))  # the intact file passes ...
    break_it(config)
    with pytest.raises(error, match=re.escape(says)):  # ... the broken copy does not
        check_launcher_config(config)


def test_unknown_key_is_caught_by_rays_validate_config_itself():
    # Not only by the raw-schema pre-check: the same prepare/validate steps as `ray up` reject it.
    config = load("gcp-gpu.yaml")
    config["setup_command"] = ["echo typo"]
    prepared = prepare_config(config)
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        validate_config(prepared)


# --- KubeRay -----------------------------------------------------------------------------------------


@pytest.fixture
def raycluster():
    return yaml.safe_load((CLUSTERS / "kuberay.yaml").read_text())


def _pod_templates(spec):
    return [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _quantity(value) -> float:
    match = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]
    return float(match.group(1)) * scale


def test_kuberay_manifest_is_a_raycluster(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"]
    assert raycluster["spec"]["rayVersion"] == ray.__version__


def test_kuberay_names_an_image_for_head_and_workers(raycluster):
    spec = raycluster["spec"]
    templates = _pod_templates(spec)
    for template in templates:
        image = _containers(template)[0]["image"]
        # Explicit tag, never an implicit :latest.
        assert re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", image) and not image.endswith(":latest"), image


def test_kuberay_head_requests_cpu_and_memory(raycluster):
    resources = _containers(raycluster["spec"]["headGroupSpec"]["template"])[0]["resources"]
    for key in ("cpu", "memory"):
        assert _quantity(resources["requests"][key]) > 0
        assert _quantity(resources["limits"][key]) >= _quantity(resources["requests"][key])
    assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_kuberay_worker_group_requests_gpus_and_autoscales(raycluster):
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 == group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] > 0
        resources = _containers(group["template"])[0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        if "nvidia.com/gpu" in resources.get("requests", {}):  # extended resources: requests == limits
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_kuberay_passes_mlflow_uri_from_a_configmap_or_secret(raycluster):
    spec = raycluster["spec"]
    templates = _pod_templates(spec)
    for template in templates:
        env = {item["name"]: item for item in _containers(template)[0].get("env", [])}
        source = env["MLFLOW_TRACKING_URI"].get("valueFrom", {})
        assert "configMapKeyRef" in source or "secretKeyRef" in source


def test_kuberay_keeps_token_auth_on_and_the_head_private(raycluster):
    text = (CLUSTERS / "kuberay.yaml").read_text()
    assert not DISABLED_AUTH.search(text)
    spec = raycluster["spec"]
    if spec.get("authOptions", {}).get("mode") != "token":
        for template in _pod_templates(spec):
            env = {item["name"]: item.get("value") for item in _containers(template)[0].get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" in env
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


# --- storage that every node sees --------------------------------------------------------------------
SHARED_STORAGE = {"aws-gpu.yaml": r"s3://[\w.\-]+/\S*", "gcp-gpu.yaml": r"gs://[\w.\-]+/\S*",
                  "local.yaml": r"/\S+"}  # on-prem: an absolute path on the NFS export every host mounts


@pytest.mark.parametrize("name", sorted(SHARED_STORAGE))
def test_launcher_config_sets_storage_every_node_sees(name):
    """The nodes share no disk: ROBUSTUNE_OUTPUT_DIR (next to the MLflow URI) is a bucket or a shared path on
    every node, never the default ./runs of each node's own disk."""
    from robustune.storage import location

    prepared = check_launcher_config(load(name))
    for kind in ("head", "worker"):
        start = start_command(prepared[f"{kind}_start_ray_commands"])
        env = start_environment(start, prepared[f"{kind}_setup_commands"])
        storage = env.get("ROBUSTUNE_OUTPUT_DIR", "")
        assert re.fullmatch(SHARED_STORAGE[name], storage), f"{name}: {kind} `ray start` has storage {storage!r}"
        assert str(location(storage)) == storage  # robustune reads it back as the same place
        assert "MLFLOW_TRACKING_URI" in env


def test_kuberay_pods_mount_the_same_storage_and_point_robustune_at_it(raycluster):
    for template in _pod_templates(raycluster["spec"]):
        container = _containers(template)[0]
        env = {item["name"]: item for item in container["env"]}
        assert env["ROBUSTUNE_OUTPUT_DIR"]["valueFrom"]["configMapKeyRef"]["key"] == "ROBUSTUNE_OUTPUT_DIR"
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        assert volumes["robustune-storage"]["persistentVolumeClaim"]["claimName"] == "robustune-storage"
        assert mounts["robustune-storage"] == "/mnt/robustune"
    header = (CLUSTERS / "kuberay.yaml").read_text()
    assert "--from-literal=ROBUSTUNE_OUTPUT_DIR=/mnt/robustune/" in header and "ReadWriteMany" in header
