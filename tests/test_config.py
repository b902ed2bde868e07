"""The configuration model: defaults, secret forms, listen addresses, provider rules, and
validation that reports every problem at once, each with its YAML path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest

from sidecar.config import (
    DEFAULT_SCOPE,
    ConfigError,
    Secret,
    Settings,
    load_settings,
    parse_settings,
)

UPSTREAM = "http://127.0.0.1:4986"
ENV = "SIDECAR_TEST_CONFIG_SECRET"
UNSET = "SIDECAR_TEST_CONFIG_UNSET"


def doc(**top: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"upstream": UPSTREAM, "databases": {"db": {}}}
    base.update(top)
    return base


def with_provider(
    name: str = "op", *, oidc: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    provider = {"issuer": "https://op.example.com", "client_id": "client", **fields}
    return doc(databases={"db": {"oidc": {"providers": {name: provider}, **(oidc or {})}}})


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    return caught.value.problems


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "from-the-environment")
    monkeypatch.delenv(UNSET, raising=False)


# --------------------------------------------------------------------------- defaults


def minimal() -> Settings:
    return parse_settings(with_provider())


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (lambda s: s.interface, ":4984"),
        (lambda s: s.admin_interface, "127.0.0.1:4985"),  # admin stays private by default
        (lambda s: s.session_store, None),
        (lambda s: s.public_url, None),
        (lambda s: s.pass_authorization, False),
        (lambda s: s.trusted_proxies, ()),
        (lambda s: s.clock_skew_seconds, 60),
        (lambda s: s.session.ttl, 86400),
        (lambda s: s.session.cookie_secure, "auto"),
        (lambda s: s.timeouts.upstream_read, 300.0),
        (lambda s: s.shutdown_grace_seconds, 25.0),
        (lambda s: s.max_body_bytes, None),
        (lambda s: s.unsupported.oidc_test_provider.enabled, False),
        (lambda s: s.couchdb_proxy_auth.enabled, False),
        (lambda s: s.logging.format, "json"),
        (lambda s: s.identity_headers.user, "X-Forwarded-User"),
        (lambda s: s.identity_headers.email, "X-Forwarded-Email"),
        (lambda s: s.identity_headers.roles, "X-Forwarded-Roles"),
        (lambda s: s.identity_headers.channels, "X-Forwarded-Channels"),
        (lambda s: s.databases["db"].session_cookie_name, "SyncGatewaySession"),
        (lambda s: s.databases["db"].oidc.providers["op"].jwks_refresh_seconds, 300),
        (lambda s: s.databases["db"].upstream, None),
        (lambda s: s.upstream_for("db"), UPSTREAM),
    ],
)
def test_settings_defaults(read: Any, expected: Any) -> None:
    assert read(minimal()) == expected


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("register_user", False),
        ("user_prefix", None),
        ("username_claim", None),
        ("roles_claim", None),
        ("channels_claim", None),
        ("validation_key", None),
        ("callback_url", None),
        ("disable_session", False),
        ("scope", DEFAULT_SCOPE),
        ("include_access", False),
        ("discovery_url", None),
        ("disable_cfg_validation", False),
        ("disable_callback_state", False),
        ("allow_unsigned_provider_tokens", False),
        ("token_endpoint_auth_method", "auto"),
        ("trusted_audiences", ()),
        ("allowed_algorithms", None),
    ],
)
def test_provider_defaults(field: str, expected: Any) -> None:
    provider = minimal().databases["db"].oidc.providers["op"]  # type: ignore[union-attr]
    assert getattr(provider, field) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("openid email profile", ("openid", "email", "profile")),
        (["openid", "profile"], ("openid", "profile")),
        ("openid", ("openid",)),
    ],
)
def test_scope_forms(given: Any, expected: tuple[str, ...]) -> None:
    provider = parse_settings(with_provider(scope=given)).databases["db"].oidc.providers["op"]  # type: ignore[union-attr]
    assert provider.scope == expected


def test_register_is_read_from_its_sync_gateway_name() -> None:
    provider = parse_settings(with_provider(register=True)).databases["db"].oidc.providers["op"]  # type: ignore[union-attr]
    assert provider.register_user is True


def test_database_upstream_overrides_the_global_one() -> None:
    settings = parse_settings(doc(databases={"db": {}, "couch": {"upstream": "http://c:5984"}}))
    assert (settings.upstream_for("db"), settings.upstream_for("couch")) == (
        UPSTREAM,
        "http://c:5984",
    )
    assert (
        parse_settings({"databases": {"db": {"upstream": UPSTREAM}}}).upstream_for("db") == UPSTREAM
    )


def test_demo_upstream_needs_no_upstream() -> None:
    assert parse_settings({"demo_upstream": True, "databases": {"db": {}}}).upstream is None


def test_settings_are_frozen() -> None:
    settings = minimal()
    with pytest.raises(pydantic.ValidationError):
        settings.pass_authorization = True  # type: ignore[misc]


# --------------------------------------------------------------------------- secrets


def secret_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "secret"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("form", "value"),
    [
        ("inline-secret", "inline-secret"),
        ({"value": "inline-secret"}, "inline-secret"),
        ({"env": ENV}, "from-the-environment"),
        ("FILE:from-a-file\n", "from-a-file"),  # a mounted Secret ends with a newline
    ],
)
def test_secret_forms(tmp_path: Path, form: Any, value: str) -> None:
    if isinstance(form, str) and form.startswith("FILE:"):
        form = {"file": secret_file(tmp_path, form.removeprefix("FILE:"))}
    settings = parse_settings(with_provider(validation_key=form))
    key = settings.databases["db"].oidc.providers["op"].validation_key  # type: ignore[union-attr]
    assert isinstance(key, Secret)
    assert key.get() == value
    # Security: no rendering of the settings shows the value
    for text in (repr(key), str(key), f"{key}", repr(settings), str(settings.model_dump())):
        assert value not in text
    assert "**" in repr(key)


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ("", "must not be empty"),
        ({"value": ""}, "must be a string"),
        ({"env": UNSET}, f"environment variable {UNSET} is not set or empty"),
        ({"file": "/nonexistent/secret"}, "cannot read secret file /nonexistent/secret"),
        ("EMPTY-FILE", "is empty"),
        ({"env": 7}, "must be a string"),
        ({"vault": "path"}, "must be a string"),
        ({"env": ENV, "file": "/x"}, "must be a string"),
        (["a"], "must be a string"),
        (42, "must be a string"),
    ],
)
def test_secret_errors(tmp_path: Path, form: Any, message: str) -> None:
    if form == "EMPTY-FILE":
        form = {"file": secret_file(tmp_path, "\n")}
    (problem,) = problems(with_provider(validation_key=form))
    path, _, text = problem.partition(": ")
    assert path == "databases.db.oidc.providers.op.validation_key"
    assert message in text


def test_session_store_url_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis://:hunter2@redis:6379/0"
    settings = parse_settings(doc(session_store=url))
    assert settings.session_store == Secret(url)
    assert "hunter2" not in repr(settings)
    monkeypatch.setenv(ENV, url)
    assert parse_settings(doc(session_store={"env": ENV})).session_store == Secret(url)
    # the scheme error does not echo the URL (it may hold a password)
    assert "hunter2" not in " ".join(problems(doc(session_store="http://:hunter2@r")))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://r.example:6380", True),
        ("unix:///run/redis.sock", True),
        ("redis+sentinel://s1:26379,s2:26379/mymaster/0", True),
        ("redis+cluster://n1:7000,n2:7000", True),
        ("http://r", False),
        ("memcached://m", False),
        ("127.0.0.1:6379", False),
    ],
)
def test_session_store_schemes(url: str, ok: bool) -> None:
    if ok:
        assert parse_settings(doc(session_store=url)).session_store == Secret(url)
    else:
        assert [p.partition(":")[0] for p in problems(doc(session_store=url))] == ["session_store"]


# --------------------------------------------------------------------------- listen addresses


HOST_PORT = "must be host:port or :port (e.g. '127.0.0.1:4984' or ':4984')"
PORT_RANGE = "port must be between 1 and 65535"


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (":4984", None),
        ("127.0.0.1:4984", None),
        ("0.0.0.0:1", None),
        ("[::1]:65535", None),
        ("localhost:8080", None),
        ("4984", HOST_PORT),
        ("127.0.0.1:", HOST_PORT),
        ("127.0.0.1:0", PORT_RANGE),
        ("127.0.0.1:65536", PORT_RANGE),
        (":99999", PORT_RANGE),
        ("127.0.0.1:http", HOST_PORT),
        ("127.0.0.1:-1", HOST_PORT),
        ("", HOST_PORT),
        (4984, "must be host:port or :port, as a string (e.g. '127.0.0.1:4984')"),
        (None, "must be host:port or :port, as a string (e.g. '127.0.0.1:4984')"),
    ],
)
def test_listen_addresses(value: Any, error: str | None) -> None:
    for field in ("interface", "admin_interface"):
        if error is None:
            assert getattr(parse_settings(doc(**{field: value})), field) == value
        else:
            assert problems(doc(**{field: value})) == [f"{field}: {error}"]


# --------------------------------------------------------------------------- providers


@pytest.mark.parametrize(
    ("names", "default_provider", "expected"),
    [
        (["only"], None, "only"),  # the only provider is the default
        (["only"], "only", "only"),
        (["a", "b"], None, None),  # several and none named: no default
        (["a", "b"], "b", "b"),
    ],
)
def test_default_provider(
    names: list[str], default_provider: str | None, expected: str | None
) -> None:
    providers = {n: {"issuer": f"https://{n}.example.com", "client_id": "c"} for n in names}
    oidc: dict[str, Any] = {"providers": providers}
    if default_provider is not None:
        oidc["default_provider"] = default_provider
    settings = parse_settings(doc(databases={"db": {"oidc": oidc}}))
    assert settings.databases["db"].oidc.default == expected  # type: ignore[union-attr]


def test_default_provider_must_exist() -> None:
    assert problems(with_provider(oidc={"default_provider": "other"})) == [
        "databases.db.oidc.default_provider: 'other' is not in providers"
    ]


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("google", True),
        ("Google2", True),
        ("auth.example-com", True),
        ("my_provider", False),  # Sync Gateway: no "_" (it separates the callback's provider)
        ("_google", False),
        ("-google", False),
        (".google", False),
        ("goo gle", False),
        ("gööl", False),
    ],
)
def test_provider_names(name: str, ok: bool) -> None:
    if ok:
        assert name in parse_settings(with_provider(name)).databases["db"].oidc.providers  # type: ignore[union-attr]
    else:
        (problem,) = problems(with_provider(name))
        assert problem.startswith(f"databases.db.oidc.providers.{name}: provider names")


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"issuer": "accounts.google.com"}, "issuer"),
        ({"issuer": "ftp://op.example.com"}, "issuer"),
        ({"issuer": ""}, "issuer"),
        ({"client_id": ""}, "client_id"),
        ({"client_id": None}, "client_id"),
        ({"discovery_url": "/relative"}, "discovery_url"),
        ({"callback_url": "javascript:alert(1)"}, "callback_url"),
        ({"allow_unsigned_provider_tokens": True}, "allow_unsigned_provider_tokens"),
        ({"allowed_algorithms": ["HS256"]}, "allowed_algorithms"),
        ({"allowed_algorithms": ["none"]}, "allowed_algorithms"),
        ({"allowed_algorithms": []}, "allowed_algorithms"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "token_endpoint_auth_method"),
        ({"register": "sometimes"}, "register"),
        ({"jwks_refresh_seconds": 29}, "jwks_refresh_seconds"),  # never more often than 30 s
        ({"jwks_refresh_seconds": 0}, "jwks_refresh_seconds"),
        ({"jwks_refresh_seconds": 86401}, "jwks_refresh_seconds"),
        ({"jwks_refresh_seconds": "often"}, "jwks_refresh_seconds"),
        ({"regster": True}, "regster"),
    ],
)
def test_provider_field_errors(fields: dict[str, Any], path: str) -> None:
    clean = {k: v for k, v in fields.items() if v is not None}
    data = with_provider(**clean)
    if fields.get("client_id", "") is None:
        del data["databases"]["db"]["oidc"]["providers"]["op"]["client_id"]
    (problem,) = problems(data)
    assert problem.startswith(f"databases.db.oidc.providers.op.{path}: ")


# --------------------------------------------------------------------------- other fields


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (doc(bogus=1), "bogus: unknown key"),
        (doc(session={"tll": 1}), "session.tll: unknown key"),
        (doc(databases={"db": {"cookie": "x"}}), "databases.db.cookie: unknown key"),
        (doc(identity_headers={"group": "X-G"}), "identity_headers.group: unknown key"),
        (doc(databases={"Db": {}}), "databases.Db: database name"),
        (doc(databases={"1db": {}}), "databases.1db: database name"),
        (doc(databases={}), "databases: "),
        ({"databases": {"db": {}}}, "upstream: required"),
        (doc(upstream="ftp://u"), "upstream: "),
        (doc(public_url="sync.example.com"), "public_url: "),
        (doc(public_url="https://sync.example.com/p?x=1"), "public_url: must not have a query"),
        (doc(public_url="https://sync.example.com/?"), "public_url: must not have a query"),
        (doc(public_url="https://sync.example.com/p#f"), "public_url: must not have a query"),
        (
            doc(databases={"db": {"session_cookie_name": "a=b"}}),
            "databases.db.session_cookie_name: ",
        ),
        (
            doc(databases={"db": {"session_cookie_name": "a b"}}),
            "databases.db.session_cookie_name: ",
        ),
        (doc(identity_headers={"user": "X User"}), "identity_headers.user: "),
        (doc(identity_headers={"roles": "X-Roles:"}), "identity_headers.roles: "),
        (doc(trusted_proxies=["10.0.0.0/8", "nope"]), "trusted_proxies: 'nope'"),
        (doc(clock_skew_seconds=601), "clock_skew_seconds: "),
        (doc(session={"ttl": 59}), "session.ttl: "),
        (doc(session={"cookie_secure": "sometimes"}), "session.cookie_secure: "),
        (doc(timeouts={"upstream_read": 0}), "timeouts.upstream_read: "),
        (doc(max_body_bytes=-1), "max_body_bytes: "),
        (doc(logging={"level": "trace"}), "logging.level: "),
        (
            doc(unsupported={"oidc_test_provider": {"enable": True}}),
            "unsupported.oidc_test_provider.enable: unknown key",
        ),
    ],
)
def test_field_errors_name_their_path(data: dict[str, Any], expected: str) -> None:
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


# --------------------------------------------------------------------------- plain words

SCOPE = "databases.db.oidc.providers.op.scope"
SCOPE_MSG = "must be a list of strings or a space-separated string"


# (data, the exact problem line): pydantic's own wording never reaches the user.
PLAIN: list[tuple[str, dict[str, Any], str]] = [
    ("scope-int", with_provider(scope=5), f"{SCOPE}: {SCOPE_MSG}"),
    ("scope-list-of-ints", with_provider(scope=["openid", 1]), f"{SCOPE}: {SCOPE_MSG}"),
    ("scope-mapping", with_provider(scope={"a": "b"}), f"{SCOPE}: {SCOPE_MSG}"),
    ("port-range", doc(interface="127.0.0.1:65536"), "interface: port must be between 1 and 65535"),
    (
        "missing",
        {"databases": {"db": {}}},
        "upstream: required (database db has no upstream of its own)",
    ),
    ("unknown-key", doc(bogus=1), "bogus: unknown key"),
    ("bool", doc(pass_authorization="yes please"), "pass_authorization: must be true or false"),
    ("int", doc(session={"ttl": "a day"}), "session.ttl: must be a whole number"),
    ("int-from-float", doc(session={"ttl": 90.5}), "session.ttl: must be a whole number"),
    ("float", doc(shutdown_grace_seconds="soon"), "shutdown_grace_seconds: must be a number"),
    ("ge", doc(session={"ttl": 59}), "session.ttl: must be at least 60"),
    ("le", doc(clock_skew_seconds=601), "clock_skew_seconds: must be at most 600"),
    ("gt", doc(timeouts={"provider": 0}), "timeouts.provider: must be greater than 0.0"),
    (
        "literal",
        doc(logging={"level": "trace"}),
        "logging.level: must be 'debug', 'info', 'warning' or 'error'",
    ),
    ("literal-two", doc(logging={"format": "xml"}), "logging.format: must be 'json' or 'text'"),
    ("mapping", doc(session=5), "session: must be a mapping"),
    ("mapping-of-dbs", doc(databases=["db"]), "databases: must be a mapping"),
    ("db-not-mapping", doc(databases={"db": "x"}), "databases.db: must be a mapping"),
    ("list", doc(trusted_proxies="10.0.0.0/8"), "trusted_proxies: must be a list"),
    ("list-item", doc(trusted_proxies=[10]), "trusted_proxies.0: must be a string"),
    (
        "string",
        with_provider(client_id=5),
        "databases.db.oidc.providers.op.client_id: must be a string",
    ),
    (
        "empty-string",
        with_provider(client_id=""),
        "databases.db.oidc.providers.op.client_id: must not be empty",
    ),
    ("empty-dict", doc(databases={}), "databases: must not be empty"),
    (
        "value-error",
        with_provider(issuer="op.example.com"),
        "databases.db.oidc.providers.op.issuer: URL must be an absolute http(s) URL",
    ),
    ("key-type", doc(databases={1: {}}), "databases.1: name must be a string"),
]


@pytest.mark.parametrize(
    ("data", "expected"), [pytest.param(d, e, id=name) for name, d, e in PLAIN]
)
def test_messages_are_plain_words(data: dict[str, Any], expected: str) -> None:
    found = problems(data)
    assert expected in found, found
    for problem in found:
        assert "Input should" not in problem
        assert "Value error" not in problem
        assert "validation error" not in problem.lower()


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "upstream": "ftp://u",
        "interface": "4984",
        "bogus": True,
        "session": {"ttl": 1},
        "databases": {
            "Bad": {},
            "db": {
                "session_cookie_name": "a b",
                "oidc": {
                    "default_provider": "missing",
                    "providers": {
                        "my_op": {"issuer": "nope", "validation_key": {"env": UNSET}},
                    },
                },
            },
        },
    }
    found = problems(data)
    expected = [
        "upstream: ",
        "interface: ",
        "bogus: unknown key",
        "session.ttl: ",
        "databases.Bad: database name",
        "databases.db.session_cookie_name: ",
        "databases.db.oidc.default_provider: 'missing' is not in providers",
        "databases.db.oidc.providers.my_op: provider names",
        "databases.db.oidc.providers.my_op.issuer: ",
        "databases.db.oidc.providers.my_op.client_id: required",
        f"databases.db.oidc.providers.my_op.validation_key: environment variable {UNSET}",
    ]
    for start in expected:
        assert sum(p.startswith(start) for p in found) == 1, (start, found)
    assert len(found) == len(expected), found
    assert str(ConfigError(found)).count("\n") == len(found)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n", "(top level): must be a mapping"),
        ("", "(top level): must be a mapping"),
        ("just a string\n", "(top level): must be a mapping"),
        ("databases: [\n", "not valid YAML"),
    ],
)
def test_load_settings_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert expected in caught.value.problems[0]


def test_load_settings_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_load_settings_reads_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "upstream: http://127.0.0.1:4986\n"
        "databases:\n"
        "  db:\n"
        "    oidc:\n"
        "      providers:\n"
        "        google: {issuer: 'https://accounts.google.com', client_id: c, register: true}\n"
    )
    settings = load_settings(path)
    assert settings.databases["db"].oidc.providers["google"].register_user is True  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"type": "string_too_short", "ctx": {"min_length": 3}}, "must have at least 3 characters"),
        ({"type": "too_short", "ctx": {"min_length": 2}}, "must have at least 2 entries"),
        ({"type": "string_too_long", "ctx": {"max_length": 8}}, "must have at most 8 characters"),
        ({"type": "too_long", "ctx": {"max_length": 4}}, "must have at most 4 entries"),
        ({"type": "less_than", "ctx": {"lt": 5}}, "must be less than 5"),
        ({"type": "finite_number"}, "must be a finite number"),
        ({"type": "some_future_pydantic_type", "msg": "Input should be X"}, "is not valid here"),
    ],
)
def test_plain_words_for_error_types_no_field_raises_today(
    error: dict[str, Any], expected: str
) -> None:
    """Types no field of ours produces yet (a future key might): still plain words."""
    from sidecar.config import _plain

    assert _plain({"loc": (), "msg": "", "input": None, **error}) == expected  # type: ignore[typeddict-item]


# ------------------------------------------------------------------ review #17 leftovers

REDIRECT_ORIGIN_WORDS = (
    "is not an origin: scheme://host[:port] "
    "(http or https, no trailing /, path, user, query or fragment)"
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            with_provider(scope=5),
            [
                "databases.db.oidc.providers.op.scope: must be a list of strings or a space-separated string"
            ],
        ),
        (doc(pass_authorization="yes please"), ["pass_authorization: must be true or false"]),
        (doc(interface=":70000"), ["interface: port must be between 1 and 65535"]),
        (
            # Every bad entry, each with its index: not only the first.
            doc(
                databases={
                    "db": {
                        "allowed_redirect_origins": [
                            "https://ok.example",
                            "https://a.example/x",
                            "nope",
                            "ftp://x",
                        ]
                    }
                }
            ),
            [
                f"databases.db.allowed_redirect_origins.1: 'https://a.example/x' {REDIRECT_ORIGIN_WORDS}",
                f"databases.db.allowed_redirect_origins.2: 'nope' {REDIRECT_ORIGIN_WORDS}",
                f"databases.db.allowed_redirect_origins.3: 'ftp://x' {REDIRECT_ORIGIN_WORDS}",
            ],
        ),
    ],
)
def test_broken_values_exact_messages(data: dict[str, Any], expected: list[str]) -> None:
    assert problems(data) == expected
