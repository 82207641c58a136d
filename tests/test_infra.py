"""The deployment files agree with each other and with the code: Docker image, KubeRay
manifests, the Ray cluster launcher config, infra/README.md.

No Kubernetes API server or kubeconform is at hand, so RayCluster/RayJob are checked
against the fields of the KubeRay ray.io/v1 CRDs (KubeRay >= 1.5.1: ``authOptions``),
the launcher config against Ray's own JSON schema, pod templates and core objects
against the Kubernetes schema when ``kubernetes-validate`` is installed, and the job
entrypoints against nucleiscope's own argument parser and job-file loader.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
LAUNCHER = INFRA / "aws" / "cluster.yaml"

#: Fields of the KubeRay ray.io/v1 types used here (a typo in a manifest is an unknown field).
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                   "gcsFaultToleranceOptions", "authOptions"}  # fmt: skip
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}  # fmt: skip
AUTOSCALER = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
              "upscalingMode", "env", "envFrom", "volumeMounts"}  # fmt: skip
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}  # fmt: skip
#: Text that must not appear in any deployment file (credentials belong to IAM roles).
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),
    re.compile(r"aws_(?:secret_access_key|access_key_id|session_token)", re.IGNORECASE),
    re.compile(r"""["']?(?:secret|key|token|password)["']?\s*[:=]\s*["'][^"'\s]{6,}""", re.IGNORECASE),
    re.compile(r"^kind:\s*Secret\b", re.MULTILINE),
]


# --- loading -------------------------------------------------------------------------


@cache
def pinned_ray() -> str:
    """The X of ``ray[default]==X`` in pyproject.toml (an exact pin is required)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m[1] for d in deps if (m := re.fullmatch(r"ray(?:\[[\w,]+\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"pyproject.toml must pin Ray exactly once (ray[default]==X), found {deps}"
    return pins[0]


@cache
def pinned_torch() -> str:
    match = re.search(r"torch==([\w.]+)", (ROOT / ".ci" / "run").read_text())
    assert match, ".ci/run installs no pinned torch"
    return match[1]


@cache
def manifests() -> dict[str, dict[str, Any]]:
    """Every object in infra/k8s/*.yaml but the kustomization, by ``kind/name``."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            for field in ("apiVersion", "kind", "metadata"):
                assert field in doc, f"{path.name}: no {field}"
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in found, f"{key} defined twice"
            found[key] = {**doc, "_file": path.name}
    return found


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) of the RayCluster and of each RayJob's own cluster."""
    for key, obj in manifests().items():
        if obj["kind"] == "RayCluster":
            yield key, obj["spec"]
        elif obj["kind"] == "RayJob":
            yield f"{key}.rayClusterSpec", obj["spec"]["rayClusterSpec"]


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def ray_resources(start_params: dict[str, str]) -> dict[str, float]:
    """Custom resources of a rayStartParams ``resources`` value (KubeRay's quoted JSON)."""
    raw = start_params.get("resources")
    if raw is None:
        return {}
    value = json.loads(raw) if raw.startswith('"') else raw  # '"{\"x\": 1}"' is passed through a shell
    parsed = json.loads(value)
    assert isinstance(parsed, dict), f"resources must be a JSON object, got {raw!r}"
    return {str(k): float(v) for k, v in parsed.items()}


def cpu_quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


# --- versions --------------------------------------------------------------------------


def test_ray_is_pinned_to_the_installed_version() -> None:
    import ray

    assert ray.__version__ == pinned_ray()


def test_image_tag_ray_version_and_pin_agree() -> None:
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert froms == [f"rayproject/ray:{pinned_ray()}-py311-gpu"], froms
    images = {container["image"] for _, spec in cluster_specs() for _, template in pod_templates(spec)
              for container in template["spec"]["containers"]}  # fmt: skip
    images.add(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert len(images) == 1, f"every pod and launcher node must run one image, found {sorted(images)}"
    tag = images.pop().rsplit(":", 1)[1]
    pattern = rf"[\w.]+-ray{re.escape(pinned_ray())}-gpu"
    assert re.fullmatch(pattern, tag), f"image tag {tag!r} must name ray{pinned_ray()}"
    for where, spec in cluster_specs():
        assert spec.get("rayVersion") == pinned_ray(), f"{where}: rayVersion {spec.get('rayVersion')!r}"


# --- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_installs_dependencies_before_the_source_and_runs_as_non_root() -> None:
    steps = dockerfile_instructions()
    source_copies = [i for i, (op, args) in enumerate(steps)
                     if op == "COPY" and re.search(r"\b(pipeline|actors|jobs)\b", args)]  # fmt: skip
    dep_installs = [i for i, (op, args) in enumerate(steps)
                    if op == "RUN" and re.search(r"pip install \.(\s|$)", args)]  # fmt: skip
    torch = [i for i, (op, args) in enumerate(steps) if op == "RUN" and f"torch=={pinned_torch()}" in args]
    assert len(source_copies) == 3 and dep_installs and torch, steps
    assert max(torch[0], dep_installs[0]) < min(source_copies), "install the dependencies before COPY of the source"
    early = [args for op, args in steps[: min(source_copies)] if op in ("COPY", "ADD")]
    copied_early = {name for args in early for name in re.sub(r"--\S+", "", args).split()[:-1]}
    assert copied_early <= {"pyproject.toml", "README.md"}, f"copied before the dependencies: {early}"
    users = [args.split(":")[0] for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), f"the image must end as a non-root user, USER lines: {users}"


def test_dockerfile_ends_with_a_smoke_check() -> None:
    steps = dockerfile_instructions()
    last_copy = max(i for i, (op, _) in enumerate(steps) if op == "COPY")
    checks = " ".join(args for op, args in steps[last_copy:] if op == "RUN")
    assert "nucleiscope --help" in checks
    assert re.search(r"python -c .*import nucleiscope\.", checks)
    assert f"ray.__version__ == '{pinned_ray()}'" in checks
    assert not any(op in ("ENTRYPOINT", "CMD") for op, _ in steps), "Ray's launchers set the command; no ENTRYPOINT"


# --- KubeRay manifests -----------------------------------------------------------------------


def test_manifests_have_the_expected_kinds() -> None:
    kinds = sorted((obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) for obj in manifests().values())
    assert kinds == [
        ("ray.io/v1", "RayCluster", "nucleiscope"),
        ("ray.io/v1", "RayJob", "nucleiscope-extract"),
        ("ray.io/v1", "RayJob", "nucleiscope-train"),
        ("v1", "Namespace", "nucleiscope"),
        ("v1", "ServiceAccount", "nucleiscope"),
    ]
    for obj in manifests().values():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == kustomization()["namespace"], obj["_file"]


@pytest.mark.parametrize("where", ["RayCluster/nucleiscope", "RayJob/nucleiscope-extract.rayClusterSpec",
                                   "RayJob/nucleiscope-train.rayClusterSpec"])  # fmt: skip
def test_ray_cluster_spec_fields(where: str) -> None:
    spec = dict(cluster_specs())[where]
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC}"
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(spec["headGroupSpec"])
    assert spec.get("authOptions") == {"mode": "token"}, f"{where}: token authentication must be on"
    assert spec.get("enableInTreeAutoscaling") is True and set(spec["autoscalerOptions"]) <= AUTOSCALER
    assert spec["autoscalerOptions"].get("upscalingMode") in ("Default", "Aggressive", "Conservative")
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: group names repeat"
    for group in groups:
        name = f"{where}/{group['groupName']}"
        assert set(group) <= WORKER_GROUP and {"groupName", "minReplicas", "maxReplicas", "rayStartParams",
                                               "template"} <= set(group), f"{name}: fields {sorted(group)}"  # fmt: skip
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
    for params in [spec["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"


@pytest.mark.parametrize("where", ["RayCluster/nucleiscope", "RayJob/nucleiscope-extract.rayClusterSpec"])
def test_clusters_have_a_cpu_head_cpu_workers_and_autoscaling_gpu_workers(where: str) -> None:
    spec = dict(cluster_specs())[where]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {}), "the head is a CPU node"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if gpus_of(g) > 0]
    cpu = [g for g in groups.values() if gpus_of(g) == 0]
    assert gpu and cpu, f"{where}: needs a CPU and a GPU worker group, has {sorted(groups)}"
    assert any(g["minReplicas"] < g["maxReplicas"] for g in gpu), f"{where}: GPU workers must autoscale"
    assert any(g["minReplicas"] < g["maxReplicas"] for g in cpu), f"{where}: CPU workers must autoscale"
    for group in gpu:
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated, f"{where}/{group['groupName']}: GPU nodes are usually tainted"


def gpus_of(group: dict[str, Any]) -> int:
    """GPUs a group's pod asks for (requests, when given, must equal limits for GPUs)."""
    resources = group["template"]["spec"]["containers"][0]["resources"]
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    assert request is None or int(request) == limit, f"{group['groupName']}: GPU request != limit"
    return limit


def test_pods_run_as_the_service_account_non_root_with_shared_memory() -> None:
    for where, spec in cluster_specs():
        for group, template in pod_templates(spec):
            pod, name = template["spec"], f"{where}/{group}"
            assert pod.get("serviceAccountName") == "nucleiscope", f"{name}: serviceAccountName"
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
            dshm = [v for v in pod.get("volumes", []) if v["name"] == "dshm"]
            assert dshm and dshm[0].get("emptyDir", {}).get("medium") == "Memory", f"{name}: /dev/shm in memory"
            container = pod["containers"][0]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"], name
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert cpu_quantity(limits["cpu"]) >= 1 and limits == requests, f"{name}: requests must equal limits"
            for env in container.get("env", []):
                assert "value" not in env or not re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]), name


def test_service_account_has_an_iam_role_and_no_secrets() -> None:
    account = manifests()["ServiceAccount/nucleiscope"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), role
    assert not account.get("secrets") and not account.get("imagePullSecrets")


def test_no_credentials_in_any_deployment_file() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(ROOT)}: looks like a credential: {match[0]!r}"


def rayjob(name: str) -> dict[str, Any]:
    return manifests()[f"RayJob/{name}"]


@pytest.mark.parametrize("name", ["nucleiscope-extract", "nucleiscope-train"])
def test_rayjob_lifecycle_and_entrypoint_resources(name: str) -> None:
    spec = rayjob(name)["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"{name}: unknown fields {set(spec) - RAYJOB_SPEC}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and 3600 <= spec["activeDeadlineSeconds"] <= 7 * 86400
    assert isinstance(spec["backoffLimit"], int) and 1 <= spec["backoffLimit"] <= 5
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "clusterSelector" not in spec
    wanted = json.loads(spec["entrypointResources"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    offered = ray_resources(head)
    assert wanted and all(offered.get(k, 0) >= v for k, v in wanted.items()), \
        f"{name}: the head offers {offered}, the driver asks {wanted}"  # fmt: skip
    assert float(spec.get("entrypointNumCpus", 0)) <= float(head.get("num-cpus", "inf"))
    assert float(spec.get("entrypointNumGpus", 0)) == 0


def test_extract_entrypoint_is_a_valid_command_on_s3() -> None:
    from nucleiscope.jobs.cli import build_parser

    argv = shlex.split(rayjob("nucleiscope-extract")["spec"]["entrypoint"])
    assert argv[:2] == ["nucleiscope", "extract"]
    args = build_parser().parse_args(argv[1:])
    assert all(s.startswith("s3://") for s in args.slides) and args.out.startswith("s3://")
    assert args.no_progress and args.storage_options is None and args.address is None and not args.local


def test_train_entrypoint_reads_the_mounted_job_file() -> None:
    from nucleiscope.jobs.cli import build_parser
    from nucleiscope.pipeline.training.config import load_job_config

    spec = rayjob("nucleiscope-train")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["nucleiscope", "train"]
    config_path = Path(build_parser().parse_args(argv[1:]).config)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["name"] == mounts[str(config_path.parent)])
    generated = {g["name"]: g["files"] for g in kustomization()["configMapGenerator"]}
    assert config_path.name in generated[volume["configMap"]["name"]]
    job = load_job_config(K8S / config_path.name)
    gpu = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if gpus_of(g) > 0)
    assert job.use_gpu and job.output.startswith("s3://") and not job.storage_options
    assert job.workers == gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"], "DDP needs every worker"
    pod_cpus = cpu_quantity(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert job.cpus_per_worker + job.stream.task_cpus <= pod_cpus


def test_kustomization_lists_existing_files_and_leaves_no_manifest_out() -> None:
    data = kustomization()
    listed = list(data["resources"]) + [f for g in data.get("configMapGenerator", []) for f in g["files"]]
    assert all((K8S / name).is_file() for name in listed), listed
    in_kustomization = {obj["_file"] for obj in manifests().values() if obj["_file"] in data["resources"]}
    applied_alone = {obj["_file"] for obj in manifests().values() if obj["kind"] == "RayJob"}
    assert in_kustomization | applied_alone == {obj["_file"] for obj in manifests().values()}
    assert not in_kustomization & applied_alone, "applying the kustomization must not start a batch run"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_builds() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(built.stdout))
    assert kinds == ["ConfigMap", "Namespace", "RayCluster", "ServiceAccount"]


def test_pod_templates_and_core_objects_match_the_kubernetes_schema() -> None:
    import jsonschema

    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    objects = [obj for obj in manifests().values() if obj["apiVersion"] == "v1"]
    for where, spec in cluster_specs():
        objects += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template,
                     "_file": where} for group, template in pod_templates(spec)]  # fmt: skip
    for obj in objects:
        body = {k: v for k, v in obj.items() if k != "_file"}
        try:
            kv.validate(body, version, strict=True)
        except jsonschema.ValidationError as exc:  # kubernetes_validate raises it or its subclass
            pytest.fail(f"{obj['_file']} {obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}",
                        pytrace=False)


# --- Ray cluster launcher ----------------------------------------------------------------------


def test_launcher_config_matches_rays_schema_with_spot_gpu_workers() -> None:
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "InstanceMarketOptions" not in head["node_config"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    spot_gpu = [v for v in workers.values() if re.match(r"(p|g)\d", v["node_config"]["InstanceType"])
                and v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]  # fmt: skip
    assert spot_gpu and all(v.get("min_workers", 0) < v["max_workers"] for v in spot_gpu)
    assert all("Arn" in t["node_config"]["IamInstanceProfile"] for t in types.values()), "S3 through instance roles"
    assert config["provider"]["type"] == "aws" and not config["setup_commands"]


# --- README ---------------------------------------------------------------------------------------


def test_readme_covers_build_submit_watch_resume_and_sizing() -> None:
    text = (INFRA / "README.md").read_text()
    for needle in ("docker build -f infra/docker/Dockerfile", "docker push", "ray job submit",
                   "nucleiscope extract s3://", "--out s3://", "ray job logs", "kubectl apply -k infra/k8s",
                   "resume", "slides/hour", f"ray{pinned_ray()}"):  # fmt: skip
        assert needle in text, f"infra/README.md does not mention {needle!r}"
    stale = set(re.findall(r"ray(\d+\.\d+\.\d+)", text)) - {pinned_ray()}
    assert not stale, f"infra/README.md names other Ray versions: {stale}"
    assert os.path.relpath(DOCKERFILE, ROOT) in text
