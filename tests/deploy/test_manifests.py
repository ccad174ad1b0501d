"""``deploy/``: the Kubernetes manifests against the Kubernetes API schemas (offline: kubernetes-validate bundles
them; no cluster runs here), the kustomize overlays applied here in Python, the manifests against the real
``mvgen serve`` parser and the real tritonserver's metric names, and the Dockerfile's install steps against the
Makefile's (the README's set-up), so they cannot drift apart.
"""
from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from engine.warmup import DEFAULT_BUDGET_S
from server.launcher import READY_TIMEOUT_S, TRITON_EXIT_TIMEOUT_S

kv = pytest.importorskip("kubernetes_validate",
                         reason="kubernetes-validate is not installed (the `test` extra: pip install -e '.[test]')")

KUBERNETES = "1.35.0"  # a release kubernetes-validate bundles; validated in strict mode (unknown fields refused)
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAYS = sorted(p for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
KUSTOMIZATIONS = [BASE, *OVERLAYS]
# pip options that change nothing about what gets installed; any other option must match
COSMETIC_PIP_OPTIONS = {"--quiet", "-q", "--no-cache-dir"}


def _ids(paths):
    return [str(p.relative_to(DEPLOY)) for p in paths]


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def build(folder: Path) -> list[dict]:
    """What ``kustomize build folder`` outputs, for the features these kustomizations use: resources (files and
    folders) and JSON 6902 patches with a kind/name target. Anything else fails here rather than being ignored."""
    kustomization = load_yaml(folder / "kustomization.yaml")[0]
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{folder}: build() does not apply {sorted(unknown)}; teach it or drop them"
    resources = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        resources += build(path) if path.is_dir() else load_yaml(path)
    for patch in kustomization.get("patches", []):
        operations = load_yaml(folder / patch["path"])[0]
        assert isinstance(operations, list), f"{patch['path']}: only JSON 6902 patches are applied here"
        targets = [r for r in resources if all((r["kind"] if k == "kind" else r["metadata"][k]) == v
                                               for k, v in patch["target"].items())]
        assert len(targets) == 1, f"{patch['path']}: target {patch['target']} matches {len(targets)} resources"
        apply_json6902(targets[0], operations)
    return resources


def apply_json6902(document: dict, operations: list[dict]) -> None:
    """RFC 6902 ``add`` and ``replace`` (RFC 6901 pointers; ``-`` appends); other operations are refused."""
    for op in operations:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        elif op["op"] == "replace" and isinstance(node, list):
            node[int(last)] = op["value"]
        elif op["op"] == "add" or (op["op"] == "replace" and last in node):
            node[last] = op["value"]
        else:
            raise AssertionError(f"unsupported or failing JSON 6902 operation {op}")


def by_kind_and_name(resources: list[dict]) -> dict:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


def one(resources: list[dict], kind: str) -> dict:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@functools.cache
def mvgen_parser():
    from mvgen.cli import build_parser

    return build_parser({})


def serve_args(container: dict):
    """The container's arguments parsed by the real ``mvgen serve`` parser (the image's entrypoint is mvgen)."""
    assert container["args"][0] == "serve", f"the container must run `mvgen serve`, got {container['args'][:1]}"
    return mvgen_parser().parse_args(container["args"])


# --- schemas ------------------------------------------------------------------------------------------------

def test_kustomization_lists_exactly_the_resource_files():
    listed = load_yaml(BASE / "kustomization.yaml")[0]["resources"]
    present = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


@pytest.mark.parametrize("path", sorted(BASE.glob("*.yaml")), ids=_ids(sorted(BASE.glob("*.yaml"))))
def test_base_file_is_valid(path):
    documents = load_yaml(path)
    assert documents, f"{path} is empty"
    for document in documents:
        if path.name == "kustomization.yaml":  # kustomize's own file: no Kubernetes schema
            assert (document["apiVersion"], document["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
        else:
            kv.validate(document, KUBERNETES, strict=True)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_built_kustomization_is_valid(folder):
    resources = build(folder)
    kinds = {"PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"}
    assert {r["kind"] for r in resources} == kinds
    for resource in resources:
        kv.validate(resource, KUBERNETES, strict=True)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_build_here_equals_kustomize(folder):
    """build() against the real kustomize, where one is installed (``kubectl kustomize`` runs offline)."""
    command = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    if not shutil.which(command[0]):
        pytest.skip("neither kustomize nor kubectl on PATH: the overlays are checked through build() alone")
    output = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=60, check=True).stdout
    theirs = [r for r in yaml.safe_load_all(output) if r]
    assert by_kind_and_name(theirs) == by_kind_and_name(build(folder))


@pytest.mark.parametrize("path, value, message", [
    (["spec", "replicas"], "two", "is not of type"),
    (["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "paht"], "/v2/health/ready",
     "Additional properties are not allowed"),
])
def test_validator_rejects_a_broken_deployment(path, value, message):
    deployment = one(build(BASE), "Deployment")  # a fresh copy: build() reads the files each time
    node = deployment
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kv.ValidationError, match=message):
        kv.validate(deployment, KUBERNETES, strict=True)


# --- the manifests agree with each other, with `mvgen serve` and with tritonserver ----------------------------

@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_gpus_equal_the_world_size(folder):
    container = one(build(folder), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = serve_args(container)
    world = args.sp * (2 if args.cfg_parallel else 1)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == world
    assert container["resources"].get("requests", {}).get("nvidia.com/gpu", world) == world


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_pod_serves_the_checkpoint_volume_on_its_ports(folder):
    resources = build(folder)
    pod = one(resources, "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = serve_args(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.host == "0.0.0.0", "in a pod the server must listen on every interface"
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                     "health": args.health_port} == {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
    # the probes read mvgen serve's truthful health (server.health), not Triton's /v2/health/*
    for probe, path in [("startupProbe", "/health/ready"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}
    startup = container["startupProbe"]
    # a 14B checkpoint loads for minutes, then every model warms up (engine.warmup) within its budget
    assert startup["periodSeconds"] * startup["failureThreshold"] >= READY_TIMEOUT_S + DEFAULT_BUDGET_S
    # the health port's /metrics: Triton's page and mvgen serve's own (restarts, models healthy)
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"], annotations["prometheus.io/path"]) \
        == ("true", str(args.health_port), "/metrics")
    # SIGTERM: the requests in flight get --shutdown-grace, then tritonserver its own exit timeout, before the kill
    assert pod["spec"]["terminationGracePeriodSeconds"] >= args.shutdown_grace + TRITON_EXIT_TIMEOUT_S
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes[mounts["models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert mounts["models"]["readOnly"] and Path(args.model).parent == Path(mounts["models"]["mountPath"])
    pvc = one(resources, "PersistentVolumeClaim")
    assert (pvc["metadata"]["name"], pvc["spec"]["accessModes"]) == (claim, ["ReadOnlyMany"])
    assert mounts["dshm"]["mountPath"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "nvidia.com/gpu.product" in pod["spec"]["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_probe_paths_are_what_the_health_endpoint_answers(folder):
    """Each probe's path, asked of the real ``server.health`` endpoint: 200 while its check passes, 503 when it fails
    (a path it does not serve would answer 404 both times)."""
    import urllib.error
    import urllib.request

    from server.health import HealthEndpoint
    from server.launcher import free_port

    container = one(build(folder), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    failing = {"ready": [], "live": []}
    port = free_port()
    endpoint = HealthEndpoint("127.0.0.1", port, lambda: failing["ready"], lambda: failing["live"], str).start()
    try:
        for probe, check in [("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "live")]:
            url = f"http://127.0.0.1:{port}{container[probe]['httpGet']['path']}"
            for reasons, status in (([], 200), (["a model is down"], 503)):
                failing[check] = reasons
                try:
                    code = urllib.request.urlopen(url, timeout=5).status
                except urllib.error.HTTPError as error:
                    code = error.code
                assert code == status, f"{probe} {url}: {code}, expected {status}"
            failing[check] = []
    finally:
        endpoint.stop()


def test_service_routes_grpc_http_and_metrics_to_the_pods():
    resources = build(BASE)
    pod = one(resources, "Deployment")["spec"]["template"]
    service = one(resources, "Service")["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {p["name"]: (p["port"], container_ports[p["targetPort"]]) for p in service["ports"]} \
        == {"grpc": (8001, 8001), "http": (8000, 8000), "metrics": (8002, 8002)}


def test_hpa_scales_on_the_loop_queue_the_server_exports():
    """The loop's queue gauge is a metric ``server.metrics.LoopMetrics`` declares, served by the adapter."""
    resources = build(BASE)
    loop, _ = one(resources, "HorizontalPodAutoscaler")["spec"]["metrics"]
    name = loop["pods"]["metric"]["name"]
    assert loop["type"] == "Pods" and name == "mvgen_loop_queue_requests"
    assert f'"{name}"' in (ROOT / "server" / "metrics.py").read_text()
    rules = load_yaml(DEPLOY / "prometheus-adapter-values.yaml")[0]["rules"]["custom"]
    assert any(rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name for rule in rules)


def test_hpa_scales_on_a_queue_gauge_that_tritonserver_exports_for_the_served_denoisers():
    from engine.denoiser_io import denoiser_model_name

    resources = build(BASE)
    hpa = one(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == one(resources, "Deployment")["metadata"]["name"]
    _, metric = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    (expression,) = metric["pods"]["metric"]["selector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == ("model", "In")
    assert set(expression["values"]) == {denoiser_model_name(0), denoiser_model_name(1)}
    adapter_rule = load_yaml(DEPLOY / "prometheus-adapter-values.yaml")[0]["rules"]["custom"][0]
    assert adapter_rule["seriesQuery"].startswith(name + "{") and adapter_rule["name"]["as"] == name
    pytriton = pytest.importorskip("pytriton", reason="nvidia-pytriton (its tritonserver core) is not installed")
    (core,) = (Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs").glob("libtritonserver*.so*")
    assert name.encode() in core.read_bytes(), f"tritonserver does not export {name}"


# --- the image ------------------------------------------------------------------------------------------------

def makefile_install_commands() -> list[list[str]]:
    """The shell lines of the Makefile's ``$(BIN)/mvgen`` recipe (the README's install steps)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("$(BIN)/mvgen:"))) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        if not line.strip().startswith("#"):
            recipe.append(line.strip().replace("$(BIN)/", ""))
    return [c for line in recipe for c in pip_installs(line)]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comment lines dropped."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def pip_installs(shell: str) -> list[list[str]]:
    """The arguments of every ``pip install`` in a shell line (``&&``/``||``/``;`` separate commands)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in list(lexer) + [";"]:
        if token in {"&&", "||", ";", "(", ")", "|"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c[i + 1:] for c in commands for i in range(1, len(c))
            if c[i] == "install" and c[i - 1].rsplit("/", 1)[-1] in {"pip", "pip3"}]


def what_gets_installed(arguments: list[str], drop_extras: set[str] = frozenset()) -> tuple:
    """(significant options, requirements) of one ``pip install``: names canonical, the project as its extras."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    options, requirements = set(), set()
    for token in arguments:
        if token in ("-e", "--editable"):  # editable or not, the same distributions get installed
            continue
        if token.startswith("-"):
            if token not in COSMETIC_PIP_OPTIONS:
                options.add(token)
        elif token.startswith("."):
            extras = re.fullmatch(r"\.\[(.*)\]", token)
            names = set(extras.group(1).split(",")) if extras else set()
            requirements.add(("<project>", frozenset(names - drop_extras)))
        else:
            requirement = Requirement(token)
            requirements.add((canonicalize_name(requirement.name), str(requirement.specifier),
                              frozenset(requirement.extras), str(requirement.marker or "")))
    return frozenset(options), frozenset(requirements)


def test_dockerfile_installs_what_the_makefile_installs():
    """Same commands in the same order, same packages and pins; the image may leave out the `test` extra."""
    make = [what_gets_installed(c, drop_extras={"test"}) for c in makefile_install_commands()]
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    docker = [what_gets_installed(c, drop_extras={"test"}) for rest in runs for c in pip_installs(rest)]
    assert len(make) == 3, f"the Makefile's install steps changed shape: {makefile_install_commands()}"
    assert docker == make


def test_dockerfile_serves_the_layout_the_manifests_expect():
    instructions = dockerfile_instructions()
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), base
    values = {keyword: rest for keyword, rest in instructions}
    container = one(build(BASE), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert sorted(int(p) for p in values["EXPOSE"].split()) == sorted(p["containerPort"] for p in container["ports"])
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert values["VOLUME"] == models["mountPath"]
    assert yaml.safe_load(values["ENTRYPOINT"])[-1] == "mvgen"
    image_default = serve_args({"args": yaml.safe_load(values["CMD"])})
    assert (image_default.host, Path(image_default.model).parent) == ("0.0.0.0", Path(models["mountPath"]))
