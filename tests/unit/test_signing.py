"""Signed URLs against docs/signed-urls.md: every refusal reason, keys, and both snippets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from multidict import MultiDict, MultiDictProxy
from yarl import URL

import proxy.signing
from proxy.errors import ConfigError, Forbidden
from proxy.signing import (
    CLOCK_SKEW_S,
    MAX_TTL_S,
    canonical_ip,
    load_keys,
    sign,
    signed_url,
    verify,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "signed-urls.md"
KEY = b"test-key-0123456789abcdef-0123456789"
OLD_KEY = b"old-key-0123456789abcdef-0123456789"
OTHER_KEY = b"other-key-0123456789abcdef-012345678"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
EXPIRES = int(NOW) + 300


def split(url: str) -> tuple[str, MultiDictProxy[str]]:
    """Split a URL as aiohttp does: the raw path untouched, the query parsed by yarl."""
    path, _, query = url.partition("?")
    return path, URL.build(path="/", query_string=query).query


def check(
    url: str,
    keys: tuple[bytes, ...] = (KEY,),
    *,
    path: str | None = None,
    now: float = NOW,
    client_ip: str | None = None,
) -> None:
    """Verify `url` as a request would reach the verifier (optionally on another path)."""
    raw_path, query = split(url)
    verify(path or raw_path, query, keys, now=now, client_ip=client_ip)


def reason(url: str, keys: tuple[bytes, ...] = (KEY,), **kwargs: Any) -> str:
    """The Forbidden reason `check` raises."""
    with pytest.raises(Forbidden) as info:
        check(url, keys, **kwargs)
    return info.value.reason


def url_for(path: str, key: bytes = KEY, expires_at: int = EXPIRES, **kwargs: Any) -> str:
    return f"{path}?{sign(path, key, expires_at=expires_at, **kwargs)}"


def raw_url(path: str, expires: int | str, key: bytes = KEY, ip: str = "") -> str:
    """Sign as the doc says, independently of proxy.signing (and of its argument checks)."""
    message = f"v1\n{path}\n{expires}\n{ip}".encode()
    mac = hmac.new(key, message, hashlib.sha256).digest()
    return f"{path}?expires={expires}&sig={base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


# --- round trips -----------------------------------------------------------------------

PATHS = [
    "/api/media/42",
    "/api/media/42/thumbnail",
    "/media/photos/caf%C3%A9.jpg",
    "/media/a%2Fb",  # an encoded slash is one segment, not two
    "/media/%e2%82%ac",  # lowercase hex is kept as sent
    "/media/!$&'()*+,;=:@-._~",  # every RFC 3986 path character a browser sends unchanged
    "/",
]


@pytest.mark.parametrize("path", PATHS)
def test_a_signed_url_verifies(path: str) -> None:
    url = signed_url(path, KEY, expires_in_s=300, now=NOW + 0.9)
    assert url == raw_url(path, EXPIRES)
    check(url)


def test_signed_url_takes_a_duration_in_float_seconds() -> None:
    assert signed_url("/m/x", KEY, expires_in_s=300.0, now=NOW).startswith(
        f"/m/x?expires={EXPIRES}&"
    )
    assert signed_url("/m/x", KEY, expires_in_s=1.5, now=NOW + 0.6).startswith(
        f"/m/x?expires={int(NOW) + 2}&"
    )


def test_signed_url_reads_the_clock_when_no_time_is_given() -> None:
    import time

    url = signed_url("/m/x", KEY, expires_in_s=60)
    check(url, now=time.time())


def test_extra_query_parameters_are_not_covered() -> None:
    url = url_for("/api/media/42")
    check(url + "&v=3&download=1")
    check("/api/media/42?v=3&" + url.partition("?")[2])


def test_a_plain_mapping_is_accepted() -> None:
    expires, sig = (p.split("=", 1)[1] for p in sign("/m/x", KEY, expires_at=EXPIRES).split("&"))
    verify("/m/x", {"expires": expires, "sig": sig}, [KEY], now=NOW, client_ip=None)


# --- expiry ----------------------------------------------------------------------------


def test_valid_until_the_second_of_expiry() -> None:
    url = url_for("/m/x", expires_at=EXPIRES)
    check(url, now=EXPIRES - 0.001)
    assert reason(url, now=EXPIRES) == "expired"
    assert reason(url, now=EXPIRES + 86_400) == "expired"


def test_expired_is_only_said_of_a_genuine_url() -> None:
    url = url_for("/m/x", key=OTHER_KEY, expires_at=EXPIRES)
    assert reason(url, now=EXPIRES + 1) == "bad_signature"


def test_the_expiry_cannot_be_extended() -> None:
    url = url_for("/m/x", expires_at=EXPIRES)
    assert reason(url.replace(str(EXPIRES), str(EXPIRES + 3600))) == "bad_signature"


def test_an_expiry_too_far_ahead_is_malformed() -> None:
    limit = int(NOW) + MAX_TTL_S + CLOCK_SKEW_S
    check(url_for("/m/x", expires_at=limit))
    assert reason(url_for("/m/x", expires_at=limit + 1)) == "malformed_signature"
    # JavaScript's Date.now() in milliseconds instead of seconds, genuinely signed
    assert reason(raw_url("/m/x", int(NOW * 1000) + 300)) == "malformed_signature"


# --- forgery ---------------------------------------------------------------------------


def _with_sig(url: str, mac: bytes) -> str:
    sig = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    return re.sub(r"sig=[^&]*", f"sig={sig}", url)


def _mac_of(url: str) -> bytes:
    sig = split(url)[1]["sig"]
    return base64.urlsafe_b64decode(sig + "=")


@pytest.mark.parametrize("bit", range(0, 256, 7))
def test_a_flipped_bit_is_a_bad_signature(bit: int) -> None:
    url = url_for("/api/media/42")
    mac = bytearray(_mac_of(url))
    mac[bit // 8] ^= 1 << (bit % 8)
    assert reason(_with_sig(url, bytes(mac))) == "bad_signature"


def test_a_signature_by_an_unknown_key_is_bad() -> None:
    assert reason(url_for("/m/x", key=OTHER_KEY)) == "bad_signature"


def test_no_keys_verify_nothing() -> None:
    assert reason(url_for("/m/x"), keys=()) == "bad_signature"


@pytest.mark.parametrize(
    ("signed", "requested"),
    [
        ("/api/media/42", "/api/media/42/thumbnail"),
        ("/api/media/42/thumbnail", "/api/media/42"),
        ("/api/media/42", "/api/media/4"),
        ("/api/media/4", "/api/media/42"),
        ("/api/media/42", "/api/media/42/"),
        ("/api/media/42", "/api/media/43"),
        ("/api/media/42", "/api/media//42"),
        ("/api/media/42", "/api/media/./42"),
        ("/api/media/42", "/api/media/%34%32"),  # same decoded path, other bytes
        ("/api/media/%34%32", "/api/media/42"),
        ("/media/a%2Fb", "/media/a/b"),
        ("/media/a%2Fb", "/media/a%2fb"),
        ("/media/caf%C3%A9.jpg", "/media/café.jpg"),
        ("/media/caf%C3%A9.jpg", "/media/caf%c3%a9.jpg"),
        ("/media/x", "/other/x"),
        ("/media/x", "/media/x\n"),
        ("/media/x", "/media/x\udcff"),  # undecodable request bytes
    ],
)
def test_a_signature_does_not_open_another_path(signed: str, requested: str) -> None:
    assert reason(url_for(signed), path=requested) == "bad_signature"


# --- client address --------------------------------------------------------------------


def test_bind_ip_accepts_the_signed_address_only() -> None:
    url = url_for("/m/x", client_ip="203.0.113.7")
    assert url == raw_url("/m/x", EXPIRES, ip="203.0.113.7")
    check(url, client_ip="203.0.113.7")
    assert reason(url, client_ip="203.0.113.8") == "bad_signature"
    assert reason(url, client_ip="2001:db8::1") == "bad_signature"
    assert reason(url, client_ip="not-an-ip") == "bad_signature"
    assert reason(url, client_ip="") == "bad_signature"
    assert reason(url) == "bad_signature"  # a route without bind_ip


def test_an_unbound_signature_fails_on_a_bind_ip_route() -> None:
    assert reason(url_for("/m/x"), client_ip="203.0.113.7") == "bad_signature"


@pytest.mark.parametrize(
    ("signed_ip", "seen_ip"),
    [
        ("203.0.113.7", "::ffff:203.0.113.7"),  # a dual-stack listener's view of IPv4
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("203.0.113.7", "::FFFF:CB00:7107"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8::1", "2001:0db8:0000::0001"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_bind_ip_compares_canonical_addresses(signed_ip: str, seen_ip: str) -> None:
    check(url_for("/m/x", client_ip=signed_ip), client_ip=seen_ip)


# --- keys and rotation -----------------------------------------------------------------


def test_rotation_old_key_verifies_while_listed() -> None:
    old_url, new_url = url_for("/m/x", key=OLD_KEY), url_for("/m/x", key=KEY)
    for keys in [(KEY, OLD_KEY), (OLD_KEY, KEY)]:
        check(old_url, keys)
        check(new_url, keys)
    assert reason(old_url, keys=(KEY,)) == "bad_signature"
    check(new_url, (KEY,))


def test_every_key_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken must not tell which key matched."""
    calls: list[bool] = []
    real = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        calls.append(real(a, b))
        return calls[-1]

    monkeypatch.setattr(proxy.signing.hmac, "compare_digest", compare_digest)
    check(url_for("/m/x", key=KEY), (KEY, OLD_KEY, OTHER_KEY))
    assert calls == [True, False, False]


def test_load_keys_returns_one_key_per_name_in_order() -> None:
    env = {"NEW": KEY.decode(), "OLD": OLD_KEY.decode(), "UNUSED": "x"}
    assert load_keys(["NEW", "OLD", "NEW"], env) == [KEY, OLD_KEY, KEY]
    assert load_keys([], env) == []


def test_a_key_is_its_text_as_utf8_bytes() -> None:
    text = "clé-partagée-" + "0123456789abcdef" + "ü"
    assert load_keys(["K"], {"K": text}) == [text.encode("utf-8")]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "environment variable is not set"),
        ("", "environment variable is empty; generate one with: openssl rand -base64 32"),
        (
            "s3cr3t-but-short",
            "must be at least 32 bytes; generate one with: openssl rand -base64 32",
        ),
        ("x" * 31, "must be at least 32 bytes; generate one with: openssl rand -base64 32"),
        ("é" * 15 + "x", "must be at least 32 bytes; generate one with: openssl rand -base64 32"),
        (KEY.decode() + "\n", "must not start or end with whitespace"),
        (" " + KEY.decode(), "must not start or end with whitespace"),
        (KEY.decode() + "\udcff", "must be UTF-8 text"),
    ],
)
def test_a_bad_key_is_refused_by_name_never_by_value(value: str | None, problem: str) -> None:
    env = {} if value is None else {"MEDIA_URL_KEY": value}
    with pytest.raises(ConfigError) as info:
        load_keys(["MEDIA_URL_KEY"], env)
    assert info.value.problems == [("MEDIA_URL_KEY", problem)]
    assert info.value.lines() == [f"environment: MEDIA_URL_KEY: {problem}"]
    if value:
        assert value.strip() not in str(info.value)


def test_load_keys_reports_every_bad_variable() -> None:
    env = {"A": "short", "B": KEY.decode()}
    with pytest.raises(ConfigError) as info:
        load_keys(["A", "B", "C"], env)
    assert [path for path, _ in info.value.problems] == ["A", "C"]


def test_an_exactly_32_byte_key_is_enough() -> None:
    assert load_keys(["K"], {"K": "k" * 32}) == [b"k" * 32]


# --- malformed queries -----------------------------------------------------------------

SIG = split(url_for("/m/x"))[1]["sig"]
E = str(EXPIRES)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], "missing_signature"),
        ([("expires", E)], "missing_signature"),
        ([("sig", SIG)], "missing_signature"),
        ([("Expires", E), ("Sig", SIG)], "missing_signature"),  # names are case-sensitive
        ([("expires", E), ("sig", SIG), ("sig", SIG)], "malformed_signature"),
        ([("expires", E), ("expires", E), ("sig", SIG)], "malformed_signature"),
        ([("expires", E), ("expires", str(EXPIRES + 60)), ("sig", SIG)], "malformed_signature"),
        *(
            ([("expires", bad), ("sig", SIG)], "malformed_signature")
            for bad in [
                "",
                "abc",
                "-1",
                "+" + E,
                " " + E,
                E + " ",
                E + ".0",
                "0" + E,
                "0",
                "1_767_225_900",
                "1.7e9",
                "١٧٦٧٢٢٥٩٠٠",  # Arabic-Indic digits: int() would take them
                "9" * 12,
                "9" * 5000,
            ]
        ),
        *(
            ([("expires", E), ("sig", bad)], "malformed_signature")
            for bad in [
                "",
                SIG[:-1],
                SIG + "A",
                SIG + "=",
                SIG[:-1] + "B",  # a non-canonical last character (unused bits set)
                "+" + SIG[1:],  # standard base64, not base64url
                "/" + SIG[1:],
                "!" + SIG[1:],
                "é" + SIG[1:],
                "A" * 43 + " ",
            ]
        ),
    ],
)
def test_malformed_queries(pairs: list[tuple[str, str]], expected: str) -> None:
    with pytest.raises(Forbidden) as info:
        verify("/m/x", MultiDictProxy(MultiDict(pairs)), [KEY], now=NOW, client_ip=None)
    assert info.value.reason == expected


def test_the_sig_fixture_has_a_canonical_last_character() -> None:
    # keeps the "non-canonical last character" case above meaningful
    assert SIG[-1] != "B" and SIG[-1] in "AEIMQUYcgkosw048"


# --- signing-side checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["", "api/media/42", "/media/café.jpg", "/media/a b", "/m/x?y=1", "/m/x#f", "/m/%zz", "/m/\n"],
)
def test_sign_refuses_a_path_not_in_its_sent_form(path: str) -> None:
    with pytest.raises(ValueError, match="path must be the request path as sent"):
        sign(path, KEY, expires_at=EXPIRES)


def test_sign_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="key must be at least 32 bytes"):
        sign("/m/x", b"k" * 31, expires_at=EXPIRES)
    for expires_at in [0, -1, True, 10**12]:
        with pytest.raises(ValueError, match="expires_at must be unix seconds"):
            sign("/m/x", KEY, expires_at=expires_at)
    with pytest.raises(ValueError, match="expires_at must be unix seconds"):
        sign("/m/x", KEY, expires_at=1.5e9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="client_ip must be an IP address"):
        sign("/m/x", KEY, expires_at=EXPIRES, client_ip="localhost")
    for ttl in [0, 0.5, -5, MAX_TTL_S + 1, float("nan"), float("inf"), True]:
        with pytest.raises(ValueError, match="expires_in_s must be between"):
            signed_url("/m/x", KEY, expires_in_s=ttl, now=NOW)


# --- the documentation -----------------------------------------------------------------


def snippet(language: str) -> str:
    """The code block marked `<!-- snippet: language -->` in the doc."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- snippet: {language} -->\n```\w+\n(.*?)\n```", text, re.S)
    assert found, f"no snippet for {language} in {DOC.name}"
    return found[1]


def test_the_doc_test_vectors_match() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| `(\d+)` \| (?:`([^`]*)`)? *\| `([^`]+)` \|$",
                      text, re.M)  # fmt: skip
    assert len(rows) == 3
    for key, path, expires, ip, sig in rows:
        query = sign(path, key.encode(), expires_at=int(expires), client_ip=ip or None)
        assert query == f"expires={expires}&sig={sig}"
    # the example URL at the top is the first row
    assert f"/api/media/42?expires={rows[0][2]}&sig={rows[0][4]}" in text


# (path, key text, ttl, client ip): percent-encoding, a non-ASCII key, IPv4 and IPv6
CASES = [
    ("/api/media/42", KEY.decode(), 300, None),
    ("/api/media/42/thumbnail", KEY.decode(), 3600, "203.0.113.7"),
    ("/media/photos/caf%C3%A9.jpg", "clé-partagée-0123456789abcdef-xyz", 60, None),
    ("/media/a%2Fb", KEY.decode(), 60, "::ffff:203.0.113.7"),
    ("/media/x", KEY.decode(), 60, "2001:DB8:0:0:0:0:0:1"),
]
IPS = [
    "203.0.113.7",
    "::ffff:203.0.113.7",
    "::FFFF:CB00:7107",
    "2001:DB8:0:0:0:0:0:1",
    "2001:db8:0:1:0:0:0:1",
    "2001:0:0:1:0:0:0:1",
    "2001:db8:0:0:1:0:0:1",  # two runs of equal length: the first becomes ::
    "1:0:1:1:1:1:1:1",  # a single zero group is not compressed
    "::",
    "::1",
    "::1.2.3.4",
    "fe80::1%eth0",
]
SNIPPET_NOW = NOW + 0.75


def _check_snippet_urls(urls: list[str]) -> None:
    assert len(urls) == len(CASES)
    for url, (path, key, ttl, ip) in zip(urls, CASES, strict=True):
        want = sign(path, key.encode(), expires_at=int(NOW) + ttl, client_ip=ip)
        assert url == f"{path}?{want}"
        check(url, (OLD_KEY, key.encode()), client_ip=ip)
        assert reason(url, (OLD_KEY,), client_ip=ip) == "bad_signature"
        assert reason(url, (key.encode(),), now=NOW + ttl, client_ip=ip) == "expired"


def test_the_python_snippet_signs_what_verify_accepts() -> None:
    namespace: dict[str, Any] = {}
    exec(snippet("python"), namespace)
    namespace["time"] = SimpleNamespace(time=lambda: SNIPPET_NOW)
    urls = [namespace["signed_url"](p, k, ttl_s=t, client_ip=ip) for p, k, t, ip in CASES]
    _check_snippet_urls(urls)
    assert [namespace["canonical_ip"](ip) for ip in IPS] == [canonical_ip(ip) for ip in IPS]


def test_the_javascript_snippet_signs_what_verify_accepts(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 16) is required to test the JavaScript snippet")
    driver = f"""
Date.now = () => {SNIPPET_NOW * 1000};
const input = JSON.parse(process.argv[2]);
console.log(JSON.stringify({{
  urls: input.cases.map(([path, key, ttl, ip]) => signedUrl(path, key, ttl, ip)),
  ips: input.ips.map(canonicalIp),
}}));
"""
    script = tmp_path / "snippet.mjs"
    script.write_text(snippet("javascript") + "\n" + driver, encoding="utf-8")
    argument = json.dumps({"cases": CASES, "ips": IPS})
    done = subprocess.run(
        [node, str(script), argument], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out: Mapping[str, list[str]] = json.loads(done.stdout)
    _check_snippet_urls(out["urls"])
    assert out["ips"] == [canonical_ip(ip) for ip in IPS]
