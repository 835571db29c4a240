"""The manifests under infra/, checked offline.

Against KubeRay's CRD schemas (copies in tests/infra/kuberay/, see its README.md for where from)
with ``jsonschema``, unknown fields rejected: the CRDs' openAPIV3Schema lists ``properties`` but does
not set ``additionalProperties: false``, so ``strict`` adds it wherever properties are listed and
unknown fields are not explicitly preserved. The cluster launcher YAML against Ray's own schema.
Then the rules that live in the operator's code or in this project, not in any schema: the head
runs no work, every image is the Dockerfile's, every Ray version the Dockerfile's, entrypoints are
scripts in jobs/ whose subcommand the CLI has, config paths are mounted, names fit their limits.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from msif_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SCHEMAS = Path(__file__).resolve().parent / "kuberay"  # KubeRay's CRDs, Apache-2.0 (README.md there)
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
NAME_LIMITS = {"RayJob": 47, "RayCronJob": 36, "RayCluster": 63}  # KubeRay's validation in Go, not in the CRDs
SUBCOMMANDS = set(build_parser()._subparsers._group_actions[0].choices)
NIGHT = "20261130"


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


IMAGE = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", dockerfile()).group(1)
RAY_VERSION = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile()).group(1)
WORKDIR = re.search(r"^WORKDIR (\S+)", dockerfile(), re.M).group(1)


def documents() -> list[tuple[str, dict]]:
    """Every object of every YAML under infra/, with the RayJob template the CronJob posts (its date filled in)."""
    found = []
    for path in sorted(INFRA.glob("*.yaml")):
        if path.name == "cluster-launcher.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            found.append((path.name, doc))
            if doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):
                found.append((f"{path.name}:{doc['metadata']['name']}",
                              yaml.safe_load(doc["data"]["rayjob.yaml"].replace("__DATE__", NIGHT))))
    return found


def ray_objects() -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in documents() if doc["kind"] in CRDS]


def strict(schema: object) -> object:
    """The schema with ``additionalProperties: false`` wherever it lists properties and keeps no unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    """A validator of the CRD's schema for ``apiVersion``, unknown fields rejected."""
    crd = yaml.load((SCHEMAS / CRDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, f"{kind}: apiVersion group {group}, CRD {crd['spec']['group']}"
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{kind} {api_version} is not served"
    schema = strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    job = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
    return [job["rayClusterSpec"]]


def job_specs(doc: dict) -> list[dict]:
    return {"RayJob": [doc["spec"]], "RayCronJob": [doc["spec"].get("jobTemplate")]}.get(doc["kind"], [])


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("where,doc", ray_objects(), ids=[w for w, _ in ray_objects()])
def test_ray_objects_are_valid_against_the_kuberay_crds(where, doc):
    crd_schema(doc["kind"], doc["apiVersion"]).validate(doc)


def test_strict_schema_rejects_a_misspelt_field():
    [(_, job)] = [(w, d) for w, d in ray_objects() if w == "rayjob.yaml"]
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinished"] = typo["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinished"):
        crd_schema("RayJob", job["apiVersion"]).validate(typo)
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolice"):
        crd_schema("RayJob", job["apiVersion"]).validate(typo)


def test_cluster_launcher_is_valid_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert launcher["docker"]["image"] == IMAGE
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"]["CPU"] == 0
    assert "--num-cpus=0" in " ".join(launcher["head_start_ray_commands"])
    workers = [t for name, t in launcher["available_node_types"].items() if name != launcher["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["resources"].get("GPU", 0) >= 1 for t in workers)


# --------------------------------------------------------------------------- rules no schema holds


@pytest.mark.parametrize("where,doc", ray_objects(), ids=[w for w, _ in ray_objects()])
def test_operator_and_project_rules(where, doc):
    name = doc["metadata"]["name"]
    assert len(name) <= NAME_LIMITS[doc["kind"]], f"{where}: {doc['kind']} name {name!r} is too long"
    for spec in cluster_specs(doc):
        assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion {spec['rayVersion']} vs the image's {RAY_VERSION}"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must run no work"
        for container in containers(spec):
            assert container["image"] == IMAGE, f"{where}: image {container['image']} is not the Dockerfile's {IMAGE}"
        workers = spec["workerGroupSpecs"]
        assert workers and all(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                               for w in workers), f"{where}: GPU workers expected"
    if doc["kind"] == "RayCluster":
        assert doc["spec"].get("enableInTreeAutoscaling") and all(
            w["minReplicas"] == 0 for w in doc["spec"]["workerGroupSpecs"]), "the GPU group scales from zero"
    for job in job_specs(doc):
        if "ttlSecondsAfterFinished" in job:
            assert job.get("shutdownAfterJobFinishes") is True, f"{where}: a TTL needs shutdownAfterJobFinishes"
        assert job.get("activeDeadlineSeconds", 0) > 0 and "backoffLimit" in job, where
        check_entrypoint(where, name, job)


def check_entrypoint(where: str, name: str, job: dict) -> None:
    """``python /app/jobs/<script>.py /config/<file> [options]``: a script of jobs/ in the image, a mounted
    config, options its subcommand accepts."""
    python, script, config, *options = shlex.split(job["entrypoint"])
    assert python == "python" and script.startswith(WORKDIR + "/"), f"{where}: {script} not under {WORKDIR}"
    local = REPO / script.removeprefix(WORKDIR + "/")
    assert local.is_file() and local.parent.name == "jobs", f"{where}: no entrypoint {local}"
    [subcommand] = re.findall(r'main\(\["(\w+)"', local.read_text())
    assert subcommand in SUBCOMMANDS, f"{where}: {local.name} runs `msif {subcommand}`, not a CLI subcommand"
    assert name.startswith(f"msif-{subcommand}"), f"{where}: {name!r} should name its subcommand ({subcommand})"
    try:
        build_parser().parse_args([subcommand, config, *options])
    except SystemExit:
        pytest.fail(f"{where}: `msif {subcommand}` does not accept {options}")
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    directory = str(Path(config).parent)
    assert directory in mounts, f"{where}: the config {config} is not under a volume mounted on the head"
    [volume] = [v for v in head["volumes"] if v["name"] == mounts[directory]]
    config_map = volume["configMap"]["name"]
    assert config_map == f"msif-{subcommand}-config", f"{where}: ConfigMap {config_map}"
    # the README and the manifest's own comment say how to create it, with the file name the entrypoint reads
    command = f"kubectl create configmap {config_map} --from-file={Path(config).name}="
    assert command in (REPO / "README.md").read_text(), f"README lacks `{command}...`"


def test_nightly_cronjob_creates_one_rayjob_per_night_with_just_enough_rights():
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for where, doc in documents()
               if where == "nightly-cronjob.yaml"}
    cron = objects[("CronJob", "msif-nightly")]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert ("ServiceAccount", account) in objects
    [binding] = [d for (kind, _), d in objects.items() if kind == "RoleBinding"
                 if {"kind": "ServiceAccount", "name": account} in d["subjects"]]
    role = objects[("Role", binding["roleRef"]["name"])]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    [container] = pod["containers"]
    assert container["image"] == IMAGE
    script = container["args"][0]
    assert "/apis/ray.io/v1/namespaces/" in script and "rayjobs" in script and "409)" in script
    template = objects[("ConfigMap", pod["volumes"][0]["configMap"]["name"])]["data"]["rayjob.yaml"]
    assert "name: msif-nightly-__DATE__" in template and 's/__DATE__/${night}/g' in script
    assert "nightly_attribution.py /config/nightly.yaml --date __DATE__" in template  # a retry keeps its night


def test_raycronjob_says_it_is_alpha_behind_a_feature_gate():
    text = (INFRA / "raycronjob.yaml").read_text()
    assert "ALPHA" in text and "feature gate" in text and "RayCronJob" in text
    assert "feature gate" in (REPO / "README.md").read_text()


def test_dockerfile_installs_the_pinned_torch_and_the_project():
    text = dockerfile()
    pinned = re.search(r"torch==([\d.]+)", (REPO / "install.sh").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text and "FROM pytorch/pytorch:${TORCH_VERSION}-${CUDA_TAG}" in text
    assert re.search(r"ARG CUDA_TAG=cuda[\d.]+-", text), "a CUDA build of torch"
    assert RAY_VERSION == ray.__version__, "the image's Ray must be the one the project is tested with"
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert IMAGE.endswith(f":{version}") and "pip install --no-cache-dir -e ." in text
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / copied).exists(), copied


def test_example_configs_load():
    from msif_ray.config import load_config

    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"example.yaml", "nightly.yaml"}
    for path in configs:
        assert load_config(path).run_dir.startswith("s3://"), f"{path.name}: a cluster's run_dir must be shared storage"
