"""Starting the benchmark's servers on free loopback ports: nginx, Redis, the test OpenID Provider,
Apache httpd with mod_auth_openidc, the plain aiohttp proxy and the sidecar.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from harness import (
    BENCH,
    LOOPBACK,
    PYTHON,
    VENV_BIN,
    BenchError,
    Processes,
    Service,
    free_port,
    render,
    require_binary,
    wait_for_http,
    wait_for_port,
)

from tests.support.op import OPClient, OpenIDProvider

DB = "db"  # the sidecar database name; Apache and nginx use the same path prefix upstream
APACHE_CLIENT_ID = "bench-apache"
TOKEN_CLIENT_ID = "bench"  # the audience of the ID token both proxies are given as a bearer


@dataclass(frozen=True)
class Endpoint:
    service: Service
    port: int

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def start_nginx(procs: Processes) -> Endpoint:
    nginx = require_binary("nginx")
    port = free_port()
    conf = render(
        BENCH / "nginx" / "upstream.conf",
        procs.workdir / "nginx.conf",
        workdir=procs.workdir,
        port=port,
    )
    service = procs.start("nginx", [nginx, "-p", str(procs.workdir), "-c", str(conf)])
    wait_for_port(port, service)
    return Endpoint(service, port)


def start_redis(procs: Processes) -> Endpoint:
    redis = require_binary("redis-server")
    port = free_port()
    service = procs.start(
        "redis",
        [
            redis,
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(procs.workdir),
            "--maxclients",
            "10000",
        ],
    )
    wait_for_port(port, service)
    return Endpoint(service, port)


def start_op(
    procs: Processes, clients: list[OPClient], id_token_ttl: int = 4 * 3600
) -> OpenIDProvider:
    """The tests' real OpenID Provider (node oidc-provider); stopped with the other children."""
    op = OpenIDProvider(clients=clients, id_token_ttl=id_token_ttl)
    op.start()
    procs.on_exit(op.stop)
    return op


def token_client() -> OPClient:
    # Only its ID tokens are used (as bearer tokens): the redirect target is never requested.
    return OPClient(TOKEN_CLIENT_ID, secrets.token_urlsafe(24), ("http://127.0.0.1:9/cb",))


@dataclass(frozen=True)
class Apache:
    endpoint: Endpoint
    client: OPClient

    @property
    def session_url(self) -> str:
        return f"{self.endpoint.base}/session/"

    @property
    def bearer_url(self) -> str:
        return f"{self.endpoint.base}/bearer/"


def apache_client(port: int) -> OPClient:
    return OPClient(
        APACHE_CLIENT_ID,
        secrets.token_urlsafe(24),
        (f"http://{LOOPBACK}:{port}/session/redirect_uri",),
    )


def op_signing_certificate(op: OpenIDProvider, workdir: Path) -> tuple[str, Path]:
    """(kid, PEM path): the OP's RS256 key wrapped in an X.509 certificate for Apache.

    mod_auth_openidc accepts only an https OIDCOAuthVerifyJwksUri and the OP is http on
    loopback, so Apache gets the same public key statically (OIDCOAuthVerifyCertFiles). Only
    the subject key matters to it; a throwaway key signs the certificate.
    """
    import datetime
    import urllib.request

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    with urllib.request.urlopen(op.jwks_uri, timeout=10) as response:  # loopback only
        jwks = json.load(response)
    jwk = next((k for k in jwks["keys"] if k.get("kty") == "RSA"), None)
    if jwk is None:
        raise BenchError(f"the OP publishes no RSA key: {jwks}")

    def number(field: str) -> int:
        import base64

        raw = base64.urlsafe_b64decode(jwk[field] + "=" * (-len(jwk[field]) % 4))
        return int.from_bytes(raw, "big")

    subject_key = rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench OP signing key")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(signer, hashes.SHA256())
    )
    path = workdir / "op-signing-key.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(jwk["kid"]), path


def start_apache(
    procs: Processes,
    *,
    port: int,
    client: OPClient,
    op: OpenIDProvider,
    redis_port: int,
    upstream_port: int,
    workers: int,
    threads: int = 64,
) -> Apache:
    apache2 = require_binary("apache2")
    module = Path("/usr/lib/apache2/modules/mod_auth_openidc.so")
    if not module.exists():
        raise BenchError("mod_auth_openidc is not installed: run bench/setup.sh (as root)")
    kid, certificate = op_signing_certificate(op, procs.workdir)
    run_dir = procs.workdir / "apache-run"
    run_dir.mkdir(exist_ok=True)
    os.chmod(run_dir, 0o777)  # noqa: S103 - Apache's children (www-data) keep mutexes here
    conf = render(
        BENCH / "apache" / "httpd.conf",
        procs.workdir / "httpd.conf",
        workdir=procs.workdir,
        port=port,
        workers=workers,
        threads=threads,
        max_request_workers=workers * threads,
        issuer=op.issuer,
        verify_cert=f"{kid}#{certificate}",
        client_id=client.client_id,
        client_secret=client.client_secret,
        passphrase=secrets.token_urlsafe(32),
        redis_port=redis_port,
        redis_db=1,  # the sidecar uses db 0 of the same server
        upstream_port=upstream_port,
    )
    check = procs.start("apache-configtest", [apache2, "-t", "-f", str(conf)])
    if check.process.wait(timeout=30) != 0:
        raise BenchError(f"apache2 -t rejected {conf}:\n{check.tail()}")
    procs.stop(check)
    service = procs.start("apache", [apache2, "-f", str(conf), "-DFOREGROUND"])
    wait_for_port(port, service)
    return Apache(Endpoint(service, port), client)


def start_plain_proxy(
    procs: Processes, *, upstream: str, workers: int, transport: str = "aiohttp"
) -> Endpoint:
    port = free_port()
    service = procs.start(
        f"plain-proxy-{transport}",
        [
            PYTHON,
            str(BENCH / "plain_proxy.py"),
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--workers",
            str(workers),
            "--transport",
            transport,
        ],
    )
    wait_for_port(port, service)
    return Endpoint(service, port)


@dataclass(frozen=True)
class Sidecar:
    endpoint: Endpoint
    admin_port: int
    config: Path

    @property
    def admin(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"{self.endpoint.base}/{DB}/"


def sidecar_config(
    *,
    port: int,
    admin_port: int,
    upstream: str,
    redis_port: int,
    issuer: str | None,
    session_cache_seconds: float | None = None,
    log_level: str = "warning",
    transport: str | None = None,
) -> dict[str, object]:
    db: dict[str, object] = {}
    if issuer is not None:
        db["oidc"] = {
            "providers": {
                "op": {"issuer": issuer, "client_id": TOKEN_CLIENT_ID, "register": True},
            }
        }
    config: dict[str, object] = {
        "interface": f"{LOOPBACK}:{port}",
        "admin_interface": f"{LOOPBACK}:{admin_port}",
        "upstream": upstream,
        "session_store": f"redis://{LOOPBACK}:{redis_port}/0",
        # No access log: Apache is run without one too.
        "logging": {"format": "text", "level": log_level},
        "databases": {DB: db},
    }
    if session_cache_seconds is not None:
        config["session"] = {"local_cache_seconds": session_cache_seconds}
    if transport is not None:
        config["upstream_transport"] = transport
    return config


def start_sidecar(
    procs: Processes,
    *,
    upstream: str,
    redis_port: int,
    issuer: str | None,
    workers: int,
    session_cache_seconds: float | None = None,
    log_level: str = "warning",
    name: str = "sidecar",
    transport: str | None = None,
) -> Sidecar:
    sidecar = VENV_BIN / "sidecar"
    if not sidecar.exists():
        raise BenchError(f"{sidecar} is missing: run `make install`")
    port, admin_port = free_port(), free_port()
    config = procs.workdir / f"{name}.yaml"
    # JSON is YAML: no YAML writer needed.
    config.write_text(
        json.dumps(
            sidecar_config(
                port=port,
                admin_port=admin_port,
                upstream=upstream,
                redis_port=redis_port,
                issuer=issuer,
                session_cache_seconds=session_cache_seconds,
                transport=transport,
            ),
            indent=2,
        )
    )
    service = procs.start(
        name, [str(sidecar), "run", "--config", str(config), "--workers", str(workers)]
    )
    wait_for_port(port, service)
    wait_for_http(f"http://{LOOPBACK}:{admin_port}/_ready", service)
    return Sidecar(Endpoint(service, port), admin_port, config)


def start_upstream_app(procs: Processes) -> Endpoint:
    """bench/upstreams.py: websocket echo, streaming download and upload sink."""
    port = free_port()
    service = procs.start("upstream", [PYTHON, str(BENCH / "upstreams.py"), "--port", str(port)])
    wait_for_port(port, service)
    return Endpoint(service, port)


@dataclass(frozen=True)
class ProxyUnderTest:
    """One proxy process in front of an upstream: the sidecar, or the plain proxy to compare."""

    kind: str  # "sidecar" | "plain"
    service: Service
    url: str  # the database's base URL, ending in "/"
    sidecar: Sidecar | None

    @property
    def pid(self) -> int:
        return self.service.pid


def start_proxy_under_test(procs: Processes, kind: str, upstream: str) -> ProxyUnderTest:
    """A single process (so that its RSS is the whole proxy's) for the ws and memory benches."""
    if kind == "plain":
        plain = start_plain_proxy(procs, upstream=upstream, workers=1)
        return ProxyUnderTest(kind, plain.service, f"{plain.base}/{DB}/", None)
    redis = start_redis(procs)
    sidecar = start_sidecar(procs, upstream=upstream, redis_port=redis.port, issuer=None, workers=1)
    return ProxyUnderTest(kind, sidecar.endpoint.service, sidecar.url, sidecar)
