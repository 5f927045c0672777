"""HMAC-signed media URLs: sign, verify, load keys (the format is in docs/signed-urls.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Mapping, Sequence
from typing import Final

from proxy.errors import ConfigError, Forbidden

VERSION: Final = "v1"
EXPIRES_PARAM: Final = "expires"
SIG_PARAM: Final = "sig"
MIN_KEY_BYTES: Final = 32
# As S3 presigned URLs: a leaked URL dies within a week, and an expiry in milliseconds
# (JavaScript's Date.now()) is refused instead of living for 50,000 years.
MAX_TTL_S: Final = 7 * 24 * 3600
CLOCK_SKEW_S: Final = 300  # how far the backend's clock may run ahead of ours

MISSING: Final = "missing_signature"
MALFORMED: Final = "malformed_signature"
EXPIRED: Final = "expired"
BAD: Final = "bad_signature"

# ASCII digits only (int() would take "+1", " 1", "1_0" and other scripts' digits), no
# leading zero, so each expiry has one spelling; 11 digits last until the year 5138.
_EXPIRES: Final = re.compile(r"[1-9][0-9]{0,10}")
# 32 bytes are 43 base64url characters; the last one carries 2 unused bits that must be 0,
# so each MAC has one spelling too.
_SIG: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
# RFC 3986 §3.3 path characters: what a browser sends unchanged.
_PATH: Final = re.compile(r"/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
_KEY_HINT: Final = "generate one with: openssl rand -base64 32"


def sign(path: str, key: bytes, *, expires_at: int, client_ip: str | None = None) -> str:
    """Return the query string (`expires=...&sig=...`) granting `path` until `expires_at`."""
    if not _PATH.fullmatch(path):
        raise ValueError(
            f"path must be the request path as sent: starting with '/', percent-encoded,"
            f" without query or fragment, got {path!r}"
        )
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key must be at least {MIN_KEY_BYTES} bytes")
    if type(expires_at) is not int or not _EXPIRES.fullmatch(str(expires_at)):
        raise ValueError(f"expires_at must be unix seconds, got {expires_at!r}")
    ip = "" if client_ip is None else canonical_ip(client_ip)
    if ip is None:
        raise ValueError(f"client_ip must be an IP address, got {client_ip!r}")
    mac = _mac(key, _message(path, str(expires_at), ip))
    return f"{EXPIRES_PARAM}={expires_at}&{SIG_PARAM}={_b64(mac)}"


def signed_url(
    path: str,
    key: bytes,
    *,
    expires_in_s: float,
    now: float | None = None,
    client_ip: str | None = None,
) -> str:
    """Return `path` with the query that grants it for `expires_in_s` seconds from `now`."""
    if isinstance(expires_in_s, bool) or not 1 <= expires_in_s <= MAX_TTL_S:  # NaN fails too
        raise ValueError(f"expires_in_s must be between 1 and {MAX_TTL_S}, got {expires_in_s!r}")
    start = time.time() if now is None else now
    expires_at = int(start + expires_in_s)
    return f"{path}?{sign(path, key, expires_at=expires_at, client_ip=client_ip)}"


def verify(
    path: str,
    query: Mapping[str, str],
    keys: Sequence[bytes],
    *,
    now: float,
    client_ip: str | None,
) -> None:
    """Return if `query` signs `path` (and `client_ip`) with one of `keys`; raise Forbidden.

    `path` is the raw request path without the query; `query` should be the request's
    multidict (aiohttp `request.query`) so that a repeated parameter is seen; `client_ip`
    is None unless the route binds the signature to the client address.
    """
    expires, sig = _single(query, EXPIRES_PARAM), _single(query, SIG_PARAM)
    if expires is None or sig is None:
        raise Forbidden(MISSING)
    if not _EXPIRES.fullmatch(expires) or not _SIG.fullmatch(sig):
        raise Forbidden(MALFORMED)
    if int(expires) > now + MAX_TTL_S + CLOCK_SKEW_S:
        raise Forbidden(MALFORMED)
    ip = "" if client_ip is None else canonical_ip(client_ip)
    if ip is None or "\n" in path:
        raise Forbidden(BAD)  # could not have been signed
    try:
        message = _message(path, expires, ip)
    except UnicodeEncodeError:  # a lone surrogate from undecodable request bytes
        raise Forbidden(BAD) from None
    given = base64.urlsafe_b64decode(sig + "=")
    # Every key is tried and compared in constant time, and `|` does not short-circuit,
    # so the time taken does not tell which key matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(_mac(key, message), given)
    if not matched:
        raise Forbidden(BAD)
    # Checked after the MAC, so "expired" is only ever said of a genuine URL.
    if now >= int(expires):
        raise Forbidden(EXPIRED)


def load_keys(env_names: Sequence[str], environ: Mapping[str, str]) -> list[bytes]:
    """Return one key per variable name, in order; raise ConfigError naming each bad one."""
    keys: list[bytes] = []
    problems: list[tuple[str, str]] = []
    for name in env_names:
        value = environ.get(name)
        if value is None:
            problems.append((name, "environment variable is not set"))
        elif reason := _key_problem(value):
            problems.append((name, reason))
        else:
            keys.append(value.encode("utf-8"))
    if problems:
        raise ConfigError("environment", problems)
    return keys


def canonical_ip(ip: str) -> str | None:
    """Return the form the signature covers (RFC 5952, IPv4-mapped as IPv4), None if not an IP."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])  # a zone id is local to a host
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the backend sees a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _key_problem(value: str) -> str:
    """Describe what is wrong with a key variable's value, without showing it; '' if fine."""
    if value == "":
        return f"environment variable is empty; {_KEY_HINT}"
    if value != value.strip():
        # A secret file with a trailing newline would sign differently from the backend.
        return "must not start or end with whitespace"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be UTF-8 text"
    if size < MIN_KEY_BYTES:
        return f"must be at least {MIN_KEY_BYTES} bytes; {_KEY_HINT}"
    return ""


def _single(query: Mapping[str, str], name: str) -> str | None:
    """Return the one value of `name`, None if absent; a repeated one is malformed."""
    getall = getattr(query, "getall", None)
    values: list[str] = (
        list(getall(name, ())) if callable(getall) else [query[name]] if name in query else []
    )
    if len(values) > 1:
        # Proxies and frameworks disagree on which of two values wins; refuse both.
        raise Forbidden(MALFORMED)
    return values[0] if values else None


def _message(path: str, expires: str, ip: str) -> bytes:
    # Neither field can hold "\n" (paths are checked, expiry is digits, the IP canonical),
    # so the join is unambiguous; `ip` is "" when the signature is not bound to one.
    return "\n".join((VERSION, path, expires, ip)).encode("utf-8")


def _mac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64(mac: bytes) -> str:
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
