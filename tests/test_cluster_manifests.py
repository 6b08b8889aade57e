"""The cluster deployment files in cluster/: schemas, pins, auth and the wiring between them.

Fast and offline: no Ray is started. KubeRay manifests are checked against the real CRDs in
../shared/kuberay-crds/ (beside the checkout), `ray up`'s config against the installed Ray's
ray-schema.json and its own config checks, the RayService's Serve config against Ray Serve's
schema and the project's TeacherConfig. Every validator also gets a broken copy it must reject.
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
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
KUBERAY = {  # kind: (manifest under cluster/, CRD file)
    "RayCluster": ("kuberay/raycluster.yaml", "ray.io_rayclusters.yaml"),
    "RayJob": ("kuberay/rayjob.yaml", "ray.io_rayjobs.yaml"),
    "RayService": ("kuberay/rayservice.yaml", "ray.io_rayservices.yaml"),
}
IMAGE_NAME = "distill-orchestrator"


# ---- helpers -------------------------------------------------------------------------------


def load(rel: str) -> dict:
    return yaml.safe_load((CLUSTER / rel).read_text())


def manifest(kind: str) -> dict:
    return load(KUBERAY[kind][0])


def manifest_text(kind: str) -> str:
    return (CLUSTER / KUBERAY[kind][0]).read_text()


@functools.lru_cache(maxsize=None)
def pyproject() -> dict:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the two fields these tests need
        deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        return {"project": {"version": re.search(r'^version = "([^"]+)"', text, re.M).group(1),
                            "dependencies": re.findall(r'"([^"]+)"', deps)}}
    return tomllib.loads(text)


def pins() -> dict[str, str]:
    """{'ray': '2.60.0', 'torch': '2.13.0', ...} for the `name[extras]==version` dependencies."""
    out = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def project_image() -> str:
    return f"{IMAGE_NAME}:{pyproject()['project']['version']}-ray{pins()['ray']}"


def k8s_to_jsonschema(node, strict: bool = True):
    """A CRD's OpenAPI v3 schema as plain JSON Schema (Draft 7), Kubernetes extensions handled.

    x-kubernetes-int-or-string -> anyOf integer/string (a `pattern` beside it keeps checking the
    strings, e.g. resource quantities); nullable -> null allowed; x-kubernetes-list-type: set ->
    uniqueItems. Other x-kubernetes-* are dropped: preserve-unknown-fields only says "keep unknown
    keys" (plain JSON Schema's default), and CEL `x-kubernetes-validations`, list-map keys and
    map-type cannot be expressed here (not checked). strict: objects with declared properties
    refuse unknown keys, as `kubectl apply` (field validation Strict) does, so typos fail.
    """
    if isinstance(node, list):
        return [k8s_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    maps = ("properties", "patternProperties", "definitions")  # name -> schema, names kept as is
    out = {k: ({name: k8s_to_jsonschema(s, strict) for name, s in v.items()} if k in maps
               else k8s_to_jsonschema(v, strict))
           for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (strict and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd(kind: str) -> tuple[str, str, dict]:
    """(group, kind, v1 schema as JSON Schema) from the KubeRay CRD for `kind`."""
    path = CRD_DIR / KUBERAY[kind][1]
    if not path.is_file():
        pytest.fail(f"KubeRay CRD missing: {path} (expected ../shared/kuberay-crds/ beside the checkout)",
                    pytrace=False)
    doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 25k lines
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    schema = k8s_to_jsonschema(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return doc["spec"]["group"], doc["spec"]["names"]["kind"], schema


def crd_errors(kind: str, doc: dict) -> list[str]:
    """Every schema violation of `doc` as 'path: message'; [] when valid."""
    group, crd_kind, schema = crd(kind)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    if doc.get("apiVersion") != f"{group}/v1" or doc.get("kind") != crd_kind:
        errors.append(f"<root>: apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')} != {group}/v1/{crd_kind}")
    return errors


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def containers(spec: dict):
    for g in groups(spec):
        yield from g["template"]["spec"]["containers"]


def declared_resources(group: dict) -> dict[str, float]:
    """What a group's nodes advertise to Ray: custom resources from rayStartParams.resources
    (KubeRay passes the value through a shell: '"{\\"name\\": 1}"'), GPUs from the limits."""
    raw = group.get("rayStartParams", {}).get("resources")
    res = {}
    if raw is not None:
        (unquoted,) = shlex.split(raw)
        res = json.loads(unquoted)
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    res["GPU"] = float(limits.get("nvidia.com/gpu", 0))
    return res


def serve_config() -> dict:
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def quickstart():
    from orchestrator.config import load_config

    return load_config(REPO / "examples" / "quickstart.yaml")


def quickstart_teachers() -> list[dict]:
    return yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["teachers"]


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def docker_instr(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+?)\s*$", dockerfile(), re.M)


# ---- KubeRay manifests against the CRDs ----------------------------------------------------


@pytest.mark.parametrize("kind", KUBERAY)
def test_kuberay_manifest_matches_its_crd(kind):
    assert crd_errors(kind, manifest(kind)) == []


def _set(path: str, value):
    """Mutation: set a dotted path inside the cluster spec ('-' deletes; int parts index lists)."""
    def mutate(doc):
        *parents, last = path.split(".")
        node = cluster_spec(doc)
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value == "-":
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


def _rename(path: str, new: str):
    def mutate(doc):
        *parents, last = path.split(".")
        node = cluster_spec(doc)
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[new] = node.pop(last)
    return mutate


BREAKAGES = {  # name: (mutation, a key the error path must mention)
    "rayVersion as a number": (_set("rayVersion", 2.6), "rayVersion"),
    "unknown auth mode": (_set("authOptions.mode", "none"), "mode"),
    "rayStartParams value not a string": (_set("headGroupSpec.rayStartParams.num-cpus", 0), "num-cpus"),
    "headGroupSpec not an object": (_set("headGroupSpec", ["head"]), "headGroupSpec"),
    "worker group without groupName": (_set("workerGroupSpecs.0.groupName", "-"), "workerGroupSpecs"),
    "misspelled field": (_rename("headGroupSpec.rayStartParams", "rayStartParam"), "headGroupSpec"),
    "containerPort as a string": (
        _set("headGroupSpec.template.spec.containers.0.ports.0.containerPort", "6379"), "containerPort"),
    "memory not a quantity": (
        _set("workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory", "lots"), "memory"),
}
KIND_BREAKAGES = {
    "RayJob": {"shutdownAfterJobFinishes as a string": (
        lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"), "shutdownAfterJobFinishes")},
    "RayService": {"serveConfigV2 as a mapping, not a YAML string": (
        lambda d: d["spec"].update(serveConfigV2=serve_config()), "serveConfigV2")},
}
CASES = [(k, n, *v) for k in KUBERAY for n, v in {**BREAKAGES, **KIND_BREAKAGES.get(k, {})}.items()]


@pytest.mark.parametrize("kind,name,mutate,where", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_kuberay_crd_rejects_a_broken_copy(kind, name, mutate, where):
    doc = copy.deepcopy(manifest(kind))
    mutate(doc)
    errors = set(crd_errors(kind, doc)) - set(crd_errors(kind, manifest(kind)))
    assert errors, f"{kind} with {name} passed the CRD schema: the validator checks nothing"
    assert all(where in e for e in errors), errors  # that breakage, nothing else


def test_schema_rewrite_handles_kubernetes_extensions():
    schema = k8s_to_jsonschema({
        "type": "object",
        "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": r"^\d+(Gi|Mi)?$",
                  "x-kubernetes-int-or-string": True},
            "port": {"x-kubernetes-int-or-string": True},
            "free": {"type": "object", "properties": {"a": {"type": "string"}},
                     "x-kubernetes-preserve-unknown-fields": True},
            "when": {"type": "string", "nullable": True},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        },
    })
    ok = jsonschema.Draft7Validator(schema).is_valid
    assert ok({"q": 1, "port": "http", "free": {"a": "x", "b": 1}, "when": None, "tags": ["a", "b"]})
    assert ok({"q": "16Gi", "port": 8080})
    for bad in ({"q": "lots"}, {"q": 1.5}, {"port": True}, {"tags": ["a", "a"]}, {"typo": 1},
                {"when": 3}, {"free": {"a": 1}}):
        assert not ok(bad), bad


# ---- how the three KubeRay manifests fit together --------------------------------------------


def test_rayjob_runs_the_raycluster_spec_and_rayservice_shares_head_and_gpu_group():
    cluster = manifest("RayCluster")["spec"]
    assert manifest("RayJob")["spec"]["rayClusterSpec"] == cluster
    service = cluster_spec(manifest("RayService"))
    assert service["headGroupSpec"] == cluster["headGroupSpec"]
    assert service["authOptions"] == cluster["authOptions"] and service["rayVersion"] == cluster["rayVersion"]
    (gpu,) = [g for g in service["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    (ref,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    assert (gpu["rayStartParams"], gpu["template"]) == (ref["rayStartParams"], ref["template"])


@pytest.mark.parametrize("kind", KUBERAY)
def test_cluster_shape(kind):
    spec = cluster_spec(manifest(kind))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no work lands on the head
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080,
                     "driver-metrics": 9464}  # the distill driver runs on the head (metrics.port)
    for g in groups(spec):
        c = g["template"]["spec"]["containers"][0]
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
        assert {"name": "metrics", "containerPort": 8080} in c["ports"]
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    assert len(gpu) == 1
    gpu = gpu[0]
    assert gpu["minReplicas"] <= gpu.get("replicas", gpu["minReplicas"]) <= gpu["maxReplicas"]
    pod = gpu["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in pod["containers"][0]["volumeMounts"])
    assert declared_resources(gpu) == {"teacher_node": 1, "GPU": 1.0}


def test_custom_resources_are_declared_the_way_kuberay_passes_them():
    # A bare JSON value would reach `ray start --resources={"teacher_node": 1}` unquoted and be
    # split by the shell: the value must be one shell word holding the JSON.
    for kind in KUBERAY:
        for g in cluster_spec(manifest(kind))["workerGroupSpecs"]:
            raw = g["rayStartParams"]["resources"]
            assert raw.startswith('"{') and len(shlex.split(raw)) == 1, raw
            assert all(isinstance(v, (int, float)) for v in declared_resources(g).values())
    with pytest.raises(ValueError):
        declared_resources({"rayStartParams": {"resources": '{"teacher_node": 1, "x": 2}'},
                            "template": {"spec": {"containers": [{}]}}})


# ---- the RayJob ------------------------------------------------------------------------------


def _fits(needs: dict[str, float], count: int, spec: dict, scale_key: str) -> bool:
    """`count` bundles of `needs` fit one worker group (GPU and custom resources)."""
    for g in spec["workerGroupSpecs"]:
        have = declared_resources(g)
        per_node = min((have.get(k, 0) // v for k, v in needs.items() if v > 0), default=float("inf"))
        if per_node * g[scale_key] >= count:
            return True
    return False


def test_rayjob_entrypoint_runs_jobs_distill_on_a_repo_config_that_loads_and_fits():
    from orchestrator.config import load_config

    job = manifest("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.distill"]
    config, overrides = argv[3], argv[4:]
    assert not config.startswith("/") and (REPO / config).is_file(), config
    assert (REPO / "jobs" / "distill.py").is_file()
    cfg = load_config(REPO / config, overrides)  # the overrides are real keys with valid values
    spec = job["rayClusterSpec"]
    for t in cfg.teachers:
        assert _fits({**t.resources, "GPU": t.num_gpus}, t.replicas, spec, "maxReplicas"), t.name
    gpu_teachers = sum(t.replicas for t in cfg.teachers if t.num_gpus)
    assert _fits({"teacher_node": 1, "GPU": 1}, gpu_teachers, spec, "maxReplicas")  # all at once
    assert cfg.train.worker_resources, "the student's Train workers are not placed"
    assert _fits(cfg.train.worker_resources, cfg.train.workers, spec, "maxReplicas")


def test_rayjob_runtime_env_and_lifecycle():
    from ray.runtime_env import RuntimeEnv

    from orchestrator.pipeline import RAY_ENV

    job = manifest("RayJob")["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray accepts it
    assert not {"working_dir", "py_modules", "pip", "conda"} & set(env)  # the code is in the image
    assert env["env_vars"] == RAY_ENV  # a driver inside a job relies on the job's runtime env
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0


# ---- the RayService: Serve config and teachers ----------------------------------------------


def test_rayservice_serve_config_matches_ray_serve_schema():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    cfg = serve_config()
    ServeDeploySchema.model_validate(cfg)
    # Serve ignores unknown keys; a misspelt one would silently do nothing, so refuse them here.
    assert set(cfg) <= set(ServeDeploySchema.model_fields)
    for app in cfg["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), app["name"]


def test_ray_serve_schema_rejects_a_broken_copy():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    for mutate, match in (
        (lambda c: [a.pop("route_prefix") for a in c["applications"]], 'duplicate applications for route prefix "/"'),
        (lambda c: c["applications"][1].update(name=c["applications"][0]["name"]), "multiple configs for application"),
        (lambda c: c["applications"][0].update(import_path="actors"), "invalid import path"),
        (lambda c: c["applications"][0].update(args=["mlp"]), "applications.0.args"),
    ):
        cfg = serve_config()
        mutate(cfg)
        with pytest.raises(ValidationError, match=re.escape(match)):
            ServeDeploySchema.model_validate(cfg)


def test_rayservice_serves_each_quickstart_teacher_under_the_name_labeling_jobs_attach_to():
    import importlib

    from ray.serve import Application

    from actors.teacher import app_name
    from orchestrator.config import TeacherConfig

    run = quickstart().run.name
    apps = serve_config()["applications"]
    teachers = quickstart_teachers()
    assert [a["name"] for a in apps] == [app_name(run, t["name"]) for t in teachers]
    placement = {"num_gpus": 1, "resources": {"teacher_node": 1}}
    spec = cluster_spec(manifest("RayService"))
    for app, teacher in zip(apps, teachers):
        module, _, attr = app["import_path"].partition(":")
        assert app["import_path"] == "actors.teacher:build_app"
        builder = getattr(importlib.import_module(module), attr)
        args = app["args"]
        assert args == {**teacher, **placement}  # the quickstart entry verbatim, plus placement
        t = TeacherConfig.model_validate(args)
        assert isinstance(builder(args), Application)  # binds without a running Ray
        assert _fits({**t.resources, "GPU": t.num_gpus}, t.replicas, spec, "replicas"), t.name
    needs = sum(TeacherConfig.model_validate(a["args"]).replicas for a in apps)
    assert _fits({"teacher_node": 1, "GPU": 1}, needs, spec, "replicas")  # all at once
    # ...and a labeling job attaches with the overrides rayservice.yaml's header shows
    from orchestrator.config import load_config

    attach = [f"teachers.{i}.serve_app={a['name']}" for i, a in enumerate(apps)]
    text = manifest_text("RayService")
    assert all(o in text for o in attach)
    cfg = load_config(REPO / "examples" / "quickstart.yaml", attach)
    assert [t.serve_app for t in cfg.teachers] == [a["name"] for a in apps]


# ---- `ray up` config -------------------------------------------------------------------------


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _launcher_check(cfg: dict) -> None:
    """What `ray up` runs before touching the cloud: schema, then defaults + its own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.Draft7Validator(_ray_schema()).validate(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_up_config_is_valid():
    cfg = load("ray-cluster.yaml")
    _launcher_check(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0  # as KubeRay's num-cpus "0"
    assert types["gpu_worker"]["resources"]["teacher_node"] >= 1 and types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["student_worker"]["resources"]["student_node"] >= 1


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c["docker"].update(imag=c["docker"].pop("image")), "'imag' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), "not of type 'integer'"),
    (lambda c: c["provider"].pop("type"), "'type' is a required property"),
    (lambda c: c.update(head_node_type="nope"), "must be one of `available_node_types`"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), "smaller than the sum of `min_workers`"),
], ids=["docker-typo", "fractional-gpu", "no-provider-type", "unknown-head-type", "min-over-max"])
def test_ray_up_config_rejects_a_broken_copy(mutate, match):
    cfg = load("ray-cluster.yaml")
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(match)):
        _launcher_check(cfg)


# ---- one image, one set of pins --------------------------------------------------------------


def all_images() -> dict[str, str]:
    images = {}
    for kind, (rel, _) in KUBERAY.items():
        doc = manifest(kind)
        for i, c in enumerate(containers(cluster_spec(doc))):
            images[f"{rel}#{c['name']}{i}"] = c["image"]
        for c in doc["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
            images[f"{rel}#submitter"] = c["image"]
    docker = load("ray-cluster.yaml")["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            images[f"ray-cluster.yaml#docker.{key}"] = docker[key]
    for name, t in load("ray-cluster.yaml")["available_node_types"].items():
        if "worker_image" in t.get("docker", {}):
            images[f"ray-cluster.yaml#{name}"] = t["docker"]["worker_image"]
    return images


def test_one_project_image_everywhere_built_from_the_dockerfile():
    images = all_images()
    assert len(images) >= 3 * 2 + 1
    assert set(images.values()) == {images["ray-cluster.yaml#docker.image"]}, images
    (image,) = set(images.values())
    repo, _, tag = image.rpartition(":")
    assert repo.rsplit("/", 1)[-1] == IMAGE_NAME and tag == project_image().split(":")[1], image
    assert f"-t {image} " in dockerfile() or f"-t {image}\n" in dockerfile()  # the build line says so


def test_versions_agree_with_pyproject():
    ray_pin, torch_pin = pins()["ray"], pins()["torch"]
    for kind in KUBERAY:
        assert cluster_spec(manifest(kind))["rayVersion"] == ray_pin, kind
    (base,) = docker_instr("FROM")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", base)
    assert m and m.group(1) == ray_pin, base
    floor = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert int(m.group(2)) >= int(floor)
    pinned = dict(re.findall(r"\b(torch|ray)(?:\[[^\]]*\])?==([\w.+-]+)", dockerfile()))
    assert pinned.get("torch") == torch_pin and pinned.get("ray", ray_pin) == ray_pin, pinned
    setup = " ".join(load("ray-cluster.yaml")["setup_commands"])
    assert f"'{ray_pin}'" in setup and f"'{torch_pin}'" in setup  # the ray-up image check agrees


def test_dockerfile_installs_the_project_where_the_manifests_expect_it():
    text = dockerfile()
    assert re.search(r"^RUN pip install[^\n]*\s\.(\s|$)", text, re.M)  # the project itself
    copied = {src.rstrip("/") for c in docker_instr("COPY") for src in c.split()[:-1] if not src.startswith("--")}
    assert {"examples", "jobs", "orchestrator", "actors", "pyproject.toml"} <= copied
    (workdir,) = docker_instr("WORKDIR")
    runs = f"{workdir}/{quickstart().output_dir}"
    # entrypoint paths are relative to the WORKDIR; runs/ there is the shared volume everywhere
    for kind in KUBERAY:
        for c in containers(cluster_spec(manifest(kind))):
            assert any(m["mountPath"] == runs for m in c["volumeMounts"]), (kind, c["name"])
    assert any(o.endswith(f":{runs}") for o in load("ray-cluster.yaml")["docker"]["run_options"])


# ---- authentication --------------------------------------------------------------------------


def test_token_auth_is_on_everywhere():
    secrets = set()
    for kind in KUBERAY:
        spec = cluster_spec(manifest(kind))
        assert spec["authOptions"]["mode"] == "token", kind
        secrets.add(spec["authOptions"]["secretName"])
        for c in containers(spec):  # no token literal in a manifest: only the Secret holds it
            assert not [e for e in c.get("env", []) if e["name"] == "RAY_AUTH_TOKEN" and "value" in e]
            assert all(e.get("value") == "token" for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE")
    assert len(secrets) == 1  # one token for every cluster and client
    cfg = load("ray-cluster.yaml")
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.index("export RAY_AUTH_MODE=token") < cmd.index("ray start"), cmd
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]  # Ray's default token path


def test_nothing_under_cluster_disables_auth():
    disabled = re.compile(r"RAY_AUTH_MODE.{0,40}disabled|\bmode\W{0,4}disabled|auth\w*\W{0,6}(off|false|none)\b",
                          re.I)
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not disabled.search(line), f"{path.relative_to(REPO)}:{n}: {line.strip()}"
    assert disabled.search("env: [{name: RAY_AUTH_MODE, value: disabled}]")
    assert disabled.search("authOptions: {mode: disabled}")
    assert disabled.search("RAY_AUTH_MODE=disabled ray start --head")
