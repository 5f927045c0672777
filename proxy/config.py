"""The frozen configuration tree and its loader: every problem reported, path first."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.errors import ConfigError

_DURATION: Final = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE: Final = re.compile(r"\s*(-?\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)\s*")
_SIZE_UNITS: Final = {
    **{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30},
    **{"KB": 10**3, "MB": 10**6, "GB": 10**9},
}
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token

# Field rules, read by the walker from dataclass metadata.
_PORT: Final = {"min": 0, "max": 65535}  # 0 = any free port (README; tests and benchmarks)
_STORAGE_KEYS: Final = {
    "keys": (re.compile(r"[A-Za-z0-9_-]+"), "storage names use letters, digits, '-' and '_'"),
    "nonempty": "at least one storage is required",
}
_UPSTREAM_KEYS: Final = {
    "keys": (re.compile(r"[A-Za-z0-9_-]+"), "upstream names use letters, digits, '-' and '_'")
}
_BY_TYPE_KEYS: Final = {"keys": (re.compile(r".+", re.S), "expected a Content-Type prefix")}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """The media listener."""

    host: str = "0.0.0.0"
    port: int = field(default=8080, metadata=_PORT)
    # uvloop by default: both loops are zero-copy, uvloop is cheaper per request (README
    # "Event loop and sendfile")
    event_loop: str = field(default="uvloop", metadata={"choices": ("asyncio", "uvloop")})
    # jemalloc where installed: memory freed after a burst goes back to the OS (allocator.py)
    allocator: str = field(default="auto", metadata={"choices": ("auto", "jemalloc", "system")})
    keepalive_timeout: float = 75.0
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The admin listener (health, stats)."""

    host: str = "127.0.0.1"
    port: int = field(default=9901, metadata=_PORT)
    token_env: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """Admission and read-size limits."""

    max_streams: int = field(default=1024, metadata={"min": 1})
    max_streams_per_client: int = field(default=0, metadata={"min": 0})
    chunk_size: int = field(
        default=64 << 10, metadata={"size": True, "min": 4 << 10, "max": 16 << 20}
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutOverride:
    """Per-Content-Type overrides; None falls back to the top-level value."""

    idle: float | None = None
    upstream_first_byte: float | None = None
    max_duration: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EffectiveTimeouts:
    """The timeouts that apply to one response, in seconds (0 = unlimited)."""

    idle: float
    upstream_first_byte: float
    max_duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    """Stream timeouts in seconds, with overrides by Content-Type prefix."""

    idle: float = 30.0
    upstream_first_byte: float = 10.0
    max_duration: float = 0.0
    by_type: Mapping[str, TimeoutOverride] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata=_BY_TYPE_KEYS
    )

    def for_content_type(self, content_type: str | None) -> EffectiveTimeouts:
        """Apply the longest `by_type` prefix the content type starts with (case-insensitive)."""
        ctype = (content_type or "").lower()
        matches = [p for p in self.by_type if ctype.startswith(p.lower())]
        o = self.by_type[max(matches, key=len)] if matches else TimeoutOverride()
        return EffectiveTimeouts(
            idle=self.idle if o.idle is None else o.idle,
            upstream_first_byte=(
                self.upstream_first_byte if o.upstream_first_byte is None else o.upstream_first_byte
            ),
            max_duration=self.max_duration if o.max_duration is None else o.max_duration,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskStorageConfig:
    """Files below `root` (absolute, resolved against the working directory at load)."""

    name: str = field(metadata={"internal": True})
    root: Path
    type: str = "disk"


@dataclass(frozen=True, slots=True, kw_only=True)
class S3StorageConfig:
    """Objects of one bucket below `prefix`; credentials named by the `*_env` keys."""

    name: str = field(metadata={"internal": True})
    bucket: str
    type: str = "s3"
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: str = field(default="auto", metadata={"choices": ("auto", "path", "virtual")})
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    session_token_env: str | None = None
    connect_timeout: float = field(default=3.0, metadata={"positive": True})
    read_timeout: float = field(default=15.0, metadata={"positive": True})
    max_attempts: int = field(default=3, metadata={"min": 1})


StorageConfig = DiskStorageConfig | S3StorageConfig  # chosen by the required `type` key


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """The existing backend that `upstream` routes forward to (SPEC §8)."""

    name: str = field(metadata={"internal": True})
    url: str  # http://host:port of the backend; the request's path and query are appended
    connect_timeout: float = field(default=2.0, metadata={"positive": True})
    response_timeout: float = field(default=30.0, metadata={"positive": True})  # to headers
    max_connections: int = field(default=64, metadata={"min": 1})  # keep-alive pool bound
    max_body_size: int = field(default=10 << 20, metadata={"size": True})


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    """The PostgreSQL database lookup routes query (one pool for the process)."""

    dsn: str | None = None  # libpq DSN or URL without a password; prefer dsn_env
    dsn_env: str | None = None
    pool_min: int = field(default=1, metadata={"min": 0})
    pool_max: int = field(default=10, metadata={"min": 1})
    acquire_timeout: float = field(default=1.0, metadata={"positive": True})
    statement_timeout: float = field(default=0.5, metadata={"positive": True})
    connect_timeout: float = field(default=2.0, metadata={"positive": True})
    leak_threshold: float = field(default=30.0, metadata={"positive": True})


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupConfig:
    """Resolve `/<prefix>/<id>[/<variant>]` with a parameterised SQL query."""

    query: str  # uses %(id)s and optionally %(variant)s; returns storage, key, ...
    serve_statuses: tuple[str, ...] = ("ready",)
    cache_ttl: float = 30.0  # 0 = no cache: one query per request
    negative_ttl: float = 2.0  # unknown ids are remembered this long
    cache_max_entries: int = field(default=10_000, metadata={"min": 0})
    stale_if_error: float = 60.0  # serve an expired row this long while the database fails


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessConfig:
    """Who may read a route: everyone, signed URLs, or an identity set by a trusted hop."""

    mode: str = field(
        default="public", metadata={"choices": ("public", "signed", "trusted_header")}
    )
    keys_env: tuple[str, ...] = ()  # signed: variables holding keys, the first signs
    bind_ip: bool = False  # signed: the signature covers the client address
    header: str = "X-User-Id"  # trusted_header: the identity header
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # CIDRs of trusted hops
    allow_query: str | None = None  # trusted_header: SQL with %(user)s, %(id)s: a row = allowed


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """Requests under `prefix` are keys of `storage`, or ids resolved by `lookup`."""

    prefix: str
    storage: str | None = None
    lookup: LookupConfig | None = None
    upstream: str | None = None  # forward to this backend (X-Accel-Redirect honoured)
    internal: bool = False  # 404 to clients; reachable through X-Accel-Redirect only
    access: AccessConfig = field(default_factory=AccessConfig)
    cache_control: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    """Log level, line format and the access log switch."""

    level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error")})
    format: str = field(default="json", metadata={"choices": ("json", "text")})
    access_log: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated file; `source` names it in messages."""

    source: str = field(metadata={"internal": True})
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    storages: Mapping[str, StorageConfig] = field(metadata=_STORAGE_KEYS)
    upstreams: Mapping[str, UpstreamConfig] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata=_UPSTREAM_KEYS
    )
    routes: tuple[RouteConfig, ...] = field(metadata={"nonempty": "at least one route is required"})
    database: DatabaseConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def parse_duration(value: object) -> float:
    """Return seconds from a number or a string like `250ms`, `1.5s`, `5m`, `1h`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2]]
    else:
        raise ValueError(f"expected a duration like 250ms, 30s, 5m or 1h, got {_show(value)}")
    if not 0 <= seconds < float("inf"):  # also rejects NaN
        raise ValueError(f"expected a duration >= 0, got {_show(value)}")
    return seconds


def parse_size(value: object) -> int:
    """Return bytes from an integer or a string like `512B`, `64KiB`, `8MiB`, `1GB`."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        size = int(m[1]) * _SIZE_UNITS[m[2]]
    else:
        raise ValueError(f"expected a size like 64KiB or 8MiB, got {_show(value)}")
    if size < 0:
        raise ValueError(f"expected a size >= 0, got {_show(value)}")
    return size


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; raise ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, [("", "cannot read file: not UTF-8 text")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top level)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(where, f"invalid YAML: {problem}")]) from None
    return parse_config(data, source)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate a YAML-shaped mapping; raise ConfigError listing every problem in order."""
    if data is None:
        raise ConfigError(source, [("(top level)", "expected a mapping, the file is empty")])
    declared = data.get("storages") if isinstance(data, dict) else None
    problems = _Problems(sorted(map(str, declared)) if isinstance(declared, dict) else [])
    upstreams = data.get("upstreams") if isinstance(data, dict) else None
    problems.upstreams = sorted(map(str, upstreams)) if isinstance(upstreams, dict) else []
    cfg = _build(Config, data, "", problems, {"source": source})
    if problems or not isinstance(cfg, Config):
        raise ConfigError(source, problems)
    return cfg


class _Problems(list[tuple[str, str]]):
    """(path, reason) pairs in document order, and what checks across mappings need."""

    def __init__(self, storages: list[str]) -> None:
        super().__init__()
        self.storages = storages  # every name under `storages:`, valid or not
        self.prefixes: list[tuple[str, str]] = []  # (route path, prefix) seen so far
        self.needs_database: list[str] = []  # paths of route parts that query the database
        self.upstreams: list[str] = []  # every name under `upstreams:`

    def add(self, path: str, reason: str) -> None:
        """Record one problem."""
        self.append((path, reason))


_INVALID: Final[Any] = object()


def _build(
    cls: Any,
    data: object,
    path: str,
    problems: _Problems,
    internal: Mapping[str, Any] | None = None,
) -> Any:
    """Build dataclass `cls` (or the member of a union its `type` key picks) from a mapping."""
    if not isinstance(data, dict):
        problems.add(path or "(top level)", f"expected a mapping, got {_show(data)}")
        return _INVALID
    if isinstance(cls, types.UnionType):
        kinds = {str(_fields(m)["type"][0].default): m for m in typing.get_args(cls)}
        kind = data.get("type")
        if (cls := kinds.get(kind) if isinstance(kind, str) else None) is None:
            reason = f"expected one of {', '.join(kinds)}, got {_show(kind)}"
            problems.add(_join(path, "type"), reason if "type" in data else "required key missing")
            return _INVALID
    fields = _fields(cls)
    values = {k: v for k, v in (internal or {}).items() if k in fields}
    for key, raw in data.items():
        f, hint = fields.get(key, (None, None)) if isinstance(key, str) else (None, None)
        if f is None or f.metadata.get("internal"):
            known = [n for n, (g, _) in fields.items() if not g.metadata.get("internal")]
            close = difflib.get_close_matches(str(key), known, n=1)
            did_you_mean = f" (did you mean '{close[0]}'?)" if close else ""
            problems.add(_join(path, key), f"unknown key{did_you_mean}")
        elif (value := _convert(hint, f, raw, _join(path, key), problems)) is not _INVALID:
            values[key] = value
    required = [n for n, (f, _) in fields.items() if _is_required(f)]
    if check := _CHECKS.get(cls):
        check(values, data, path, problems)
    for name in required:
        if name not in data:
            problems.add(_join(path, name), "required key missing")
    return cls(**values) if all(n in values for n in required) else _INVALID


def _convert(
    hint: Any, f: dataclasses.Field[Any], raw: object, path: str, problems: _Problems
) -> Any:
    """Convert one YAML value to the field's type, then apply the field's metadata rules."""
    if type(None) in typing.get_args(hint):
        if raw is None:
            return None
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    meta, origin, args = f.metadata, typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint) or isinstance(hint, types.UnionType):
        return _build(hint, raw, path, problems)
    if origin is tuple or origin is Mapping:
        if not isinstance(raw, list if origin is tuple else dict):
            problems.add(path, f"expected {_show([] if origin is tuple else {})}, got {_show(raw)}")
            return _INVALID
        if not raw and "nonempty" in meta:
            problems.add(path, meta["nonempty"])
        if isinstance(raw, list) and not dataclasses.is_dataclass(args[0]):  # scalars
            return _scalar_tuple(args[0], f, raw, path, problems)
        if isinstance(raw, list):
            return tuple(_build(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(raw))
        pattern, rule = meta["keys"]
        built = {}
        for key, body in raw.items():
            if not isinstance(key, str) or not pattern.fullmatch(key):
                problems.add(_join(path, key), f"{rule}, got {_show(key)}")
            built[key] = _build(args[1], body, _join(path, key), problems, {"name": key})
        return types.MappingProxyType(built)
    try:
        value = _parse_scalar(hint, f.name, meta, raw)
    except ValueError as exc:
        problems.add(path, str(exc))
        return _INVALID
    return value


def _scalar_tuple(
    hint: Any, f: dataclasses.Field[Any], raw: list[Any], path: str, problems: _Problems
) -> Any:
    """A list of scalars (e.g. `keys_env`): each item parsed like a single value."""
    items = []
    for i, item in enumerate(raw):
        try:
            items.append(_parse_scalar(hint, f.name, f.metadata, item))
        except ValueError as exc:
            problems.add(f"{path}[{i}]", str(exc))
    return tuple(items) if len(items) == len(raw) else _INVALID


def _parse_scalar(hint: Any, name: str, meta: Mapping[str, Any], raw: object) -> Any:
    """Parse a leaf value by its type (float = duration) and check choices and bounds."""
    if hint is float:
        value: Any = parse_duration(raw)
    elif meta.get("size"):
        value = parse_size(raw)
    else:
        accepts, expected = _SCALARS["_env" if name.endswith("_env") else hint]
        if not accepts(raw):
            raise ValueError(f"expected {expected}, got {_show(raw)}")
        value = Path(typing.cast(str, raw)).absolute() if hint is Path else raw
    show = _show_size if meta.get("size") else str
    lo, hi = meta.get("min"), meta.get("max")
    if "choices" in meta and value not in meta["choices"]:
        reason = f"expected one of {', '.join(meta['choices'])}"
    elif lo is not None and hi is not None and not lo <= value <= hi:
        reason = f"must be between {show(lo)} and {show(hi)}"
    elif lo is not None and value < lo:
        reason = f"must be at least {show(lo)}"
    elif meta.get("positive") and value <= 0:
        reason = "must be greater than 0"
    else:
        return value
    raise ValueError(f"{reason}, got {_show(raw)}")


_SCALARS: Final[dict[Any, tuple[Callable[[object], bool], str]]] = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    Path: (lambda v: isinstance(v, str) and v != "", "a path"),
    # `*_env` keys only name a variable: it is read when a storage starts, never here
    "_env": (
        lambda v: isinstance(v, str) and bool(_ENV_NAME.fullmatch(v)),
        "an environment variable name",
    ),
}


def _check_s3(v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems) -> None:
    """Check an S3 storage: bucket, prefix shape, endpoint scheme, credential names."""
    if v.get("bucket") == "":
        problems.add(_join(path, "bucket"), "must not be empty")
    prefix = v.get("prefix", "")
    if prefix.startswith("/"):
        problems.add(_join(path, "prefix"), f"must not start with '/', got {prefix!r}")
    elif prefix and not prefix.endswith("/"):
        problems.add(_join(path, "prefix"), f"must end with '/', e.g. 'uploads/', got {prefix!r}")
    url = v.get("endpoint_url")
    if url is not None and not url.startswith(("http://", "https://")):
        problems.add(
            _join(path, "endpoint_url"), f"must start with http:// or https://, got {url!r}"
        )
    pair = ("access_key_id_env", "secret_access_key_env")
    for have, lack in (pair, pair[::-1]):
        if data.get(have) is not None and data.get(lack) is None:
            problems.add(_join(path, lack), f"required when {have} is set (both or neither)")
    if data.get("session_token_env") is not None and all(data.get(k) is None for k in pair):
        problems.add(_join(path, "session_token_env"), f"requires {pair[0]} and {pair[1]}")


def _check_route(v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems) -> None:
    """Check a route: prefix shape, prefixes taken before it (first match wins), storage."""
    prefix, reason = v.get("prefix"), ""
    if prefix is not None and not (prefix.startswith("/") and prefix.endswith("/")):
        reason = f"must start and end with '/', e.g. '/media/', got {prefix!r}"
    elif prefix is not None:
        for where, taken in problems.prefixes:
            if prefix == taken:
                reason = f"duplicate prefix {prefix!r} (first in {where})"
            elif prefix.startswith(taken) and not reason:
                reason = f"never matched: {where} prefix {taken!r} comes first"
        problems.prefixes.append((path, prefix))
    if reason:
        problems.add(_join(path, "prefix"), reason)
    storage = v.get("storage")
    if storage is not None and storage not in problems.storages:
        defined = ", ".join(problems.storages) or "none"
        problems.add(_join(path, "storage"), f"unknown storage {storage!r} (defined: {defined})")
    given = [k for k in ("storage", "lookup", "upstream") if data.get(k) is not None]
    if len(given) != 1:
        reason = (
            "exactly one of storage, lookup, upstream is required"
            if not given
            else f"{' and '.join(given)} exclude each other"
        )
        problems.add(_join(path, "storage"), reason)
    upstream = v.get("upstream")
    if upstream is not None and upstream not in problems.upstreams:
        defined = ", ".join(problems.upstreams) or "none"
        problems.add(_join(path, "upstream"), f"unknown upstream {upstream!r} (defined: {defined})")
    if v.get("internal") and upstream is not None:
        problems.add(_join(path, "internal"), "an upstream route cannot be internal")

    if data.get("lookup") is not None:
        problems.needs_database.append(_join(path, "lookup"))
    access = v.get("access")
    if isinstance(access, AccessConfig) and access.allow_query is not None:
        problems.needs_database.append(_join(path, "access.allow_query"))


_PLACEHOLDER: Final = re.compile(r"%(?:\((\w+)\)s|%)|%")


def _check_query(query: str, allowed: tuple[str, ...], required: str) -> str | None:
    """Problems with a route's SQL: placeholders other than `allowed`, or no `required`."""
    names = set()
    for m in _PLACEHOLDER.finditer(query):
        if m[0] == "%":
            return "a lone '%' (write '%%' for a literal percent sign)"
        if m[1] is not None:
            names.add(m[1])
    if unknown := sorted(names - set(allowed)):
        shown = ", ".join(f"%({n})s" for n in unknown)
        return f"unknown parameter {shown} (use {', '.join(f'%({a})s' for a in allowed)})"
    if required not in names:
        return f"must use %({required})s"
    return None


def _check_lookup(v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems) -> None:
    """Check a lookup: its query's parameters, its statuses."""
    query = v.get("query")
    if isinstance(query, str) and (reason := _check_query(query, ("id", "variant"), "id")):
        problems.add(_join(path, "query"), reason)
    if v.get("serve_statuses") == ():
        problems.add(_join(path, "serve_statuses"), "at least one status is required")


def _check_access(v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems) -> None:
    """Check access control: keys for signed URLs, a header name, trusted proxy CIDRs."""
    mode = v.get("mode", "public")
    if mode == "signed" and not data.get("keys_env"):
        problems.add(_join(path, "keys_env"), "signed access needs at least one key variable")
    header = v.get("header")
    if isinstance(header, str) and not _HEADER_NAME.fullmatch(header):
        problems.add(_join(path, "header"), f"not a header name, got {header!r}")
    for i, cidr in enumerate(v.get("trusted_proxies", ())):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.add(
                f"{_join(path, 'trusted_proxies')}[{i}]", f"not an IP network, got {cidr!r}"
            )
    query = v.get("allow_query")
    if isinstance(query, str) and (reason := _check_query(query, ("id", "user"), "user")):
        problems.add(_join(path, "allow_query"), reason)
    if mode != "trusted_header" and data.get("allow_query") is not None:
        problems.add(_join(path, "allow_query"), "only used with mode: trusted_header")


def _check_database(
    v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems
) -> None:
    """Check the database: one DSN source, pool bounds."""
    if (data.get("dsn") is None) == (data.get("dsn_env") is None):
        problems.add(_join(path, "dsn_env"), "exactly one of dsn, dsn_env is required")
    lo, hi = v.get("pool_min"), v.get("pool_max")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        problems.add(_join(path, "pool_min"), f"must not exceed pool_max ({hi}), got {lo}")


def _check_upstream(
    v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems
) -> None:
    """Check an upstream: an http(s) URL with a host, no query, no clash with a storage."""
    url = v.get("url")
    if isinstance(url, str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.add(_join(path, "url"), f"expected http://host:port, got {url!r}")
        elif parts.query or parts.fragment:
            problems.add(_join(path, "url"), "must not have a query or fragment")
    name = path.rsplit(".", 1)[-1]
    if name in problems.storages:
        problems.add(path, f"{name!r} is also a storage name: names are shared in /stats")


def _check_config(v: dict[str, Any], data: dict[Any, Any], path: str, problems: _Problems) -> None:
    """Check across sections: a database for lookups; listeners on distinct addresses."""
    if data.get("database") is None:
        for where in problems.needs_database:
            problems.add(where, "needs the top-level database section")
    # an absent section means its defaults; an invalid one was reported already
    server = v.get("server", None if "server" in data else ServerConfig())
    admin = v.get("admin", None if "admin" in data else AdminConfig())
    if server is None or admin is None or not server.port or server.port != admin.port:
        return
    if server.host == admin.host or {server.host, admin.host} & _WILDCARD_HOSTS:
        host = f"[{server.host}]" if ":" in server.host else server.host
        where = f"{host}:{server.port}"
        problems.add(
            "admin.port", f"the admin listener must not share the media listener ({where})"
        )


_Check = Callable[[dict[str, Any], dict[Any, Any], str, _Problems], None]
_CHECKS: Final[dict[type[Any], _Check]] = {
    S3StorageConfig: _check_s3,
    RouteConfig: _check_route,
    LookupConfig: _check_lookup,
    AccessConfig: _check_access,
    DatabaseConfig: _check_database,
    UpstreamConfig: _check_upstream,
    Config: _check_config,
}


@functools.cache
def _fields(cls: type[Any]) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Map each field name of a config class to its field and resolved type."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _is_required(f: dataclasses.Field[Any]) -> bool:
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return no_default and not f.metadata.get("internal")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: object) -> str:
    """Render a YAML value the way the user wrote it."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def _show_size(size: int) -> str:
    unit = next((u for u in ("GiB", "MiB", "KiB") if size and size % _SIZE_UNITS[u] == 0), "B")
    return f"{size // _SIZE_UNITS[unit]}{unit}"
