"""Every file under cluster/ is checked against the schema of the tool that reads it, plus the
safety rules of the project.

- cluster/aws.yaml: Ray's own cluster-config JSON schema (ray/autoscaler/ray-schema.json, inside
  the installed ray package), both as written and after Ray's default filling, exactly the
  offline part of what `ray up` does before it calls AWS.
- cluster/kuberay/*.yaml: the `openAPIV3Schema` of the served v1 version of the KubeRay CRDs in
  <repo>/../shared/schemas/kuberay/, made strict the way `kubectl apply` (server-side strict
  field validation) is: an unknown field is an error, not silently pruned. Kubernetes-only
  keywords are handled here: list-type map/set uniqueness is checked, int-or-string is the
  schema's own anyOf, `format` (int32, int64, date-time) and CEL rules are not evaluated.
- Safety: no GPU and no schedulable CPU on a head node, the dashboard not published, secrets
  referenced and never inlined, every RayJob cleans up after itself and has a retry limit, and
  every entrypoint names a recipe that exists in this repository.

Each check is a function returning a list of problems; the tests at the bottom feed each one a
broken copy of a real manifest, so every check is shown to be able to fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
CRD_DIR = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
JOBS = ("labels", "align", "instruct", "tune", "eval")

MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAYJOBS = sorted(KUBERAY.glob("rayjob-*.yaml"))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

needs_crds = pytest.mark.skipif(
    not all((CRD_DIR / name).is_file() for name in CRD_FILES.values()),
    reason=f"KubeRay CRD schemas not found at {CRD_DIR} (the repository expects a copy of shared/ "
           "beside it: <repo>/../shared/schemas/kuberay/)")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ids(paths):
    return [p.name for p in paths]


# --------------------------------------------------------------------------- schema validation


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_launcher_problems(config: dict) -> list[str]:
    """Ray's cluster-config schema, on the file as written and after `prepare_config` (defaults
    merged, as `ray up` does before validating)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validator = jsonschema.Draft7Validator(_ray_schema())
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in validator.iter_errors(config)]
    if problems:
        return problems
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError, AssertionError, KeyError
        problems.append(f"after Ray's default filling: {type(exc).__name__}: {exc}")
    return problems


def _strict(schema):
    """Copy of a CRD schema in which objects with declared properties reject unknown fields
    (what `kubectl apply` does with strict field validation), unless the schema says otherwise."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    if not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
            seen.add(key)


def _list_type(validator, list_type, instance, schema):
    if list_type == "set" and isinstance(instance, list):
        dumped = [json.dumps(i, sort_keys=True) for i in instance]
        if len(set(dumped)) != len(dumped):
            yield jsonschema.ValidationError("duplicate items in a list of type set")


# OpenAPI v3.0 schemas follow JSON Schema draft 4 semantics (boolean exclusiveMinimum, ...).
_CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-list-type": _list_type})

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_crd_cache: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    """The openAPIV3Schema of the served v1 version of a KubeRay CRD, made strict."""
    if kind not in _crd_cache:
        crd = _load(CRD_DIR / CRD_FILES[kind])
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
        _crd_cache[kind] = _strict(version["schema"]["openAPIV3Schema"])
    return _crd_cache[kind]


def kuberay_problems(doc: dict) -> list[str]:
    """The whole object against its CRD schema, plus the ObjectMeta rules the schema leaves out."""
    if not isinstance(doc, dict):
        return ["not a mapping"]
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: {doc.get('apiVersion')!r} is not ray.io/v1")
    if doc.get("kind") not in CRD_FILES:
        return problems + [f"kind: {doc.get('kind')!r} is not one of {sorted(CRD_FILES)}"]
    validator = _CRDValidator(crd_schema(doc["kind"]))
    problems += [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                 for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]
    meta = doc.get("metadata") or {}
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        problems.append(f"metadata: unknown fields {sorted(unknown)}")
    name = meta.get("name", "")
    if not (isinstance(name, str) and len(name) <= 63 and _DNS1123_LABEL.match(name)):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        if not _LABEL_KEY.match(str(key)) or not (isinstance(value, str) and len(value) <= 63
                                                 and _LABEL_VALUE.match(value)):
            problems.append(f"metadata.labels: invalid label {key}={value!r}")
    return problems


# --------------------------------------------------------------------------- safety rules


def _ray_start_option(command: str, option: str):
    """Value of `--option=VALUE` / `--option VALUE` in the `ray start` part of a shell line."""
    words = shlex.split(command.replace(";", " ; "))
    for i, word in enumerate(words):
        if word == f"--{option}" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(f"--{option}="):
            return word.split("=", 1)[1]
    return None


def launcher_safety_problems(config: dict) -> list[str]:
    problems = []
    node_types = config.get("available_node_types", {})
    head_type = config.get("head_node_type")
    head = node_types.get(head_type, {})
    resources = head.get("resources", {})
    if resources.get("GPU") != 0:
        problems.append(f"head node type {head_type!r}: resources.GPU must be 0, got {resources.get('GPU')!r}")
    if resources.get("CPU") != 0:
        problems.append(f"head node type {head_type!r}: resources.CPU must be 0 (no training on the head)")
    instance = head.get("node_config", {}).get("InstanceType", "")
    if re.match(r"^(p\d|g\d|trn|inf|dl)", instance):
        problems.append(f"head node type {head_type!r}: {instance} is an accelerator instance")
    head_starts = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    if not head_starts:
        problems.append("head_start_ray_commands: no `ray start --head`")
    for command in head_starts:
        host = _ray_start_option(command, "dashboard-host")
        if host not in LOOPBACK:
            problems.append(f"head start: --dashboard-host must be loopback (reach it with `ray dashboard`), got {host!r}")
        if _ray_start_option(command, "num-gpus") != "0":
            problems.append("head start: --num-gpus=0 missing")
    for command in config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []):
        if "0.0.0.0" in command:
            problems.append(f"start command binds a public address: {command!r}")
        if "ray start" in command and "RAY_AUTH_MODE=disabled" in command:
            problems.append("start command disables Ray token authentication")
    rules = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 0) + 1)
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        if public and any(p in ports for p in (8265, 6379, 10001)):
            problems.append(f"security group opens a Ray port to the internet: {rule}")
    return problems


def launcher_gpu_problems(config: dict) -> list[str]:
    problems = []
    node_types = config.get("available_node_types", {})
    workers = {n: t for n, t in node_types.items() if n != config.get("head_node_type")}
    by_instance = {t.get("node_config", {}).get("InstanceType"): (n, t) for n, t in workers.items()}
    for instance in ("p4d.24xlarge", "p5.48xlarge"):
        if instance not in by_instance:
            problems.append(f"no worker node type with InstanceType {instance}")
            continue
        name, node_type = by_instance[instance]
        if node_type.get("resources", {}).get("GPU") != 8:
            problems.append(f"{name}: resources.GPU must be 8 for {instance}")
        low, high = node_type.get("min_workers"), node_type.get("max_workers")
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high and high >= 1):
            problems.append(f"{name}: needs min_workers <= max_workers, max_workers >= 1 (got {low}, {high})")
    if sum(t.get("max_workers", 0) for t in workers.values()) > config.get("max_workers", 0):
        problems.append("global max_workers is below the sum of the worker types' max_workers")
    if not any("pip install" in c and "constraints.txt" in c
               for c in config.get("setup_commands", []) + config.get("worker_setup_commands", [])):
        problems.append("setup_commands: the package is not installed with the pinned constraints")
    for remote, local in config.get("file_mounts", {}).items():
        if not Path(local).expanduser().is_absolute() and not (REPO / local).exists():
            problems.append(f"file_mounts {remote}: local path {local} does not exist in the repository")
    return problems


_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION|CREDENTIAL)", re.I)
_SECRET_TEXT = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"), "an AWS secret key"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "a GitHub token"),
]


def secret_text_problems(text: str) -> list[str]:
    return [f"contains {what}" for pattern, what in _SECRET_TEXT if pattern.search(text)]


def _walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def _pod_specs(doc: dict):
    """(role, group name, pod spec) of every pod template in a RayCluster or RayJob."""
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
    head = cluster.get("headGroupSpec", {})
    yield "head", "head", head.get("template", {}).get("spec", {})
    for group in cluster.get("workerGroupSpecs", []):
        yield "worker", group.get("groupName"), group.get("template", {}).get("spec", {})


def _cluster_spec(doc: dict) -> dict:
    spec = doc.get("spec", {})
    return spec.get("rayClusterSpec", {}) if doc.get("kind") == "RayJob" else spec


def kuberay_safety_problems(doc: dict) -> list[str]:
    problems = []
    cluster = _cluster_spec(doc)
    head = cluster.get("headGroupSpec", {})
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"headGroupSpec.serviceType {head.get('serviceType')!r} publishes the head (use ClusterIP)")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress publishes the dashboard")
    if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("headGroupSpec.headService.spec.type publishes the head (use ClusterIP)")
    if head.get("rayStartParams", {}).get("num-gpus", "0") != "0":
        problems.append("head rayStartParams num-gpus must be 0")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode must be token (Ray token authentication)")
    gpu_groups = 0
    for role, group, pod in _pod_specs(doc):
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            res = container.get("resources", {})
            gpus = {k: v for part in ("requests", "limits") for k, v in res.get(part, {}).items() if "gpu" in k.lower()}
            if role == "head" and gpus:
                problems.append(f"head container {container.get('name')}: requests GPUs {gpus}")
            if role == "worker" and "nvidia.com/gpu" in res.get("limits", {}):
                gpu_groups += 1
                limit = res["limits"]["nvidia.com/gpu"]
                if str(limit) != "8":
                    problems.append(f"worker group {group}: nvidia.com/gpu limit {limit!r}, expected 8 per pod")
                if str(res.get("requests", {}).get("nvidia.com/gpu", limit)) != str(limit):
                    problems.append(f"worker group {group}: GPU requests must equal limits")
                if not pod.get("tolerations") and not pod.get("nodeSelector") and not pod.get("affinity"):
                    problems.append(f"worker group {group}: no nodeSelector/tolerations/affinity for GPU nodes")
            for env in container.get("env", []):
                if _SECRET_NAME.search(env.get("name", "")) and "value" in env:
                    problems.append(f"{group}/{container.get('name')}: env {env['name']} has a literal value; "
                                    "use valueFrom.secretKeyRef")
            names = {e.get("name") for e in container.get("env", [])
                     if "secretKeyRef" in (e.get("valueFrom") or {})}
            from_secret = any("secretRef" in e for e in container.get("envFrom", []))
            if not from_secret and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names \
                    and not pod.get("serviceAccountName"):
                problems.append(f"{group}/{container.get('name')}: no AWS credentials from a Secret "
                                "(secretKeyRef/envFrom) and no serviceAccountName")
    if gpu_groups == 0:
        problems.append("no worker group requests nvidia.com/gpu")
    for path, node in _walk(doc):
        if isinstance(node, dict) and node.get("kind") == "Secret" and ("data" in node or "stringData" in node):
            problems.append(f"{path}: an inline Secret with data")
    return problems


def _entrypoint(job_doc: dict) -> tuple[str | None, str | None]:
    """(module, config path) of `python -m MODULE --config PATH ...`."""
    words = shlex.split(job_doc.get("spec", {}).get("entrypoint", ""))
    module = words[words.index("-m") + 1] if "-m" in words[:-1] else None
    config = None
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words):
            config = words[i + 1]
        elif word.startswith("--config="):
            config = word.split("=", 1)[1]
    return module, config


def rayjob_problems(doc: dict, job: str) -> list[str]:
    problems = []
    spec = doc.get("spec", {})
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true (the GPUs are freed when the job ends)")
    backoff = spec.get("backoffLimit")
    if not (isinstance(backoff, int) and not isinstance(backoff, bool) and 0 <= backoff <= 5):
        problems.append(f"spec.backoffLimit must be set to a small integer, got {backoff!r}")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not (isinstance(ttl, int) and 0 <= ttl <= 3600):
        problems.append(f"spec.ttlSecondsAfterFinished must be set (<= 1 h of idle GPUs), got {ttl!r}")
    deadline = spec.get("activeDeadlineSeconds")
    if not (isinstance(deadline, int) and deadline > 0):
        problems.append(f"spec.activeDeadlineSeconds must be a positive integer, got {deadline!r}")
    if "clusterSelector" in spec or "rayClusterSpec" not in spec:
        problems.append("spec.rayClusterSpec must define the job's own cluster")
    module, config = _entrypoint(doc)
    if module != f"workflows.{job}":
        problems.append(f"entrypoint runs module {module!r}, expected workflows.{job}")
    if not config:
        problems.append("entrypoint has no --config")
    elif not (REPO / config).is_file():
        problems.append(f"entrypoint config {config} does not exist in the repository")
    else:
        recipe_job = (_load(REPO / config) or {}).get("job")
        if recipe_job != job:
            problems.append(f"entrypoint config {config} is a {recipe_job!r} recipe, not {job!r}")
    if (doc.get("metadata", {}).get("labels") or {}).get("sea-ray/job") != job:
        problems.append(f"metadata.labels sea-ray/job must be {job!r}")
    return problems


# --------------------------------------------------------------------------- the shipped files


def test_cluster_files_exist():
    assert AWS_YAML.is_file()
    assert (KUBERAY / "raycluster.yaml").is_file()
    assert {p.name for p in RAYJOBS} >= {f"rayjob-{job}.yaml" for job in JOBS}
    assert (CLUSTER / "README.md").is_file()


def test_aws_launcher_validates_against_ray_schema():
    assert ray_launcher_problems(_load(AWS_YAML)) == []


def test_aws_launcher_head_is_cpu_only_and_dashboard_private():
    assert launcher_safety_problems(_load(AWS_YAML)) == []


def test_aws_launcher_gpu_workers_and_install():
    assert launcher_gpu_problems(_load(AWS_YAML)) == []


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_kuberay_manifest_validates_against_crd(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one object per file"
    assert kuberay_problems(docs[0]) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_kuberay_manifest_safety(path):
    assert kuberay_safety_problems(_load(path)) == []


@pytest.mark.parametrize("path", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_cleans_up_and_runs_an_existing_recipe(path):
    doc = _load(path)
    assert doc["kind"] == "RayJob"
    job = path.stem.removeprefix("rayjob-")
    assert rayjob_problems(doc, job) == []


def test_rayjob_entrypoint_modules_exist():
    entry_points = [p for p in (REPO / "workflows").glob("*.py") if p.name != "__init__.py"]
    if not entry_points:
        pytest.skip("workflows/<job>.py entry points are not in the repository yet")
    missing = []
    for path in RAYJOBS:
        module, _ = _entrypoint(_load(path))
        if not (REPO / (module.replace(".", "/") + ".py")).is_file():
            missing.append(f"{path.name}: {module}")
    assert missing == []


def test_rayjobs_share_one_cluster_spec():
    """The cluster part is repeated in each RayJob (YAML anchors cannot span files): keep them equal
    apart from the per-job pod label."""
    def normalized(path):
        spec = copy.deepcopy(_cluster_spec(_load(path)))
        for _, node in _walk(spec):
            if isinstance(node, dict) and isinstance(node.get("labels"), dict):
                node["labels"].pop("sea-ray/job", None)
        return spec

    reference = normalized(RAYJOBS[0])
    assert [p.name for p in RAYJOBS if normalized(p) != reference] == []


def test_versions_agree_with_constraints():
    """Ray version: constraints.txt pin == KubeRay rayVersion == launcher/Dockerfile image tags."""
    pin = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    problems = []
    for path in MANIFESTS:
        version = _cluster_spec(_load(path)).get("rayVersion")
        if version != pin:
            problems.append(f"{path.name}: rayVersion {version!r} != {pin}")
    docker = _load(AWS_YAML).get("docker", {})
    for key in ("image", "head_image", "worker_image"):
        if key in docker and not docker[key].startswith(f"rayproject/ray:{pin}-"):
            problems.append(f"aws.yaml docker.{key} {docker[key]!r} is not Ray {pin}")
    dockerfile = CLUSTER / "Dockerfile"
    if dockerfile.is_file():
        base = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.M).group(1)
        if not base.startswith(f"rayproject/ray:{pin}-"):
            problems.append(f"Dockerfile base {base} is not Ray {pin}")
    images = {c.get("image") for p in MANIFESTS for _, _, pod in _pod_specs(_load(p))
              for c in pod.get("containers", [])}
    if len(images) != 1:
        problems.append(f"the KubeRay manifests use different images: {sorted(map(str, images))}")
    assert problems == []


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_secret_in_cluster_files(path):
    assert secret_text_problems(path.read_text(errors="replace")) == []


# --------------------------------------------------------------------------- every check can fail


def _set(doc, dotted, value):
    node = doc
    *parents, leaf = dotted
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize("path, value", [
    (("max_workers",), "four"),                                     # wrong type
    (("idle_timeout_minute",), 10),                                 # unknown top-level key
    (("available_node_types", "gpu.a100x8", "resources", "GPU"), -8),
    (("available_node_types", "gpu.a100x8", "min_worker"), 0),      # unknown node-type key
    (("auth", "ssh_usr"), "ubuntu"),
    (("provider", "type"), _DELETE),
    (("docker", "image"), _DELETE),                                  # container without image (Ray's own check)
])
def test_ray_schema_check_rejects_broken_launcher(path, value):
    assert ray_launcher_problems(_set(_load(AWS_YAML), path, value))


@pytest.mark.parametrize("path, value", [
    (("available_node_types", "head.cpu", "resources"), {"CPU": 0}),            # GPU not pinned to 0
    (("available_node_types", "head.cpu", "resources", "CPU"), 8),
    (("available_node_types", "head.cpu", "node_config", "InstanceType"), "p4d.24xlarge"),
    (("head_start_ray_commands", 1), "ray start --head --dashboard-host=0.0.0.0 --num-gpus=0"),
    (("head_start_ray_commands", 1), "ray start --head --num-gpus=0"),          # default host is public
    (("head_start_ray_commands",), ["ray stop"]),
])
def test_launcher_safety_check_can_fail(path, value):
    assert launcher_safety_problems(_set(_load(AWS_YAML), path, value))


@pytest.mark.parametrize("path, value", [
    (("available_node_types", "gpu.h100x8"), _DELETE),
    (("available_node_types", "gpu.a100x8", "resources", "GPU"), 4),
    (("available_node_types", "gpu.a100x8", "max_workers"), 0),
    (("max_workers",), 1),
    (("setup_commands",), ["echo no install"]),
    (("file_mounts", "~/sea_ray"), "does-not-exist"),
])
def test_launcher_gpu_check_can_fail(path, value):
    assert launcher_gpu_problems(_set(_load(AWS_YAML), path, value))


_HEAD = ("spec", "headGroupSpec")
_HEAD_C = _HEAD + ("template", "spec", "containers", 0)
_W0 = ("spec", "workerGroupSpecs", 0)
_W0_C = _W0 + ("template", "spec", "containers", 0)


@needs_crds
@pytest.mark.parametrize("path, value", [
    (("spec", "headGroupSpecs"), {}),                                   # typo: unknown field
    (_HEAD + ("serviceTyp",), "ClusterIP"),
    (_W0 + ("maxReplicas",), "2"),                                      # wrong type
    (_W0 + ("minReplicas",), _DELETE),                                  # required
    (_W0_C + ("resources", "limits", "memory"), "lots"),               # not a quantity
    (_W0_C + ("env", 0, "valueFrom", "secretKeyRef", "key"), _DELETE),  # required key
    (_W0_C + ("env", 1, "name"), "AWS_ACCESS_KEY_ID"),                 # duplicate env (list-map key)
    (_W0_C + ("imagePullPolicy",), ["Always"]),
    (("spec", "authOptions", "mode"), "password"),                      # not in enum
    (("metadata", "name"), "Sea_Ray"),                                  # not DNS-1123
    (("apiVersion",), "ray.io/v1alpha1"),
])
def test_crd_check_rejects_broken_raycluster(path, value):
    doc = _load(KUBERAY / "raycluster.yaml")
    assert kuberay_problems(_set(doc, path, value))


@needs_crds
@pytest.mark.parametrize("path, value", [
    (("spec", "shutdownAfterJobFinish"), True),                         # typo: unknown field
    (("spec", "backoffLimit"), "2"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "groupname"), "x"),
    (("spec", "entrypoint"), ["python", "-m", "workflows.align"]),
])
def test_crd_check_rejects_broken_rayjob(path, value):
    doc = _load(KUBERAY / "rayjob-align.yaml")
    assert kuberay_problems(_set(doc, path, value))


@pytest.mark.parametrize("path, value", [
    (_HEAD + ("serviceType",), "LoadBalancer"),
    (_HEAD + ("serviceType",), "NodePort"),
    (_HEAD + ("enableIngress",), True),
    (_HEAD + ("headService",), {"spec": {"type": "LoadBalancer"}}),
    (_HEAD_C + ("resources", "limits", "nvidia.com/gpu"), 1),
    (_HEAD + ("rayStartParams", "num-gpus"), "1"),
    (("spec", "authOptions"), _DELETE),
    (_W0_C + ("env", 1), {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-from-a-secret"}),
    (_W0_C + ("env",), []),
    (_W0_C + ("resources", "limits", "nvidia.com/gpu"), 4),
    (_W0 + ("template", "spec", "tolerations"), _DELETE),
    (("spec", "workerGroupSpecs"), []),
])
def test_kuberay_safety_check_can_fail(path, value):
    doc = _load(KUBERAY / "raycluster.yaml")
    if path[-1] == "tolerations":   # also drop the node selector: no GPU placement left
        del doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelector"]
    assert kuberay_safety_problems(_set(doc, path, value))


@pytest.mark.parametrize("path, value", [
    (("spec", "shutdownAfterJobFinishes"), False),
    (("spec", "shutdownAfterJobFinishes"), _DELETE),
    (("spec", "backoffLimit"), _DELETE),
    (("spec", "ttlSecondsAfterFinished"), _DELETE),
    (("spec", "activeDeadlineSeconds"), _DELETE),
    (("spec", "entrypoint"), "python -m workflows.align --config workflows/configs/nope.yaml"),
    (("spec", "entrypoint"), "python -m workflows.align --config workflows/configs/llava15_vicuna7b_instruct.yaml"),
    (("spec", "entrypoint"), "python -m workflows.instruct --config workflows/configs/llava15_vicuna7b_align.yaml"),
    (("spec", "entrypoint"), "python -m workflows.align"),
])
def test_rayjob_check_can_fail(path, value):
    doc = _load(KUBERAY / "rayjob-align.yaml")
    assert rayjob_problems(_set(doc, path, value), "align")


@pytest.mark.parametrize("text", [
    "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "-----BEGIN RSA PRIVATE KEY-----",
    "HF_TOKEN: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
])
def test_secret_scan_can_fail(text):
    assert secret_text_problems(text)
