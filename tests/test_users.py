"""Username derivation, claim shapes and login updates, as tables of Sync Gateway cases."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

import pytest

from sidecar.errors import Unauthorized
from sidecar.sessions.models import User
from sidecar.users import (
    ClaimError,
    LoginRefused,
    UsernameError,
    apply_login,
    claim_strings,
    format_number,
    go_query_escape,
    issuer_prefix,
    username_from_claims,
    valid_email,
)

ISSUER = "https://www.someprovider.com/extra"


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("", ""),
        ("bernard", "bernard"),
        ("{bernard}", "%7Bbernard%7D"),
        ("a b", "a+b"),
        ("a+b", "a%2Bb"),
        ("~", "~"),
        ("-_.", "-_."),
        ("a/b", "a%2Fb"),
        ("a_b", "a_b"),
        ("user@example.com", "user%40example.com"),
        ("host:8080", "host%3A8080"),
        ("$&+,/:;=?@", "%24%26%2B%2C%2F%3A%3B%3D%3F%40"),
        ("*'()!", "%2A%27%28%29%21"),
        ("%", "%25"),
        ("é", "%C3%A9"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("😀", "%F0%9F%98%80"),
        ("\x00\n\t", "%00%0A%09"),
        ("\x7f", "%7F"),
        ("\ud800", "%EF%BF%BD"),  # a lone surrogate: Go's JSON decoder made it U+FFFD
    ],
)
def test_go_query_escape(raw: str, escaped: str) -> None:
    assert go_query_escape(raw) == escaped


def test_go_query_escape_matches_quote_plus_over_all_of_latin1_and_more() -> None:
    # Python's quote_plus (3.7+) has the same unreserved set as Go's QueryEscape.
    sample = "".join(chr(c) for c in range(0x300)) + "\u2028\uffff\U0001f600"
    assert go_query_escape(sample) == quote_plus(sample)


@pytest.mark.parametrize(
    ("issuer", "prefix"),
    [
        ("https://www.someprovider.com/extra", "www.someprovider.com%2Fextra"),
        ("https://accounts.google.com", "accounts.google.com"),
        ("https://accounts.google.com/", "accounts.google.com%2F"),
        ("http://localhost:4984/db/_oidc_testing", "localhost%3A4984%2Fdb%2F_oidc_testing"),
        ("https://user:pw@idp.example/x", "idp.example%2Fx"),
        ("https://idp.example/a%20b", "idp.example%2Fa+b"),
        ("https://idp.example/x?y=1", "idp.example%2Fx"),
        ("https://[::1]:8443/r", "%5B%3A%3A1%5D%3A8443%2Fr"),
        ("not a url", "not+a+url"),
    ],
)
def test_issuer_prefix(issuer: str, prefix: str) -> None:
    assert issuer_prefix(issuer) == prefix


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (80249751, "80249751"),
        (0, "0"),
        (-5, "-5"),
        (2**64 + 1, "18446744073709551617"),  # exact, unlike Go's float64 (documented)
        (1.0, "1"),
        (1.5, "1.5"),
        (-0.0, "-0"),
        (0.1, "0.1"),
        (1e21, "1000000000000000000000"),
        (1e-7, "0.0000001"),
        (123456789.125, "123456789.125"),
        (80249751.0, "80249751"),
    ],
)
def test_format_number_like_go_formatfloat(number: int | float, text: str) -> None:
    assert format_number(number) == text


# (claims, user_prefix, username_claim, expected name or None when the login must fail)
USERNAME_CASES: list[tuple[dict[str, Any], str | None, str | None, str | None]] = [
    # neither prefix nor claim: escaped issuer host+path, "_", escaped sub
    ({"sub": "bernard"}, None, None, "www.someprovider.com%2Fextra_bernard"),
    ({"sub": "{bernard}"}, None, None, "www.someprovider.com%2Fextra_%7Bbernard%7D"),
    ({"sub": "a b/c"}, None, None, "www.someprovider.com%2Fextra_a+b%2Fc"),
    ({"sub": "bernard"}, "", "", "www.someprovider.com%2Fextra_bernard"),  # "" is unset
    # prefix only
    ({"sub": "bernard"}, "foo", None, "foo_bernard"),
    ({"sub": "{bernard}"}, "foo", None, "foo_%7Bbernard%7D"),
    ({"sub": "a_b"}, "foo", None, "foo_a_b"),
    ({"sub": "bernard", "email": "x@y.z"}, "foo", None, "foo_bernard"),
    # claim only: no prefix at all, not even the issuer's
    ({"sub": "s", "email": "bernard@example.com"}, None, "email", "bernard%40example.com"),
    ({"sub": "s", "username": "{bernard}"}, None, "username", "%7Bbernard%7D"),
    ({"sub": "s", "uid": 80249751}, None, "uid", "80249751"),
    ({"sub": "s", "uid": 80249751.0}, None, "uid", "80249751"),
    ({"sub": "s", "uid": 1.5}, None, "uid", "1.5"),
    ({"sub": "s", "uid": -42}, None, "uid", "-42"),
    ({"sub": "s", "uid": "a+b c"}, None, "uid", "a%2Bb+c"),
    # claim and prefix
    ({"sub": "s", "email": "bernard@example.com"}, "foo", "email", "foo_bernard%40example.com"),
    ({"sub": "s", "uid": 80249751}, "foo", "uid", "foo_80249751"),
    ({"sub": "s", "username": "{bernard}"}, "foo", "username", "foo_%7Bbernard%7D"),
    ({"sub": "s", "sub2": "x"}, "foo", "sub", "foo_s"),  # username_claim may name sub itself
    # failures: the subject
    ({}, None, None, None),
    ({"sub": ""}, None, None, None),
    ({"sub": ""}, "foo", "email", None),
    ({"sub": 123}, None, None, None),
    ({"sub": None}, "foo", None, None),
    ({"sub": ["a"]}, "foo", None, None),
    # failures: the username claim
    ({"sub": "s"}, None, "email", None),
    ({"sub": "s"}, "foo", "email", None),
    ({"sub": "s", "email": None}, None, "email", None),
    ({"sub": "s", "email": True}, None, "email", None),
    ({"sub": "s", "email": False}, "foo", "email", None),
    ({"sub": "s", "email": ["a@b.c"]}, None, "email", None),
    ({"sub": "s", "email": {"v": "a@b.c"}}, None, "email", None),
    ({"sub": "s", "email": ""}, None, "email", None),
    ({"sub": "s", "uid": float("nan")}, None, "uid", None),
    ({"sub": "s", "uid": float("inf")}, None, "uid", None),
]


@pytest.mark.parametrize(("claims", "user_prefix", "username_claim", "expected"), USERNAME_CASES)
def test_username_from_claims(
    claims: dict[str, Any],
    user_prefix: str | None,
    username_claim: str | None,
    expected: str | None,
) -> None:
    if expected is None:
        with pytest.raises(UsernameError):
            username_from_claims(
                claims, issuer=ISSUER, user_prefix=user_prefix, username_claim=username_claim
            )
    else:
        name = username_from_claims(
            claims, issuer=ISSUER, user_prefix=user_prefix, username_claim=username_claim
        )
        assert name == expected


def test_username_error_is_a_401() -> None:
    with pytest.raises(Unauthorized) as info:
        username_from_claims({}, issuer=ISSUER, user_prefix=None, username_claim=None)
    assert info.value.status == 401


@pytest.mark.parametrize(
    ("claims", "claim_name", "expected"),
    [
        ({"roles": "admin"}, "roles", ("admin",)),
        ({"roles": ["a", "b"]}, "roles", ("a", "b")),
        ({"roles": ["b", "a", "b"]}, "roles", ("b", "a")),
        ({"roles": ["a", ""]}, "roles", ("a",)),
        ({"roles": ""}, "roles", ()),
        ({"roles": []}, "roles", ()),
        ({"roles": None}, "roles", ()),
        ({}, "roles", ()),
        ({"roles": ["a"]}, None, ()),
        ({"roles": ["a"]}, "", ()),
        ({"roles": ["a"]}, "channels", ()),
        ({"roles": 5}, "roles", ClaimError),
        ({"roles": True}, "roles", ClaimError),
        ({"roles": {"a": 1}}, "roles", ClaimError),
        ({"roles": ["a", 1]}, "roles", ClaimError),
        ({"roles": ["a", None]}, "roles", ClaimError),
        ({"roles": [["a"]]}, "roles", ClaimError),
        ({"roles": ("a",)}, "roles", ClaimError),  # never produced by JSON
    ],
)
def test_claim_strings(claims: dict[str, Any], claim_name: str | None, expected: Any) -> None:
    if expected is ClaimError:
        with pytest.raises(ClaimError):
            claim_strings(claims, claim_name)
    else:
        assert claim_strings(claims, claim_name) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("user@example.com", "user@example.com"),
        ("first.last+tag@mail.example.co.uk", "first.last+tag@mail.example.co.uk"),
        ("a_b-c@x-y.z", "a_b-c@x-y.z"),
        ("a@b", None),  # the domain needs two characters
        ("a@bc", "a@bc"),
        ("", None),
        ("no-at-sign", None),
        ("@example.com", None),
        ("a@@example.com", None),
        ("a b@example.com", None),
        ("a@-example.com", None),
        ("user@example.com\n", None),
        ("üser@example.com", None),  # Go's \w is ASCII-only
        ("<script>@x.y", None),
        (None, None),
        (42, None),
        (["a@b.c"], None),
    ],
)
def test_valid_email(value: Any, expected: str | None) -> None:
    assert valid_email(value) == expected


NOW = 1_700_000_000.0


def _login(existing: User | None, claims: dict[str, Any], *, register: bool = True) -> User:
    return apply_login(
        existing,
        claims,
        db="db",
        name="foo_bernard",
        issuer=ISSUER,
        roles_claim="roles",
        channels_claim="channels",
        register=register,
        now=NOW,
    )


def test_register_creates_the_user_from_the_claims() -> None:
    user = _login(
        None, {"sub": "bernard", "email": "b@example.com", "roles": ["r1"], "channels": "c1"}
    )
    assert user == User(
        db="db",
        name="foo_bernard",
        email="b@example.com",
        jwt_issuer=ISSUER,
        jwt_roles=("r1",),
        jwt_channels=("c1",),
        jwt_last_updated=NOW,
    )


def test_register_skips_an_invalid_email() -> None:
    assert _login(None, {"sub": "bernard", "email": "not an email"}).email is None


def test_missing_user_without_register_is_refused() -> None:
    with pytest.raises(LoginRefused) as info:
        _login(None, {"sub": "bernard"}, register=False)
    assert info.value.reason == "Invalid login"
    assert info.value.status == 401


EXISTING = User(
    db="db",
    name="foo_bernard",
    email="old@example.com",
    admin_channels=("admin-c",),
    admin_roles=("admin-r",),
    jwt_issuer="https://old.example",
    jwt_roles=("old-r",),
    jwt_channels=("old-c",),
    jwt_last_updated=1.0,
)


@pytest.mark.parametrize("register", [True, False])
def test_existing_user_is_refreshed_regardless_of_register(register: bool) -> None:
    claims = {"sub": "bernard", "email": "new@example.com", "roles": "r", "channels": ["c"]}
    user = _login(EXISTING, claims, register=register)
    assert user.email == "new@example.com"
    assert user.jwt_issuer == ISSUER
    assert (user.jwt_roles, user.jwt_channels) == (("r",), ("c",))
    assert user.jwt_last_updated == NOW
    assert (user.admin_roles, user.admin_channels) == (("admin-r",), ("admin-c",))
    assert user.roles == ("admin-r", "r")


@pytest.mark.parametrize(
    ("claims", "email"),
    [
        ({"sub": "bernard"}, "old@example.com"),  # absent: kept
        ({"sub": "bernard", "email": "bad"}, "old@example.com"),  # invalid: kept
        ({"sub": "bernard", "email": 7}, "old@example.com"),
        ({"sub": "bernard", "email": "new@example.com"}, "new@example.com"),
    ],
)
def test_email_only_replaced_by_a_valid_one(claims: dict[str, Any], email: str) -> None:
    assert _login(EXISTING, claims).email == email


def test_missing_claims_clear_token_grants_but_not_admin_grants() -> None:
    user = _login(EXISTING, {"sub": "bernard"})
    assert (user.jwt_roles, user.jwt_channels) == ((), ())
    assert (user.admin_roles, user.admin_channels) == (("admin-r",), ("admin-c",))


def test_unconfigured_claims_grant_nothing() -> None:
    user = apply_login(
        EXISTING,
        {"sub": "bernard", "roles": ["r"], "channels": ["c"]},
        db="db",
        name="foo_bernard",
        issuer=ISSUER,
        roles_claim=None,
        channels_claim=None,
        register=True,
        now=NOW,
    )
    assert (user.jwt_roles, user.jwt_channels) == ((), ())


@pytest.mark.parametrize("register", [True, False])
def test_disabled_user_is_refused(register: bool) -> None:
    disabled = User(db="db", name="foo_bernard", disabled=True)
    with pytest.raises(LoginRefused):
        _login(disabled, {"sub": "bernard"}, register=register)


def test_malformed_grant_claim_refuses_before_registering() -> None:
    with pytest.raises(ClaimError):
        _login(None, {"sub": "bernard", "roles": 5})
    with pytest.raises(UsernameError):  # ClaimError is a UsernameError: callers catch one
        _login(EXISTING, {"sub": "bernard", "channels": [1]})


def test_existing_user_must_match_db_and_name() -> None:
    with pytest.raises(ValueError):
        apply_login(
            EXISTING,
            {"sub": "bernard"},
            db="other",
            name="foo_bernard",
            issuer=ISSUER,
            roles_claim=None,
            channels_claim=None,
            register=True,
            now=NOW,
        )
