"""The container image and Kubernetes manifests: rendered offline, schema-checked, and held to
what the sidecar needs (its config validates, probes hit real endpoints, the admin API stays
private, pods are hardened, shutdown fits the grace period)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kustomize import (
    KustomizeError,
    Resource,
    build,
    config_map_hash,
    json_patch,
    pod_spec,
    split_image,
    strategic_merge,
)

from sidecar.admin_auth import exposure_warning
from sidecar.config import Settings, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.31"  # validated against this release's schemas (kubernetes-validate)
PUBLIC_PORT, ADMIN_PORT = 4984, 4985
SIDECAR_UID = 10001
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
SYNC_POD = {"app.kubernetes.io/name": "sync", "app.kubernetes.io/component": "sync-service"}
# Per rendered variant: the namespace the objects land in and where Prometheus runs.
VARIANTS = {
    "base": {"namespace": "default", "monitoring": "monitoring"},
    "example": {"namespace": "sync-example", "monitoring": "observability"},
    "autoscaling": {"namespace": "default", "monitoring": "monitoring"},
}


# ------------------------------------------------------------------ rendering


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Resource]]:
    autoscaled = tmp_path_factory.mktemp("autoscaling")
    (autoscaled / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(KUBE / "base")],
                "components": [str(KUBE / "components" / "autoscaling")],
            }
        )
    )
    return {
        "base": build(KUBE / "base"),
        "example": build(KUBE / "overlays" / "example"),
        "autoscaling": build(autoscaled),
    }


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rendered(renders: dict[str, list[Resource]], variant: str) -> list[Resource]:
    return renders[variant]


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    """The object `name`, or the generated one whose name is `name` plus a hash suffix."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
    found = [r for r in resources if r["kind"] == kind and pattern.fullmatch(r["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def sync_spec(resources: list[Resource]) -> dict[str, Any]:
    spec = pod_spec(find(resources, "Deployment", "sync"))
    assert spec is not None
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found  # type: ignore[no-any-return]


def _secret_text(secret: Resource, key: str) -> str:
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def _file_text(obj: Resource, key: str) -> str:
    """The content of key `key` of a ConfigMap or Secret, as mounted."""
    return _secret_text(obj, key) if obj["kind"] == "Secret" else str(obj["data"][key])


def mounted_files(resources: list[Resource], spec: dict[str, Any], name: str) -> dict[str, str]:
    """Absolute path -> content of every ConfigMap/Secret file mounted in container `name`."""
    by_name = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    def source_files(source: dict[str, Any]) -> Iterator[tuple[str, str]]:
        for field, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
            if field in source:
                obj = by_name[(kind, source[field]["name"])]
                keys = [*obj.get("data", {}), *obj.get("stringData", {})]
                for item in source[field].get("items") or [{"key": k, "path": k} for k in keys]:
                    yield item["path"], _file_text(obj, item["key"])

    files: dict[str, str] = {}
    for mount in container(spec, name).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "projected" in volume:
            sources = volume["projected"]["sources"]
        elif "secret" in volume:
            secret = volume["secret"]
            sources = [{"secret": {"name": secret["secretName"], "items": secret.get("items")}}]
        else:
            sources = [volume]
        for source in sources:
            for path, content in source_files(source):
                files[f"{mount['mountPath'].rstrip('/')}/{path}"] = content
    return files


def sidecar_config_path(spec: dict[str, Any]) -> str:
    args = container(spec, "sidecar").get("args") or dockerfile_cmd()
    return str(args[args.index("--config") + 1])


def materialize(files: dict[str, str], root: Path) -> dict[str, Path]:
    """Write the mounted files under `root`, mirroring their absolute paths."""
    written = {}
    for path, content in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        written[path] = target
    return written


def sidecar_settings(resources: list[Resource], tmp_path: Path) -> Settings:
    """What `sidecar check-config` says about the mounted sidecar.yaml, with the mounted
    secret files placed under tmp_path (there is no /etc/sidecar here)."""
    spec = sync_spec(resources)
    files = mounted_files(resources, spec, "sidecar")
    config_path = sidecar_config_path(spec)
    assert config_path in files, f"{config_path} is not mounted in the sidecar container"
    text = files[config_path]
    # Every mounted file's absolute path, re-rooted under tmp_path, in one pass.
    prefixes = sorted({path.rpartition("/")[0] + "/" for path in files}, key=len, reverse=True)
    pattern = re.compile("(?<![\\w./-])(" + "|".join(map(re.escape, prefixes)) + ")")
    text = pattern.sub(lambda m: f"{tmp_path}{m.group(1)}", text)
    materialize(files, tmp_path)
    path = tmp_path / "check" / "sidecar.yaml"
    path.parent.mkdir()
    path.write_text(text)
    return load_settings(path)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


# ------------------------------------------------------------------ what gets rendered


def test_renders_the_expected_objects(rendered: list[Resource], variant: str) -> None:
    kinds = sorted(
        f"{r['kind']}/{r['metadata']['name'].rsplit('-', 1)[0] if r['kind'] == 'ConfigMap' else r['metadata']['name']}"
        for r in rendered
    )
    expected = [
        "ConfigMap/sidecar-config",
        "ConfigMap/sync-gateway-config",
        "Deployment/redis",
        "Deployment/sync",
        "NetworkPolicy/redis",
        "NetworkPolicy/sync",
        "PodDisruptionBudget/sync",
        "Secret/sidecar-secrets",
        "Secret/sync-gateway-couchbase",
        "Service/redis",
        "Service/sync",
        "ServiceAccount/sync",
    ]
    if variant == "example":
        expected.append("Namespace/sync-example")
    if variant == "autoscaling":
        expected.append("HorizontalPodAutoscaler/sync")
    assert kinds == sorted(expected)
    for resource in rendered:
        assert not resource["metadata"].get("annotations", {}).keys() & {
            "test.kustomize/needs-hash"
        }


def test_every_object_is_valid_for_kubernetes(rendered: list[Resource]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    problems = []
    for resource in rendered:
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(
                f"{resource['kind']}/{resource['metadata']['name']}: {where}: {exc.message}"
            )
    assert not problems, "\n".join(problems)


def test_labels_follow_the_recommended_keys(rendered: list[Resource]) -> None:
    for resource in rendered:
        if resource["kind"] == "Namespace":
            continue
        labels = resource["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "sync"
        assert labels["app.kubernetes.io/managed-by"] == "kustomize"
        if resource["kind"] not in ("ConfigMap",):
            assert {"app.kubernetes.io/name", "app.kubernetes.io/component"} <= labels.keys()


def test_overlay_sets_namespace_images_replicas_and_config(
    renders: dict[str, list[Resource]],
) -> None:
    example = renders["example"]
    for resource in example:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "sync-example"
        assert resource["metadata"]["labels"]["app.kubernetes.io/instance"] == "example"
    deployment = find(example, "Deployment", "sync")
    assert deployment["spec"]["replicas"] == 2
    assert (
        deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"]
        == "example"
    )
    spec = sync_spec(example)
    assert container(spec, "sidecar")["image"] == "ghcr.io/example/oidc-sidecar:0.1.0"
    assert container(spec, "sync-gateway")["image"] == "couchbase/sync-gateway:3.2.1-community"
    assert container(spec, "sync-gateway")["resources"]["limits"]["memory"] == "2Gi"
    # The replaced configuration changes the ConfigMap's name, so the pods roll.
    base_name = find(renders["base"], "ConfigMap", "sidecar-config")["metadata"]["name"]
    example_name = find(example, "ConfigMap", "sidecar-config")["metadata"]["name"]
    assert base_name != example_name
    assert (
        "keycloak.example.com/realms/sync"
        in find(example, "ConfigMap", "sidecar-config")["data"]["sidecar.yaml"]
    )


def test_the_example_namespace_enforces_the_restricted_pod_security_standard(
    renders: dict[str, list[Resource]],
) -> None:
    namespace = find(renders["example"], "Namespace", "sync-example")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_replica_count_is_left_to_the_hpa_when_autoscaling(
    renders: dict[str, list[Resource]],
) -> None:
    resources = renders["autoscaling"]
    hpa = find(resources, "HorizontalPodAutoscaler", "sync")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sync",
    }
    assert "replicas" not in find(resources, "Deployment", "sync")["spec"]
    assert hpa["spec"]["minReplicas"] >= 2


# ------------------------------------------------------------------ the sidecar's configuration


def test_mounted_config_passes_check_config(rendered: list[Resource], tmp_path: Path) -> None:
    settings = sidecar_settings(rendered, tmp_path)
    secret = find(rendered, "Secret", "sidecar-secrets")
    providers = [
        p for db in settings.databases.values() if db.oidc for p in db.oidc.providers.values()
    ]
    assert providers and all(p.validation_key is not None for p in providers)
    # The client secret really comes from the mounted Secret.
    assert {p.validation_key.get() for p in providers if p.validation_key} == {
        _secret_text(secret, "client-secret")
    }


@pytest.mark.parametrize(
    "config",
    [
        KUBE / "base" / "config" / "sidecar.yaml",
        KUBE / "overlays" / "example" / "config" / "sidecar.yaml",
    ],
)
def test_config_files_on_disk_are_complete_settings(config: Path, tmp_path: Path) -> None:
    """The files as edited (not only as mounted) parse, secret path aside."""
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret")
    token = tmp_path / "admin-token"
    token.write_text("t0ken")
    text = config.read_text().replace("/etc/sidecar/secrets/client-secret", str(secret))
    text = text.replace("/etc/sidecar/secrets/admin-token", str(token))
    settings = parse_settings(yaml.safe_load(text))
    assert settings.session_store is not None  # several replicas need a shared store
    assert settings.shutdown_grace_seconds == 25
    assert settings.admin_auth is not None and settings.admin_auth.bearer_token is not None
    assert settings.admin_auth.bearer_token.get() == "t0ken"


def test_the_admin_api_needs_the_mounted_token_but_metrics_stay_open(
    rendered: list[Resource], tmp_path: Path
) -> None:
    """The admin interface listens on the pod address (for Prometheus): `admin_auth` with the
    Secret's `admin-token` guards it beside the NetworkPolicy, so `run` warns of nothing."""
    settings = sidecar_settings(rendered, tmp_path)
    secret = find(rendered, "Secret", "sidecar-secrets")
    auth = settings.admin_auth
    assert auth is not None and auth.bearer_token is not None
    assert auth.bearer_token.get() == _secret_text(secret, "admin-token")
    assert "/_metrics" in auth.open_paths  # the scrape needs no credentials
    assert exposure_warning(settings) is None


def test_listeners_match_the_container_ports(rendered: list[Resource], tmp_path: Path) -> None:
    settings = sidecar_settings(rendered, tmp_path)
    ports = {
        p["name"]: p["containerPort"] for p in container(sync_spec(rendered), "sidecar")["ports"]
    }
    assert ports == {
        "http": port_of(settings.interface),
        "admin": port_of(settings.admin_interface),
    }
    assert (ports["http"], ports["admin"]) == (PUBLIC_PORT, ADMIN_PORT)
    # The kubelet and Prometheus connect to the pod address, not to its loopback.
    assert settings.interface.startswith(":") and settings.admin_interface.startswith(":")


def test_sidecar_upstream_is_sync_gateway_on_loopback(
    rendered: list[Resource], tmp_path: Path
) -> None:
    settings = sidecar_settings(rendered, tmp_path)
    spec = sync_spec(rendered)
    files = mounted_files(rendered, spec, "sync-gateway")
    sg = json.loads(files[container(spec, "sync-gateway")["args"][0]])
    listeners = [sg["interface"], sg["adminInterface"], sg["metricsInterface"]]
    assert all(listen.startswith("127.0.0.1:") for listen in listeners)
    # One network namespace: no two listeners of the pod may share a port.
    all_ports = [port_of(listen) for listen in listeners] + [PUBLIC_PORT, ADMIN_PORT]
    assert len(set(all_ports)) == len(all_ports)
    assert settings.upstream == f"http://{sg['interface']}"
    assert "ports" not in container(spec, "sync-gateway")
    # The sidecar forwards no credential of the client's; the session bridge gives Sync
    # Gateway a session of the user's through its loopback admin API, and GUEST is off.
    assert settings.pass_authorization is False
    assert set(sg["databases"]) == set(settings.databases)
    for name, db in sg["databases"].items():
        assert db["users"]["GUEST"]["disabled"] is True
        bridge = settings.databases[name].sync_gateway
        assert bridge is not None and bridge.admin_url == f"http://{sg['adminInterface']}"
        assert db["password"] == "${CB_PASSWORD}"  # expanded by Sync Gateway from the Secret


def test_session_store_is_the_redis_service(rendered: list[Resource], tmp_path: Path) -> None:
    settings = sidecar_settings(rendered, tmp_path)
    service = find(rendered, "Service", "redis")
    assert (
        settings.session_store is not None
        and settings.session_store.get() == f"redis://redis:{service['spec']['ports'][0]['port']}/0"
    )


# ------------------------------------------------------------------ Service and probes


def _resolve_port(port: int | str, ports: list[dict[str, Any]]) -> int:
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports], f"port {port} is not declared"
        return port
    (number,) = [p["containerPort"] for p in ports if p.get("name") == port]
    return int(number)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if set(selector) - {"matchLabels"}:
        raise NotImplementedError(f"selector {selector}")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_service_exposes_the_public_port_only(rendered: list[Resource]) -> None:
    service = find(rendered, "Service", "sync")
    deployment = find(rendered, "Deployment", "sync")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    assert service["spec"]["type"] == "ClusterIP"
    ports = container(sync_spec(rendered), "sidecar")["ports"]
    targets = [_resolve_port(p["targetPort"], ports) for p in service["spec"]["ports"]]
    assert targets == [PUBLIC_PORT]
    assert ADMIN_PORT not in [p["port"] for p in service["spec"]["ports"]]


def test_selectors_select_the_sync_pods(rendered: list[Resource]) -> None:
    pod_labels = find(rendered, "Deployment", "sync")["spec"]["template"]["metadata"]["labels"]
    deployment = find(rendered, "Deployment", "sync")
    assert matches(deployment["spec"]["selector"], pod_labels)
    assert matches(find(rendered, "PodDisruptionBudget", "sync")["spec"]["selector"], pod_labels)
    assert matches(find(rendered, "NetworkPolicy", "sync")["spec"]["podSelector"], pod_labels)
    redis_labels = find(rendered, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    assert matches(find(rendered, "NetworkPolicy", "redis")["spec"]["podSelector"], redis_labels)
    assert matches(
        {"matchLabels": find(rendered, "Service", "redis")["spec"]["selector"]}, redis_labels
    )
    assert (
        find(rendered, "ServiceAccount", "sync")["metadata"]["name"]
        == sync_spec(rendered)["serviceAccountName"]
    )


def test_pdb_lets_a_drain_proceed_one_pod_at_a_time(rendered: list[Resource]) -> None:
    pdb = find(rendered, "PodDisruptionBudget", "sync")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1


def test_probes_hit_the_sidecar_health_endpoints(rendered: list[Resource]) -> None:
    sidecar = container(sync_spec(rendered), "sidecar")
    expected = {
        "startupProbe": "/_health",
        "livenessProbe": "/_health",
        "readinessProbe": "/_ready",
    }
    for probe, path in expected.items():
        action = sidecar[probe]["httpGet"]
        assert action["path"] == path
        assert _resolve_port(action["port"], sidecar["ports"]) == PUBLIC_PORT
    # The endpoints exist on the public listener (sidecar/app.py: create_app).
    from sidecar.app import create_app
    from sidecar.config import parse_settings

    app = create_app(parse_settings({"upstream": "http://127.0.0.1:1", "databases": {"db": {}}}))
    public_paths = {resource.canonical for resource in app.router.resources()}
    for path in expected.values():
        assert path in public_paths


def test_sync_gateway_probes_run_inside_its_container(rendered: list[Resource]) -> None:
    sync_gateway = container(sync_spec(rendered), "sync-gateway")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = sync_gateway[probe]["exec"]["command"]
        assert command[0] == "curl" and command[-1].startswith("http://127.0.0.1:4986/")


def test_every_container_has_requests_and_limits(rendered: list[Resource]) -> None:
    for resource in rendered:
        spec = pod_spec(resource)
        for c in spec["containers"] if spec else []:
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), c["name"]
            assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), c["name"]


# ------------------------------------------------------------------ hardening


def test_pods_are_hardened(rendered: list[Resource]) -> None:
    """The "restricted" Pod Security Standard, plus a read-only root and no API token."""
    for resource in rendered:
        spec = pod_spec(resource)
        if spec is None:
            continue
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in spec.get("volumes", []))
        for c in spec.get("initContainers", []) + spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            assert ctx["allowPrivilegeEscalation"] is False, c["name"]
            assert ctx.get("privileged", False) is False, c["name"]
            assert ctx["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert ctx.get("seccompProfile", pod["seccompProfile"])["type"] == "RuntimeDefault"
            uid = ctx.get("runAsUser", pod.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{c['name']}: needs a numeric non-root uid"


def test_sidecar_runs_as_the_image_user(rendered: list[Resource]) -> None:
    spec = sync_spec(rendered)
    ctx = container(spec, "sidecar")["securityContext"]
    assert ctx["runAsUser"] == dockerfile_user()[0] == SIDECAR_UID
    # The projected secret files are 0440 root:fsGroup: the sidecar reads them via its group.
    assert spec["securityContext"]["fsGroup"] == ctx["runAsGroup"] == dockerfile_user()[1]
    projected = [v["projected"] for v in spec["volumes"] if "projected" in v]
    assert all(p["defaultMode"] == 0o440 for p in projected)


@pytest.mark.parametrize("key", ["client-secret", "admin-token"])
def test_the_secrets_are_mounted_only_into_the_sidecar(rendered: list[Resource], key: str) -> None:
    spec = sync_spec(rendered)
    assert any(key in path for path in mounted_files(rendered, spec, "sidecar"))
    assert not any(key in path for path in mounted_files(rendered, spec, "sync-gateway"))


# ------------------------------------------------------------------ shutdown


def test_shutdown_fits_the_grace_period(rendered: list[Resource], tmp_path: Path) -> None:
    settings = sidecar_settings(rendered, tmp_path)
    spec = sync_spec(rendered)
    grace = spec["terminationGracePeriodSeconds"]
    sidecar_stop = container(spec, "sidecar")["lifecycle"]["preStop"]["sleep"]["seconds"]
    sync_gateway_stop = container(spec, "sync-gateway")["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The sidecar finishes draining before Sync Gateway is told to stop, which is before SIGKILL.
    assert sidecar_stop + settings.shutdown_grace_seconds <= sync_gateway_stop < grace
    assert sidecar_stop + settings.shutdown_grace_seconds < grace


# ------------------------------------------------------------------ network policies


def admits(
    resources: list[Resource],
    policy_name: str,
    *,
    namespace: str,
    target_labels: dict[str, str],
    source_namespace: str,
    source_labels: dict[str, str],
    port: int,
) -> bool:
    """Would NetworkPolicy `policy_name` let this pod connect to `port` of the target pod?
    (Only what our policies use: matchLabels selectors, numeric ports, no ipBlock.)"""
    policy = find(resources, "NetworkPolicy", policy_name)["spec"]
    assert matches(policy["podSelector"], target_labels), "the policy does not select the target"
    assert "Ingress" in policy["policyTypes"]
    namespace_labels = {"kubernetes.io/metadata.name": source_namespace}

    def peer_matches(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            raise NotImplementedError("ipBlock")
        if "namespaceSelector" in peer:
            if not matches(peer["namespaceSelector"], namespace_labels):
                return False
        elif source_namespace != namespace:
            return False  # a podSelector alone means the policy's own namespace
        return "podSelector" not in peer or matches(peer["podSelector"], source_labels)

    for rule in policy.get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        if not rule.get("from") or any(peer_matches(peer) for peer in rule["from"]):
            return True
    return False


SYNC_INGRESS = [
    # (source namespace, source labels, port, admitted)
    ("{app}", {}, PUBLIC_PORT, True),
    ("elsewhere", {"app": "anything"}, PUBLIC_PORT, True),
    ("{monitoring}", PROMETHEUS, ADMIN_PORT, True),
    ("{monitoring}", {"app.kubernetes.io/name": "grafana"}, ADMIN_PORT, False),
    ("{monitoring}", {}, ADMIN_PORT, False),
    ("elsewhere", PROMETHEUS, ADMIN_PORT, False),
    ("{app}", PROMETHEUS, ADMIN_PORT, False),
    ("{app}", SYNC_POD, ADMIN_PORT, False),
    ("{app}", {}, ADMIN_PORT, False),
    ("{monitoring}", PROMETHEUS, 4986, False),  # Sync Gateway's ports (loopback anyway)
    ("{monitoring}", PROMETHEUS, 4988, False),
    ("{app}", {}, 4986, False),
]


@pytest.mark.parametrize(("source_ns", "source_labels", "port", "admitted"), SYNC_INGRESS)
def test_sync_network_policy(
    rendered: list[Resource],
    variant: str,
    source_ns: str,
    source_labels: dict[str, str],
    port: int,
    admitted: bool,
) -> None:
    names = {"app": VARIANTS[variant]["namespace"], "monitoring": VARIANTS[variant]["monitoring"]}
    result = admits(
        rendered,
        "sync",
        namespace=names["app"],
        target_labels=SYNC_POD,
        source_namespace=source_ns.format(**names),
        source_labels=source_labels,
        port=port,
    )
    assert result is admitted


def test_no_rule_opens_the_admin_port_widely(rendered: list[Resource]) -> None:
    """Whatever the table says: every rule that reaches 4985 names both a namespace and pods."""
    for rule in find(rendered, "NetworkPolicy", "sync")["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and ADMIN_PORT not in ports and "admin" not in ports:
            continue
        assert rule.get("from"), "a rule admits everyone to the admin port"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert peer["namespaceSelector"].get("matchLabels")
            assert peer["podSelector"].get("matchLabels")


REDIS_INGRESS = [
    ("{app}", SYNC_POD, 6379, True),
    ("{app}", {}, 6379, False),
    ("{app}", {"app.kubernetes.io/name": "sync"}, 6379, False),  # not a sync-service pod
    ("elsewhere", SYNC_POD, 6379, False),
    ("{monitoring}", PROMETHEUS, 6379, False),
]


@pytest.mark.parametrize(("source_ns", "source_labels", "port", "admitted"), REDIS_INGRESS)
def test_redis_network_policy(
    rendered: list[Resource],
    variant: str,
    source_ns: str,
    source_labels: dict[str, str],
    port: int,
    admitted: bool,
) -> None:
    names = {"app": VARIANTS[variant]["namespace"], "monitoring": VARIANTS[variant]["monitoring"]}
    redis_labels = find(rendered, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    result = admits(
        rendered,
        "redis",
        namespace=names["app"],
        target_labels=redis_labels,
        source_namespace=source_ns.format(**names),
        source_labels=source_labels,
        port=port,
    )
    assert result is admitted


def test_redis_opens_no_connections(rendered: list[Resource]) -> None:
    policy = find(rendered, "NetworkPolicy", "redis")["spec"]
    assert "Egress" in policy["policyTypes"] and policy["egress"] == []


# ------------------------------------------------------------------ the Dockerfile


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(FROM line, [(INSTRUCTION, arguments)])], continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append((args, []))
        elif stages:
            stages[-1][1].append((instruction.upper(), args.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1][1]


def dockerfile_user() -> tuple[int, int]:
    (user,) = [args for op, args in final_stage() if op == "USER"]
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def dockerfile_cmd() -> list[str]:
    (cmd,) = [args for op, args in final_stage() if op == "CMD"]
    return list(json.loads(cmd))


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert arg is not None and arg.group(1) == "python:3.11-slim"
    assert [s[0] for s in stages] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    build_runs = " ".join(args for op, args in stages[0][1] if op == "RUN")
    assert "pip wheel" in build_runs


def test_final_stage_has_no_build_tools_and_no_sources() -> None:
    runs = " ".join(args for op, args in final_stage() if op == "RUN")
    for tool in ("apt-get", "apt ", "gcc", "build-essential", "make ", "git "):
        assert tool not in runs
    assert "--no-index" in runs and "from=build" in runs  # wheels from the build stage only
    assert not [args for op, args in final_stage() if op in ("COPY", "ADD")]


def test_final_stage_runs_unprivileged_and_read_only_friendly() -> None:
    instructions = final_stage()
    uid, gid = dockerfile_user()
    assert uid == SIDECAR_UID and gid == SIDECAR_UID
    ops = [op for op, _ in instructions]
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PIP_NO_CACHE_DIR=1" in env


def test_entrypoint_cmd_and_ports() -> None:
    instructions = dict(final_stage())
    assert json.loads(instructions["ENTRYPOINT"]) == ["sidecar"]
    assert dockerfile_cmd() == ["run", "--config", "/etc/sidecar/sidecar.yaml"]
    assert set(instructions["EXPOSE"].split()) == {str(PUBLIC_PORT), str(ADMIN_PORT)}


def test_image_default_config_path_is_where_kubernetes_mounts_it(
    renders: dict[str, list[Resource]],
) -> None:
    spec = sync_spec(renders["base"])
    files = mounted_files(renders["base"], spec, "sidecar")
    assert dockerfile_cmd()[-1] in files


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        regex = (
            re.escape(body)
            .replace(r"\*\*/", "(.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
        )
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/lib/python3.11/site-packages/x.py", True),
        (".git/HEAD", True),
        ("node_modules/x/index.js", True),
        ("tests/peers/op/node_modules/oidc-provider/index.js", True),
        ("tests/peers/op/server.js", True),
        ("tests/test_deploy.py", True),
        ("sidecar.yaml", True),
        ("sidecar/__pycache__/app.cpython-311.pyc", True),
        ("pyproject.toml", False),
        ("README.md", False),
        ("sidecar/app.py", False),
        ("sidecar/oidc/tokens.py", False),
    ],
)
def test_dockerignore(path: str, ignored: bool) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert _dockerignored(path, patterns) is ignored


def test_dockerfile_copies_only_what_the_context_keeps() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copies = [args for op, args in dockerfile_stages()[0][1] if op == "COPY"]
    sources = [src for args in copies for src in args.split()[:-1]]
    assert sources
    for source in sources:
        assert not _dockerignored(source.rstrip("/"), patterns), source


# ------------------------------------------------------------------ the renderer itself


@pytest.mark.parametrize(
    ("data", "expected"),
    [  # kustomize's and kubectl's own test vectors (hasher_test.go)
        ({}, "42745tchd9"),
        ({"one": ""}, "9g67k2htb6"),
        ({"two": "2", "one": "", "three": "3"}, "f5h7t85m9b"),
    ],
)
def test_config_map_hash_matches_kustomize(data: dict[str, str], expected: str) -> None:
    assert (
        config_map_hash({"kind": "ConfigMap", "metadata": {"name": ""}, "data": data}) == expected
    )


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("redis", ("redis", None, None)),
        ("redis:7.4.2-alpine", ("redis", "7.4.2-alpine", None)),
        ("localhost:5000/oidc-sidecar", ("localhost:5000/oidc-sidecar", None, None)),
        ("localhost:5000/oidc-sidecar:1.0", ("localhost:5000/oidc-sidecar", "1.0", None)),
        ("ghcr.io/x/y:1@sha256:abc", ("ghcr.io/x/y", "1", "sha256:abc")),
    ],
)
def test_split_image(image: str, parts: tuple[str, str | None, str | None]) -> None:
    assert split_image(image) == parts


def test_strategic_merge_merges_containers_by_name() -> None:
    original = {
        "spec": {
            "containers": [
                {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]},
                {"name": "b"},
            ]
        }
    }
    patch = {
        "spec": {"containers": [{"name": "a", "env": [{"name": "B", "value": "2"}]}, {"name": "c"}]}
    }
    merged = strategic_merge(original, patch)
    assert merged["spec"]["containers"] == [
        {
            "name": "a",
            "image": "x",
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
        },
        {"name": "b"},
        {"name": "c"},
    ]
    assert strategic_merge({"a": 1, "b": 2}, {"b": None}) == {"a": 1}
    with pytest.raises(KustomizeError):
        strategic_merge({"a": []}, {"a": {"$patch": "delete"}})


def test_json_patch_ops() -> None:
    document: dict[str, Any] = {"a": {"b/c": 1}, "l": [1, 2]}
    json_patch(document, {"op": "replace", "path": "/a/b~1c", "value": 2})
    json_patch(document, {"op": "add", "path": "/l/-", "value": 3})
    json_patch(document, {"op": "remove", "path": "/l/0"})
    assert document == {"a": {"b/c": 2}, "l": [2, 3]}
    with pytest.raises(KustomizeError):
        json_patch(document, {"op": "replace", "path": "/missing", "value": 1})
    with pytest.raises(KustomizeError):
        json_patch(document, {"op": "move", "from": "/a", "path": "/b"})


def test_unknown_kustomization_fields_are_refused(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        build(tmp_path)
