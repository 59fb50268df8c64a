"""The cluster descriptions (cluster.yaml, deploy/), the image and the cluster preset.

Fast and offline: no cloud, no network, no Ray cluster. The launcher YAMLs are checked against
the JSON schema the installed Ray ships, and through Ray's own preparation and validation
(which need no cloud connection); the design facts of docs/cluster.md are asserted one by one.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

import _draftray_compat  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster.yaml"
GCP = ROOT / "deploy" / "gcp.yaml"
KUBERAY = ROOT / "deploy" / "kuberay-rayjob.yaml"
PRESET = ROOT / "configs" / "sd15-draftplus-cluster.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# GPU node types -> (GPUs per node, the resource that tells the GPU memory apart).
AWS_GPU_TYPES = {"p4d": ("p4d.24xlarge", 8, "A100_40GB"), "p4de": ("p4de.24xlarge", 8, "A100_80GB"), "p5": ("p5.48xlarge", 8, "H100_80GB")}
GCP_GPU_TYPES = {"a2_40gb": ("a2-highgpu-8g", 8, "A100_40GB"), "a2_80gb": ("a2-ultragpu-8g", 8, "A100_80GB")}
# Instance types with EFA and how many network cards (one EFA interface each) AWS documents.
EFA_CARDS = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


# ---- launcher YAMLs: Ray's schema and Ray's own validation ---------------------------------


@pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])
def test_launcher_yaml_matches_rays_schema(path):
    jsonschema.validate(_load(path), _schema())


@pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])
def test_launcher_yaml_passes_rays_prepare_and_validate(path):
    """What `ray up` does before it touches the cloud: merge the provider's defaults, check the
    docker section, fill min/max workers, then validate (schema + head type + worker counts)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(path)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_would_catch_a_mistake():
    """The schema check is not vacuous: an unknown top-level key and a fractional resource fail."""
    bad = _load(AWS)
    bad["head_node"] = bad.pop("head_node_type")  # legacy/unknown shapes must not pass silently
    bad["available_node_types"]["head"]["resources"]["draftray_head"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())


# ---- design facts ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])
def test_head_takes_no_training_and_hosts_the_drivers(path):
    cfg = _load(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["draftray_head"] >= 1000 * 0.001  # room for many 0.001 drivers
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on-demand
    assert "scheduling" not in head["node_config"]


@pytest.mark.parametrize(("path", "types"), [(AWS, AWS_GPU_TYPES), (GCP, GCP_GPU_TYPES)], ids=["aws", "gcp"])
def test_gpu_types_start_at_zero_and_say_their_memory(path, types):
    cfg = _load(path)
    nodes = cfg["available_node_types"]
    assert set(nodes) - {cfg["head_node_type"]} == set(types)
    for name, (machine, gpus, memory_tag) in types.items():
        node = nodes[name]
        nc = node["node_config"]
        assert nc.get("InstanceType", nc.get("machineType")) == machine
        assert node["min_workers"] == 0
        assert 1 <= node["max_workers"] <= cfg["max_workers"]
        assert node["resources"]["GPU"] == gpus
        # One unit per GPU, so ray.resources_per_worker: {TAG: 1} fits gpus workers per node.
        assert node["resources"][memory_tag] == gpus
        other_tags = {t for _, _, t in types.values()} - {memory_tag}
        assert not other_tags & set(node["resources"])


def test_aws_gpu_types_are_spot_with_efa():
    nodes = _load(AWS)["available_node_types"]
    for name, (instance, _, _) in AWS_GPU_TYPES.items():
        nc = nodes[name]["node_config"]
        assert nc["InstanceMarketOptions"]["MarketType"] == "spot"
        nics = nc["NetworkInterfaces"]
        assert len(nics) == EFA_CARDS[instance]
        assert all(n["InterfaceType"] == "efa" for n in nics)
        assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(EFA_CARDS[instance]))
        # Primary on card 0 / device 0, every other interface device 1 (AWS's recommended layout).
        assert [(n["NetworkCardIndex"], n["DeviceIndex"]) for n in nics if n["DeviceIndex"] == 0] == [(0, 0)]
        # Ray refuses SubnetIds/SecurityGroupIds next to NetworkInterfaces; each interface has both.
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(nc)
        assert all(n["SubnetId"] and n["Groups"] for n in nics)
    # The EFA devices reach the container on the workers.
    assert "--device=/dev/infiniband" in _load(AWS)["docker"]["worker_run_options"]


def test_gcp_gpu_types_are_spot():
    nodes = _load(GCP)["available_node_types"]
    for name in GCP_GPU_TYPES:
        scheduling = nodes[name]["node_config"]["scheduling"]
        assert scheduling["provisioningModel"] == "SPOT"
        assert scheduling["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])
def test_dashboard_is_never_public(path):
    cfg = _load(path)
    start = " ".join(cfg["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    assert hosts == ["127.0.0.1"], hosts  # loopback: reached only through `ray dashboard` (SSH)
    assert "0.0.0.0" not in start
    # No security-group rule opens the dashboard / Jobs API port to anyone.
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1), rule


def test_aws_nodes_use_the_users_security_group():
    """Every node type names the user's group, so Ray creates none (its own allows SSH from anywhere)."""
    for node in _load(AWS)["available_node_types"].values():
        nc = node["node_config"]
        groups = nc.get("SecurityGroupIds") or [g for n in nc["NetworkInterfaces"] for g in n["Groups"]]
        assert groups and all(g.startswith("sg-") for g in groups)


@pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])
def test_token_auth_is_on_with_one_token_everywhere(path):
    """`ray start` enables token auth only where a token exists, and all nodes need the same one."""
    cfg = _load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]


@pytest.mark.parametrize("path", [AWS, GCP], ids=["aws", "gcp"])
def test_launchers_run_our_image(path):
    cfg = _load(path)
    assert cfg["docker"]["image"].endswith("/draftray:latest")
    assert cfg["setup_commands"] == []  # the image holds everything


# ---- KubeRay ------------------------------------------------------------------------------


def test_kuberay_rayjob_has_what_kuberay_expects():
    job = _load(KUBERAY)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith(("draftray train configs/", "draftray sweep configs/"))
    assert "sd15-draftplus" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values())  # KubeRay wants strings
    assert params["num-cpus"] == "0"
    assert json.loads(json.loads(params["resources"])) == {"draftray_head": 1000}
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})

    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] == 0
        container = group["template"]["spec"]["containers"][0]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == 8
        tags = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert tags == {"A100_80GB": gpus}


# ---- the cluster preset ---------------------------------------------------------------------


def test_cluster_preset_loads_with_the_cluster_settings():
    from rayjobs.config import load_config

    cfg = load_config(PRESET)
    r = cfg.ray
    assert r.use_gpu is True
    assert r.num_workers == 8
    assert r.storage_path == "s3://YOUR-BUCKET/draftray"
    assert r.driver_resources == {"draftray_head": 0.001}
    assert r.resources_per_worker == {"A100_80GB": 1}
    assert r.max_failures == 3
    # It builds on the SD 1.5 DRaFT+ preset.
    assert cfg.model.name_or_path == load_config(ROOT / "configs" / "sd15-draftplus.yaml").model.name_or_path
    assert cfg.objective.preset == "draftplus"
    # `--sweep` needs a sweep section; 4 trials for a 4-node cluster.
    assert cfg.sweep is not None and len(cfg.sweep.params["objective.kl_coeff"].grid) == 4


def test_cluster_preset_fits_the_cluster():
    """One run's workers fit one node of the type its resources name, and the drivers fit the head."""
    from rayjobs.config import load_config

    r = load_config(PRESET).ray
    nodes = _load(AWS)["available_node_types"]
    (tag, per_worker), = r.resources_per_worker.items()
    fitting = [n for n in nodes.values() if n["resources"].get(tag, 0) >= per_worker * r.num_workers]
    assert fitting and all(n["resources"]["CPU"] >= r.cpus_per_worker * r.num_workers for n in fitting)
    head = nodes[_load(AWS)["head_node_type"]]
    assert all(head["resources"].get(k, 0) >= v for k, v in r.driver_resources.items())


def test_every_line_of_the_preset_is_commented():
    lines = [ln for ln in PRESET.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    settings = [ln for ln in lines if ln.startswith("  ") and ":" in ln and not ln.rstrip().endswith(":")]
    assert settings and all("#" in ln for ln in settings), [ln for ln in settings if "#" not in ln]


# ---- the image ------------------------------------------------------------------------------


def test_docker_base_image_matches_installed_ray():
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms, "Dockerfile has no FROM"
    repo, _, tag = froms[0].partition(":")
    assert repo == "rayproject/ray"
    assert tag.split("-")[0] == ray.__version__
    assert "py311" in tag and "cu12" in tag
    assert not any("ray-ml" in f for f in froms)  # ray-ml stopped at 2.49


def test_docker_installs_a_cuda_torch_with_the_constraints():
    text = DOCKERFILE.read_text(encoding="utf-8")
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(encoding="utf-8"), flags=re.M).group(1)
    assert f"torch=={pinned}" in text
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "-c constraints.txt ." in text


def test_dockerignore_keeps_the_context_small():
    ignored = {ln.strip().strip("/") for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    assert {".venv", "runs", ".git", ".pytest_cache", "**/__pycache__"} <= ignored


def test_kuberay_entrypoint_is_a_valid_draftray_command():
    """The RayJob's entrypoint parses with draftray's own CLI and loads its config with the overrides."""
    import shlex

    from rayjobs.cli import _parser
    from rayjobs.config import load_config

    argv = shlex.split(_load(KUBERAY)["spec"]["entrypoint"])
    assert argv[0] == "draftray"
    args = _parser().parse_args(argv[1:])
    cfg = load_config(ROOT / args.config, args.overrides)
    assert cfg.ray.storage_path.startswith(("s3://", "gs://"))
    assert cfg.ray.driver_resources == {"draftray_head": 0.001}
