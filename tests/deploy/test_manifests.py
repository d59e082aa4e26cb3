"""The Kubernetes overlays render, validate against the API schemas and are wired right."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from k8s_helpers import (
    K8S_DIR,
    MODEL_REPOSITORY,
    MODELS_DIR,
    OPERATOR_KINDS,
    OVERLAYS,
    PUBLISH_JOB,
    WORKLOAD_KINDS,
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
# The label each workload controller puts on its pods, naming their revision.
REVISION_LABELS = {"Deployment": "pod-template-hash", "StatefulSet": "controller-revision-hash"}
# Replicated in every overlay, the laptop's included: the Learn fan-out to every tiny pod is
# what changes with more than one.
ALWAYS_REPLICATED = ("tiny",)
# Services whose start replays a journal before the port opens, and the seconds their
# startupProbe must allow at least.
SLOW_STARTS = {"router": 300, "tiny": 300}
# The router's and specialist's Triton address (today's name, and a prefixed one if it moves).
TRITON_ADDR_ENVS = frozenset({"TRITON_ADDR", "FIELDLENS_TRITON_ADDR"})
INSTANCE_KIND_ENV = "FIELDLENS_TRITON_INSTANCE_KIND"
# fieldlens images named in the README's build and kind steps, with their tags.
_LOCAL_IMAGE = re.compile(r"(?<![\w/.-])(fieldlens(?:-triton|-models)?):([\w.-]+)")
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
        _assert_locked_down(w)


def _assert_locked_down(w: dict[str, Any]) -> None:
    """The restricted Pod Security profile, resources and a pinned image everywhere."""
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
        w = r.workload(name)
        constraints = pod_spec(w)["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        # Spread within one revision, by the label the workload's controller sets on its pods.
        for c in constraints:
            assert c["matchLabelKeys"] == [REVISION_LABELS[w["kind"]]], name
        covering = [b for b in budgets if selector_matches(b["spec"]["selector"], pod_labels(w))]
        assert len(covering) == 1, name
        # maxUnavailable, not minAvailable: as protective at two pods (one stays), more so
        # above, and a single replica (laptop) still drains.
        assert covering[0]["spec"] == {**covering[0]["spec"], "maxUnavailable": 1}
        assert "minAvailable" not in covering[0]["spec"], name
        # The budget protects: a voluntary disruption always leaves a pod serving.
        if overlay == "gpu" or name in ALWAYS_REPLICATED:
            assert r.min_replicas(name) >= 2, name
            assert r.min_replicas(name) > covering[0]["spec"]["maxUnavailable"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicated_components_roll_one_pod_at_a_time(rendered, overlay):
    """A rollout never takes a replicated component to zero pods (no Recreate), and a new
    tiny pod stays alone a while before its peer goes, for the routers to catch it up."""
    r = rendered[overlay]
    for name in SCALED_OUT:
        spec = r.workload(name)["spec"]
        strategy = spec.get("strategy") or spec.get("updateStrategy") or {}
        assert strategy.get("type", "RollingUpdate") == "RollingUpdate", name
    specialist = r.get("Deployment", "specialist")["spec"]["strategy"]["rollingUpdate"]
    assert specialist["maxUnavailable"] == 0 and specialist["maxSurge"] >= 1
    tiny = r.get("StatefulSet", "tiny")["spec"]
    assert "partition" not in tiny["updateStrategy"].get("rollingUpdate", {})
    assert tiny["minReadySeconds"] >= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tiny_pod_keeps_its_own_journal(rendered, overlay):
    """tiny is a StatefulSet: a ReadWriteOnce journal volume per pod at its state dir, pods
    named through a headless Service, which is also the routers' tiny target."""
    r = rendered[overlay]
    tiny = r.get("StatefulSet", "tiny")
    assert "tiny" not in r.kind("Deployment")
    templates = {t["metadata"]["name"]: t for t in tiny["spec"]["volumeClaimTemplates"]}
    c = container(tiny, "tiny")
    env = _container_env(r, tiny, c)
    state = next(m for m in c["volumeMounts"] if m["mountPath"] == env["FIELDLENS_STATE_DIR"])
    assert state["name"] in templates and not state.get("readOnly")
    assert templates[state["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # A template's volume is per pod: no pod volume of that name (a shared claim) hides it.
    assert state["name"] not in {v["name"] for v in pod_spec(tiny)["volumes"]}
    assert not any(
        pvc["metadata"]["labels"].get("app.kubernetes.io/name") == "tiny"
        for pvc in r.kind("PersistentVolumeClaim").values()
    )
    service = r.get("Service", tiny["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(tiny))
    router = r.get("Deployment", "router")
    tiny_addr = _container_env(r, router, container(router, "router"))["TINY_ADDR"]
    assert tiny_addr.startswith("dns:///")
    host, port = _target(tiny_addr)
    assert host.split(".")[0] == service["metadata"]["name"]
    assert port in {p["port"] for p in service["spec"]["ports"]}
    # The pods' peers are every tiny pod: the routers' target.
    assert env["FIELDLENS_TINY_PEERS"] == tiny_addr


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
        w = r.workload(name)
        c = container(w, name)
        env = _container_env(r, w, c)
        grpc_port = container_ports(c)["grpc"]
        if "FIELDLENS_TLS_CERT" in env:
            # Kubelet's grpc probes cannot speak TLS: they ask the plaintext health-only port.
            grpc_port = container_ports(c)["health"]
            assert env["FIELDLENS_HEALTH_ADDR"] == f"0.0.0.0:{grpc_port}", name
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert c.get(probe, {}).get("grpc", {"port": grpc_port}) == {"port": grpc_port}
        # Readiness asks the overall "" status, which is honest about dependencies.
        assert c["readinessProbe"]["grpc"] == {"port": grpc_port}, name
        assert "livenessProbe" in c
        if name in SLOW_STARTS:
            # Start-up (a journal replay) gets its own generous probe; liveness and readiness
            # begin after it, so they need no initial delay.
            startup = c["startupProbe"]
            budget_s = startup["periodSeconds"] * startup["failureThreshold"]
            assert budget_s >= SLOW_STARTS[name], name
            for probe in ("livenessProbe", "readinessProbe"):
                assert "initialDelaySeconds" not in c[probe], (name, probe)
            if name == "router":
                # Not the health status: that waits for Triton, which a start must not.
                assert "tcpSocket" in startup
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


def test_production_serves_every_grpc_hop_over_tls(rendered):
    """gpu: cert-manager's Certificate covers every Service a caller dials; the router serves
    TLS, tiny and the specialist mTLS, and every caller trusts the CA."""
    r = rendered["gpu"]
    certificate = r.get("Certificate", "fieldlens-tls")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
    names = set(certificate["spec"]["dnsNames"])
    for name in FIELDLENS_SERVICES:
        w = r.workload(name)
        c = container(w, name)
        env = _container_env(r, w, c)
        assert {name, f"{name}.fieldlens.svc"} <= names
        assert (
            _secret_mounted_at(w, c, env["FIELDLENS_TLS_CERT"]) == certificate["spec"]["secretName"]
        )
        assert env["FIELDLENS_TLS_CA"].endswith("ca.crt")
        assert ("FIELDLENS_TLS_CLIENT_CA" in env) == (name != "router"), name
    # The laptop stays plaintext (no cert-manager there), so tokens must be allowed in clear.
    laptop = rendered["cpu"]
    router = laptop.workload("router")
    env = _container_env(laptop, router, container(router, "router"))
    assert "FIELDLENS_TLS_CERT" not in env
    assert env["FIELDLENS_ALLOW_PLAINTEXT_TOKENS"] == "1"
    router = r.workload("router")
    assert "FIELDLENS_ALLOW_PLAINTEXT_TOKENS" not in _container_env(
        r, router, container(router, "router")
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


def _secret_mounted_at(w: dict[str, Any], c: dict[str, Any], path: str) -> str:
    """The name of the Secret whose files are mounted where `path` lies."""
    volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
    for mount in c["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return str(volumes[mount["name"]]["secret"]["secretName"])
    raise AssertionError(f"{path} is not mounted")


def _target(addr: str) -> tuple[str, int]:
    host, _, port = addr.removeprefix("dns:///").removeprefix("grpc://").rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_environment_is_accepted_by_the_real_settings(rendered, overlay, tmp_path):
    """Each container's env, as Kubernetes would assemble it, goes through the services' own
    settings parsers; addresses point at rendered Services and ports."""
    from fieldlens.common.model_set import load_model_set
    from fieldlens.common.settings import TLS_ENV, ClassifierSettings, RouterSettings
    from fieldlens.common.tls import local_pki

    r = rendered[overlay]
    pki = local_pki(tmp_path / "pki")
    issued = {"tls.crt": pki.server_cert, "tls.key": pki.server_key, "ca.crt": pki.ca}
    for name in FIELDLENS_SERVICES:
        w = r.workload(name)
        c = container(w, name)
        env = _container_env(r, w, c)
        for variable in TLS_ENV.values():
            if variable in env:  # cert-manager's Secret, mounted: stand-ins with its file names
                path = env[variable]
                assert _secret_mounted_at(w, c, path) == "fieldlens-tls", (name, variable)
                env[variable] = str(issued[Path(path).name])
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
        w = r.workload(name)
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


@pytest.mark.parametrize(("overlay", "kind"), [("cpu", "KIND_CPU"), ("gpu", "KIND_GPU")])
def test_model_set_init_container_delivers_the_repository(
    rendered, overlay, kind, models_image, tmp_path
):
    """Runs the rendered init container's script with its rendered environment."""
    r = rendered[overlay]
    script = r.config_map_data(_config_map_name(r, "fieldlens-model-sync"))["sync-models.sh"]
    for name in (*FIELDLENS_SERVICES, "triton"):
        w = r.workload(name)
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


@pytest.mark.parametrize(("overlay", "kind"), [("cpu", "KIND_CPU"), ("gpu", "KIND_GPU")])
def test_switched_in_sets_load_with_the_overlays_instance_kind(rendered, overlay, kind):
    """Every container that loads nets into Triton (it has a Triton address) loads a
    switched-in set with the overlay's instance kind, the kind Triton's init container gives
    the boot set: a switch on the GPU pool does not put the new nets on the CPU."""
    r = rendered[overlay]
    loaders = set()
    for w in r.workloads():
        for c in all_containers(w):
            env = _container_env(r, w, c)
            if TRITON_ADDR_ENVS & env.keys():
                loaders.add(w["metadata"]["name"])
                assert env.get(INSTANCE_KIND_ENV) == kind, (w["metadata"]["name"], c["name"])
    assert loaders == {"router", "specialist"}
    triton = r.workload("triton")
    init = next(c for c in pod_spec(triton)["initContainers"] if c["name"] == "model-set")
    assert _container_env(r, triton, init)["TRITON_INSTANCE_KIND"] == kind


def _claims(r: Rendered) -> dict[str, list[str]]:
    """Access modes of every claim an overlay makes: PVCs and StatefulSet claim templates."""
    claims = {
        name: pvc["spec"]["accessModes"] for name, pvc in r.kind("PersistentVolumeClaim").items()
    }
    for w in r.workloads():
        for template in w["spec"].get("volumeClaimTemplates", []):
            key = f"{w['metadata']['name']}/{template['metadata']['name']}"
            claims[key] = template["spec"]["accessModes"]
    return claims


def test_laptop_overlay_needs_no_read_write_many(rendered, publish_job):
    """kind's default provisioner (local-path) gives ReadWriteOnce volumes only: the cpu
    overlay claims nothing else, and every claim its pods (and the publish Job) mount is one
    it makes."""
    r = rendered["cpu"]
    claims = _claims(r)
    assert claims
    for name, modes in claims.items():
        assert modes == ["ReadWriteOnce"], (name, modes)
    for w in [*r.workloads(), publish_job.get("Job", PUBLISH_JOB)]:
        for volume in pod_spec(w)["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in r.kind("PersistentVolumeClaim"), (w["metadata"]["name"], claim)


def test_production_mounts_shared_claims_read_write_many(rendered):
    """In the gpu overlay every claim a Deployment's or StatefulSet's pods mount (as opposed to
    a per-pod claim template) is ReadWriteMany: its pods, a rollout's surge pod included, may
    sit on different nodes."""
    r = rendered["gpu"]
    shared = {
        volume["persistentVolumeClaim"]["claimName"]
        for w in r.workloads()
        for volume in pod_spec(w)["volumes"]
        if "persistentVolumeClaim" in volume
    }
    assert shared
    claims = _claims(r)
    for claim in shared:
        assert claims[claim] == ["ReadWriteMany"], claim


def _readme_shell_lines() -> list[str]:
    """The commands of deploy/k8s/README.md's shell code blocks, continuations joined."""
    text = (K8S_DIR / "README.md").read_text()
    blocks = re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.S | re.M)
    assert blocks
    return [ln for block in blocks for ln in block.replace("\\\n", " ").splitlines()]


def _image_refs(line: str) -> set[tuple[str, str]]:
    return {(m.group(1), m.group(2)) for m in _LOCAL_IMAGE.finditer(line)}


def _overlay_images(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(name, tag) of the fieldlens images the objects run, registry left out."""
    refs = set()
    for doc in docs:
        if doc["kind"] not in (*WORKLOAD_KINDS, "Job"):
            continue
        for c in all_containers(doc):
            name, tag = _image_name(c["image"]), c["image"].rsplit(":", 1)[1]
            if name in DOCKERFILES:
                refs.add((name, tag))
    return refs


def test_readme_image_steps_match_the_pins(rendered, publish_job):
    """The README builds every image tag the overlays and the publish Job run, and the kind
    steps load exactly the ones the laptop overlay and the Job run."""
    lines = _readme_shell_lines()
    built = {ref for ln in lines if "docker build" in ln for ref in _image_refs(ln)}
    loaded = {ref for ln in lines if "kind load docker-image" in ln for ref in _image_refs(ln)}
    laptop = _overlay_images(rendered["cpu"].docs) | _overlay_images(publish_job.docs)
    assert loaded == laptop
    assert _overlay_images(rendered["gpu"].docs) <= built
    assert loaded <= built
    # Every Dockerfile the README builds exists.
    for ln in lines:
        m = re.search(r"docker build -f (\S+)", ln)
        if m:
            assert (K8S_DIR.parents[1] / m.group(1)).is_file(), ln


# -- the model-set publishing Job --------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_publish_job_validates_against_the_kubernetes_schemas(publish_job, version):
    import kubernetes_validate

    assert [doc["kind"] for doc in publish_job.docs] == ["Job"]
    for doc in publish_job.docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _mount_at(w: dict[str, Any], c: dict[str, Any], path: str) -> tuple[dict[str, Any], Any]:
    """(mount, volume) of the container's mount at `path`."""
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
    volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
    return mount, volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_publish_job_runs_the_cli_on_the_routers_store(rendered, publish_job, overlay):
    """The Job runs `fieldlens model-set publish` in the service image, on the volume and
    at the path (FIELDLENS_MODEL_STORE) the routers use, as the routers' user."""
    r = rendered[overlay]
    job = publish_job.get("Job", PUBLISH_JOB)
    _assert_locked_down(job)
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    router = r.get("Deployment", "router")
    router_c = container(router, "router")
    (c,) = pod_spec(job)["containers"]
    # The service image (Python and the CLI), not the models image (busybox).
    assert _image_name(c["image"]) == _image_name(router_c["image"]) == "fieldlens"
    if overlay == "cpu":  # the gpu overlay renames the images for its registry
        assert c["image"] == router_c["image"]
    assert c["command"][:3] == ["fieldlens", "model-set", "publish"]
    # The image has that command: the package's console script, in the venv on its PATH.
    import tomllib

    pyproject = tomllib.loads((K8S_DIR.parents[1] / "pyproject.toml").read_text())
    assert c["command"][0] in pyproject["project"]["scripts"]
    _, lines = _stages(K8S_DIR.parents[1] / "docker" / DOCKERFILES["fieldlens"])
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")) :]
    assert any(re.match(r"ENV PATH=/opt/fieldlens/bin:", ln) for ln in final)
    env = _container_env(publish_job, job, c)
    store = env["FIELDLENS_MODEL_STORE"]
    assert store == _container_env(r, router, router_c)["FIELDLENS_MODEL_STORE"]
    mount, volume = _mount_at(job, c, store)
    router_mount, router_volume = _mount_at(router, router_c, store)
    assert not mount.get("readOnly") and not router_mount.get("readOnly")
    claim, router_claim = volume["persistentVolumeClaim"], router_volume["persistentVolumeClaim"]
    assert claim["claimName"] == router_claim["claimName"]
    assert claim.get("readOnly") is not True
    # Files it writes are the routers' to replace.
    job_sc, router_sc = pod_spec(job)["securityContext"], pod_spec(router)["securityContext"]
    for key in ("runAsUser", "fsGroup"):
        assert job_sc[key] == router_sc[key], key
    # The set comes from a models image.
    (init,) = pod_spec(job)["initContainers"]
    assert _image_name(init["image"]) == "fieldlens-models"


def test_publish_job_publishes_the_set_into_the_store(publish_job, models_image, tmp_path):
    """Runs the rendered Job: its init container's command, then `fieldlens model-set
    publish` with its environment, each volume a local folder and the models image's /models
    the image's layout; the store then holds the set under its version."""
    import json

    job = publish_job.get("Job", PUBLISH_JOB)
    spec = pod_spec(job)
    volumes = {v["name"]: tmp_path / v["name"] for v in spec["volumes"]}
    for path in volumes.values():
        path.mkdir()

    def local(c: dict[str, Any], image_files: dict[str, Path]) -> Callable[[str], str]:
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        mapping = {**image_files, **mounts}

        def remap(value: str) -> str:
            for prefix in sorted(mapping, key=len, reverse=True):
                if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                    return str(mapping[prefix]) + value[len(prefix) :]
            return value

        return remap

    (init,) = spec["initContainers"]
    remap = local(init, {"/models": models_image})
    done = subprocess.run(
        [remap(a) for a in [*init["command"], *init.get("args", [])]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (c,) = spec["containers"]
    remap = local(c, {})
    argv = [remap(a) for a in [*c["command"], *c.get("args", [])]]
    # The image's console script; here the virtual environment's.
    argv[0] = str(Path(sys.executable).with_name(argv[0]))
    env = {k: remap(v) for k, v in _container_env(publish_job, job, c).items()}
    done = subprocess.run(
        argv,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    version = json.loads((MODELS_DIR / "manifest.json").read_text())["model_set_version"]
    assert version in done.stdout
    published = Path(env["FIELDLENS_MODEL_STORE"]) / version
    assert (published / "models" / "manifest.json").is_file()
    assert sorted(p.parent.name for p in published.glob("triton/*/config.pbtxt")) == sorted(
        p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")
    )


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
    # A tiny pod that starts copies a peer's knowledge (FIELDLENS_TINY_PEERS).
    assert can("tiny", "tiny", grpc["tiny"])
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_named_tokens_come_from_an_optional_secret_mounted_so_it_can_change(rendered, overlay):
    """The router's tokens file is the Secret `fieldlens-tokens`, mounted as a directory: a
    subPath mount never sees an updated Secret, so a revoked token would work until a restart.
    Optional: without it FIELDLENS_WRITE_TOKEN alone still works."""
    w = rendered[overlay].workload("router")
    c = container(w, "router")
    path = next(e["value"] for e in c["env"] if e["name"] == "FIELDLENS_TOKENS_FILE")
    mount, volume = _mount_at(w, c, str(Path(path).parent))
    assert "subPath" not in mount and mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "fieldlens-tokens"
    assert volume["secret"]["optional"] is True
