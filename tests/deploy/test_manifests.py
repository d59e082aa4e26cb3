"""The Kubernetes overlays render, validate against the API schemas and are wired right."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from k8s_helpers import (
    K8S_DIR,
    MODEL_REPOSITORY,
    MODELS_DIR,
    OPERATOR_KINDS,
    OVERLAYS,
    Rendered,
    all_containers,
    container,
    container_ports,
    pod_labels,
    pod_spec,
    selector_matches,
)

# The oldest Kubernetes the manifests support (native preStop sleep: 1.30) and a current one.
SCHEMA_VERSIONS = ("1.30.0", "1.35.0")
FIELDLENS_SERVICES = ("router", "specialist", "tiny")
GRPC_BACKENDS = ("specialist", "tiny", "triton")
SCALED_OUT = ("router", "specialist", "tiny", "triton")
HPA_MANAGED = ("router", "triton")
# Secrets the gpu (production) overlay expects to be created out of band.
EXTERNAL_SECRETS = {"gpu": {"fieldlens-write-token"}, "cpu": set()}
CPU_ONLY_TRITON_FLAGS = {"--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"}
# Read by OpenMP, OpenBLAS and MKL at load; they must follow FIELDLENS_CPU_THREADS.
THREAD_LIBRARY_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Kubernetes' dependent environment variables: $(NAME) of one defined before, $$ a literal $.
_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, overlay, version):
    import kubernetes_validate

    checked = 0
    for doc in rendered[overlay].docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue  # CRDs: checked by test_operator_objects_are_well_formed
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operator_objects_are_well_formed(rendered, overlay):
    r = rendered[overlay]
    assert set(r.kind("PodMonitor")) == {"fieldlens-services", "triton"}
    assert set(r.kind("PrometheusRule")) == {"fieldlens"}
    for monitor in r.kind("PodMonitor").values():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [
            w for w in r.workloads() if selector_matches(monitor["spec"]["selector"], pod_labels(w))
        ]
        assert selected, f"PodMonitor {monitor['metadata']['name']} selects no pods"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for w in selected:
                ports = {name for c in pod_spec(w)["containers"] for name in container_ports(c)}
                assert endpoint["port"] in ports, (monitor["metadata"]["name"], w["metadata"])
    scraped = {
        w["metadata"]["name"]
        for m in r.kind("PodMonitor").values()
        for w in r.workloads()
        if selector_matches(m["spec"]["selector"], pod_labels(w))
    }
    assert scraped == set(SCALED_OUT)
    rule = r.get("PrometheusRule", "fieldlens")
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            assert ("record" in item) != ("alert" in item) and item["expr"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_restricted_fieldlens_namespace(rendered, overlay):
    r = rendered[overlay]
    namespace = r.get("Namespace", "fieldlens")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in r.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "fieldlens", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(rendered, overlay):
    for w in rendered[overlay].workloads():
        name = w["metadata"]["name"]
        spec = pod_spec(w)
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in all_containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            image = c["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicated_components_spread_and_have_disruption_budgets(rendered, overlay):
    r = rendered[overlay]
    budgets = r.kind("PodDisruptionBudget").values()
    for name in SCALED_OUT:
        w = r.get("Deployment", name)
        keys = {c["topologyKey"] for c in pod_spec(w)["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        covering = [b for b in budgets if selector_matches(b["spec"]["selector"], pod_labels(w))]
        assert len(covering) == 1, name
        # maxUnavailable, not minAvailable: a single replica (laptop) still drains.
        assert covering[0]["spec"] == {**covering[0]["spec"], "maxUnavailable": 1}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_own_their_replica_counts(rendered, overlay):
    r = rendered[overlay]
    hpas = r.kind("HorizontalPodAutoscaler")
    assert set(hpas) == set(HPA_MANAGED)
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        # A replicas field would fight the autoscaler on every apply.
        assert "replicas" not in r.get("Deployment", name)["spec"], name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpas["router"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    triton_metric = hpas["triton"]["spec"]["metrics"][0]
    assert triton_metric["type"] == "Pods"
    from k8s_helpers import adapter_rules

    published = {rule["name"]["as"] for rule in adapter_rules()}
    assert triton_metric["pods"]["metric"]["name"] in published


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_name_their_ports(rendered, overlay):
    r = rendered[overlay]
    for name, svc in r.kind("Service").items():
        selector = {"matchLabels": svc["spec"]["selector"]}
        selected = [w for w in r.workloads() if selector_matches(selector, pod_labels(w))]
        assert len(selected) == 1, name
        ports = {n for c in pod_spec(selected[0])["containers"] for n in container_ports(c)}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
    for name in (*GRPC_BACKENDS, "qdrant"):
        assert r.get("Service", name)["spec"]["clusterIP"] == "None", f"{name} must be headless"
    assert r.get("StatefulSet", "qdrant")["spec"]["serviceName"] == "qdrant"
    assert r.get("StatefulSet", "qdrant")["spec"]["volumeClaimTemplates"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_grpc_health_and_shutdown_outlasts_the_grace(rendered, overlay):
    r = rendered[overlay]
    settings = r.config_map_data(_config_map_name(r, "fieldlens-settings"))
    grace_s = float(settings["FIELDLENS_GRACE_S"])
    for name in FIELDLENS_SERVICES:
        w = r.get("Deployment", name)
        c = container(w, name)
        grpc_port = container_ports(c)["grpc"]
        # Readiness asks the overall "" status, which is honest about dependencies.
        assert c["readinessProbe"]["grpc"] == {"port": grpc_port}, name
        assert "livenessProbe" in c
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod_spec(w)["terminationGracePeriodSeconds"] > pre_stop + grace_s, name
    triton = container(r.get("Deployment", "triton"), "triton")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "--strict-readiness=true" in triton["args"]
    timeout = next(int(a.split("=")[1]) for a in triton["args"] if a.startswith("--exit-timeout"))
    pre_stop = triton["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec(r.get("Deployment", "triton"))["terminationGracePeriodSeconds"] > (
        timeout + pre_stop
    )


def _config_map_name(r: Rendered, prefix: str) -> str:
    names = [n for n in r.kind("ConfigMap") if n == prefix or n.startswith(prefix + "-")]
    assert len(names) == 1, (prefix, names)
    return names[0]


def _container_env(r: Rendered, w: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets, resolved from the rendered ConfigMaps/Secrets."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(r.config_map_data(source["configMapRef"]["name"]))
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = _ENV_REFERENCE.sub(
                lambda m: "$" if m.group(1) is None else env.get(m.group(1), m.group(0)),
                item["value"],
            )
            continue
        ref = item["valueFrom"]
        if "configMapKeyRef" in ref:
            key_ref = ref["configMapKeyRef"]
            env[item["name"]] = r.config_map_data(key_ref["name"])[key_ref["key"]]
        else:
            key_ref = ref["secretKeyRef"]
            data = r.secret_data(key_ref["name"])
            if data is None:
                assert key_ref["name"] in EXTERNAL_SECRETS[r.overlay], key_ref
                env[item["name"]] = "provided-out-of-band"
            else:
                env[item["name"]] = data[key_ref["key"]]
    return env


def _mounted_file(r: Rendered, w: dict[str, Any], c: dict[str, Any], path: str, tmp: Path) -> Path:
    """Write the ConfigMap file mounted at `path` in the container to `tmp`; return it."""
    volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
    for mount in c["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            data = r.config_map_data(volumes[mount["name"]]["configMap"]["name"])
            local = tmp / Path(path).name
            local.write_text(data[path[len(prefix) :]])
            return local
    raise AssertionError(f"{path} is not mounted")


def _target(addr: str) -> tuple[str, int]:
    host, _, port = addr.removeprefix("dns:///").removeprefix("grpc://").rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_environment_is_accepted_by_the_real_settings(rendered, overlay, tmp_path):
    """Each container's env, as Kubernetes would assemble it, goes through the services' own
    settings parsers; addresses point at rendered Services and ports."""
    from fieldlens.common.model_set import load_model_set
    from fieldlens.common.settings import ClassifierSettings, RouterSettings

    r = rendered[overlay]
    for name in FIELDLENS_SERVICES:
        w = r.get("Deployment", name)
        c = container(w, name)
        env = _container_env(r, w, c)
        if name == "router":
            env["FIELDLENS_ROUTING"] = str(
                _mounted_file(r, w, c, env["FIELDLENS_ROUTING"], tmp_path)
            )
            settings = RouterSettings.from_env(env)
            common = settings.common
            assert settings.qdrant_addr and settings.redis_addr
            assert env["FIELDLENS_WRITE_TOKEN"]
            # The routing table in the ConfigMap is valid for the shipped model set.
            load_model_set(MODELS_DIR, settings.routing_path)
            addrs = {
                "triton": settings.triton_addr,
                "specialist": settings.specialist_addr,
                "tiny": settings.tiny_addr,
                "redis": settings.redis_addr,
                "qdrant": settings.qdrant_addr,
            }
            for backend in GRPC_BACKENDS:
                assert addrs[backend].startswith("dns:///"), backend
            for backend, addr in addrs.items():
                host, port = _target(addr)
                assert host == backend
                svc = r.get("Service", host)
                assert port in {p["port"] for p in svc["spec"]["ports"]}, (backend, addr)
        else:
            settings = ClassifierSettings.from_env(name, env)
            common = settings.common
            if name == "specialist":
                assert _target(settings.triton_addr) == ("triton", 8001)
        ports = container_ports(c)
        assert common.listen_addr == f"0.0.0.0:{ports['grpc']}"
        assert (common.metrics_addr, common.metrics_port) == ("0.0.0.0", ports["metrics"])
        models_mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert models_mount.get("readOnly") is True
        assert str(common.models_dir).startswith(models_mount["mountPath"] + "/")


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _triton_instances() -> int:
    """Model instances of the shipped repository: each is a Python-backend stub process."""
    return sum(
        int(count)
        for config in MODEL_REPOSITORY.glob("*/config.pbtxt")
        for count in re.findall(r"count: (\d+)", config.read_text())
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_thread_pools_are_set_and_fit_the_cpu_limit(rendered, overlay):
    """Every fieldlens process sizes its BLAS/OpenMP/torch pools with FIELDLENS_CPU_THREADS
    (the library variables agree with it), and its pools fit the container's CPU limit;
    Triton runs one stub process per model instance, each with pools of that size."""
    from fieldlens.common.settings import CPU_THREADS_ENV, cpu_threads_from_env

    r = rendered[overlay]
    for name in (*FIELDLENS_SERVICES, "triton"):
        w = r.get("Deployment", name)
        c = container(w, name)
        env = _container_env(r, w, c)
        assert CPU_THREADS_ENV in env, name
        threads = cpu_threads_from_env(env)
        assert {var: env.get(var) for var in THREAD_LIBRARY_VARS} == dict.fromkeys(
            THREAD_LIBRARY_VARS, str(threads)
        ), name
        processes = _triton_instances() if name == "triton" else 1
        assert processes > 0
        assert threads * processes <= _cpus(c["resources"]["limits"]["cpu"]), (name, threads)


def _run_sync(
    script: str, env: dict[str, str], source: Path, target: Path
) -> subprocess.CompletedProcess[str]:
    target.mkdir(exist_ok=True)
    return subprocess.run(
        ["sh", "-c", script],
        env={
            "PATH": "/usr/bin:/bin",
            **env,
            "MODEL_SET_SOURCE": str(source),
            "MODEL_SET_TARGET": str(target),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def models_image(tmp_path_factory) -> Path:
    """The layout of the fieldlens-models image (docker/models.Dockerfile), without weights."""
    root = tmp_path_factory.mktemp("models-image") / "models"
    shutil.copytree(MODELS_DIR, root / "fieldlens", ignore=shutil.ignore_patterns("report"))
    for config in MODEL_REPOSITORY.glob("*/config.pbtxt"):
        dest = root / "triton" / config.parent.name / "config.pbtxt"
        dest.parent.mkdir(parents=True)
        shutil.copy(config, dest)
    return root


@pytest.mark.parametrize(("overlay", "kind"), [("cpu", "KIND_CPU"), ("gpu", "KIND_GPU")])
def test_model_set_init_container_delivers_the_repository(
    rendered, overlay, kind, models_image, tmp_path
):
    """Runs the rendered init container's script with its rendered environment."""
    r = rendered[overlay]
    script = r.config_map_data(_config_map_name(r, "fieldlens-model-sync"))["sync-models.sh"]
    for name in (*FIELDLENS_SERVICES, "triton"):
        w = r.get("Deployment", name)
        init = next(c for c in pod_spec(w)["initContainers"] if c["name"] == "model-set")
        assert _image_name(init["image"]) == "fieldlens-models"
        target = tmp_path / name
        done = _run_sync(script, _container_env(r, w, init), models_image, target)
        assert done.returncode == 0, done.stderr
        if name == "triton":
            configs = sorted(target.glob("triton/*/config.pbtxt"))
            assert len(configs) == len(list(MODEL_REPOSITORY.glob("*/config.pbtxt"))) > 0
            for config in configs:
                kinds = re.findall(r"kind: (KIND_\w+)", config.read_text())
                assert kinds and set(kinds) == {kind}, config
            assert not (target / "fieldlens").exists()
        else:
            assert (target / "fieldlens" / "manifest.json").is_file()
            assert not (target / "triton").exists()
    # An image holding another model set stops the pod.
    init = pod_spec(r.get("Deployment", "router"))["initContainers"][0]
    env = {
        **_container_env(r, r.get("Deployment", "router"), init),
        "MODEL_SET_VERSION": "ms-other",
    }
    refused = _run_sync(script, env, models_image, tmp_path / "refused")
    assert refused.returncode == 1 and "ms-other" in refused.stderr


def test_model_set_pin_matches_the_shipped_model_set(rendered):
    """The models image tag and the version ConfigMap name deploy/models' model set."""
    import json

    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    check = subprocess.run(
        [sys.executable, str(K8S_DIR / "pin_model_set.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for r in rendered.values():
        data = r.config_map_data(_config_map_name(r, "fieldlens-model-set"))
        assert data["MODEL_SET_VERSION"] == manifest["model_set_version"]
        assert data["EMBEDDING_VERSION"] == manifest["embedding_version"]
        images = {c["image"] for w in r.workloads() for c in all_containers(w)}
        assert any(i.endswith(f"fieldlens-models:{manifest['model_set_version']}") for i in images)


def test_gpu_overlay_puts_triton_on_the_gpu_pool(rendered):
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    server = container(gpu.get("Deployment", "triton"), "triton")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"].endswith("-cuda")
    for name in ("triton", "specialist"):
        spec = pod_spec(gpu.get("Deployment", name))
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
        assert "fieldlens.dev/pool" in keys
    # The specialists sit next to Triton but hold no GPU.
    specialist = container(gpu.get("Deployment", "specialist"), "specialist")
    assert "nvidia.com/gpu" not in specialist["resources"]["limits"]
    cpu_args = container(cpu.get("Deployment", "triton"), "triton")["args"]
    assert set(cpu_args) - set(server["args"]) == CPU_ONLY_TRITON_FLAGS
    assert set(server["args"]) - set(cpu_args) == {"--allow-gpu-metrics=true"}
    for w in cpu.workloads():
        for c in all_containers(w):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert "tolerations" not in pod_spec(w)


# -- NetworkPolicies -------------------------------------------------------------------------


class _Pod:
    def __init__(self, namespace: str, labels: dict[str, str]) -> None:
        self.namespace = namespace
        self.labels = labels
        self.namespace_labels = {"kubernetes.io/metadata.name": namespace}


def _peer_matches(peer: dict[str, Any], policy_ns: str, pod: _Pod) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_ns:
        return False
    return selector_matches(peer.get("podSelector"), pod.labels)


def _port_allowed(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def _allowed(
    policies: list[dict[str, Any]],
    direction: str,
    subject: _Pod,
    peer: _Pod,
    port: int,
    protocol: str,
) -> bool:
    """Whether `subject`'s policies let traffic in (from `peer`) or out (to `peer`)."""
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and kind in p["spec"]["policyTypes"]
        and selector_matches(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(direction, []):
            peers = rule.get(peers_key)
            if (
                not peers
                or any(_peer_matches(x, policy["metadata"]["namespace"], peer) for x in peers)
            ) and _port_allowed(rule, port, protocol):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_fieldlens_flows(rendered, overlay):
    r = rendered[overlay]
    policies = list(r.kind("NetworkPolicy").values())
    assert "default-deny" in r.kind("NetworkPolicy")
    pods = {w["metadata"]["name"]: _Pod("fieldlens", pod_labels(w)) for w in r.workloads()}
    pods["client"] = _Pod("default", {"app": "some-client"})
    pods["prometheus"] = _Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    pods["kube-dns"] = _Pod("kube-system", {"k8s-app": "kube-dns"})
    ports = {
        w["metadata"]["name"]: {
            n: p for c in pod_spec(w)["containers"] for n, p in container_ports(c).items()
        }
        for w in r.workloads()
    }

    def can(src: str, dst: str, port: int, protocol: str = "TCP") -> bool:
        return _allowed(policies, "egress", pods[src], pods[dst], port, protocol) and _allowed(
            policies, "ingress", pods[dst], pods[src], port, protocol
        )

    grpc = {name: ports[name]["grpc"] for name in (*FIELDLENS_SERVICES, "triton", "qdrant")}
    expected_grpc = {
        ("client", "router"),
        ("prometheus", "router"),
        ("router", "triton"),
        ("router", "specialist"),
        ("router", "tiny"),
        ("router", "qdrant"),
        ("specialist", "triton"),
    }
    sources = (*pods.keys(),)
    for src in sources:
        for dst in grpc:
            if src in ("kube-dns",) or src == dst:
                continue
            assert can(src, dst, grpc[dst]) == ((src, dst) in expected_grpc), (src, dst)
        if src not in ("kube-dns",):
            assert can(src, "redis", ports["redis"]["redis"]) == (src == "router"), src
    for name in SCALED_OUT:
        metrics = ports[name]["metrics"]
        assert can("prometheus", name, metrics), name
        assert not can("client", name, metrics), name
        assert not can("router", name, metrics) or name == "router", name
    for name in pods:
        if pods[name].namespace == "fieldlens":
            assert can(name, "kube-dns", 53, "UDP"), name
            assert not can(name, "client", 443), name


# -- Dockerfiles -------------------------------------------------------------------------------

DOCKERFILES = {
    "fieldlens": "fieldlens.Dockerfile",
    "fieldlens-triton": "triton.Dockerfile",
    "fieldlens-models": "models.Dockerfile",
}


def _stages(path: Path) -> tuple[list[str], list[str]]:
    """(resolved FROM images, lines) of a Dockerfile, global ARG defaults substituted."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    args = {}
    for ln in lines:
        if ln.startswith("FROM "):
            break
        m = re.match(r"ARG (\w+)=(\S+)", ln)
        if m:
            args[m.group(1)] = m.group(2)
    froms = []
    for ln in lines:
        if ln.startswith("FROM "):
            image = ln.split()[1]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            froms.append(image)
    return froms, lines


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_are_multi_stage_pinned_and_non_root(image, rendered):
    path = K8S_DIR.parents[1] / "docker" / DOCKERFILES[image]
    froms, lines = _stages(path)
    assert len(froms) >= 2, "multi-stage"
    stage_names = {ln.split()[-1] for ln in lines if ln.startswith("FROM ") and " AS " in ln}
    for ref in froms:
        if ref in stage_names:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", ref), f"unpinned base image {ref}"
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")) :]
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    for ln in lines:
        m = re.match(r"COPY (?!--from)(?:--\S+ )*(\S+)", ln)
        if m:
            assert (K8S_DIR.parents[1] / m.group(1)).exists(), f"{path.name}: {m.group(1)}"
    assert (path.parent / f"{path.name}.dockerignore").is_file()
    # The pods run as the image's user (the models image only needs to be readable).
    if image != "fieldlens-models":
        for r in rendered.values():
            for w in r.workloads():
                names = {_image_name(c["image"]) for c in pod_spec(w)["containers"]}
                if image in names:
                    assert pod_spec(w)["securityContext"]["runAsUser"] == uid, w["metadata"]["name"]


def _image_name(ref: str) -> str:
    """ "registry/path/name:tag" -> "name"."""
    return ref.rsplit(":", 1)[0].rsplit("/", 1)[-1]
