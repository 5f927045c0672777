"""The frozen configuration tree and its loader: every problem reported, path first."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.errors import ConfigError

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)\s*$")
_SIZE_UNITS: Final = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
}
_ENV_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STORAGE_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+$")

# Field kinds beyond plain Python types, declared in dataclass metadata.
DURATION: Final = {"kind": "duration"}
SIZE: Final = {"kind": "size"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    # asyncio, not uvloop: only asyncio has loop.sendfile (zero-copy disk bodies; README)
    event_loop: str = field(default="asyncio", metadata={"choices": ("asyncio", "uvloop")})
    keepalive_timeout: float = field(default=75.0, metadata=DURATION)
    shutdown_timeout: float = field(default=30.0, metadata=DURATION)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9901
    token_env: str | None = field(default=None, metadata={"kind": "env"})


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_streams: int = field(default=1024, metadata={"min": 1})
    max_streams_per_client: int = field(default=0, metadata={"min": 0})
    chunk_size: int = field(
        default=64 * 1024, metadata={"kind": "size", "min": 4096, "max": 16 << 20}
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutOverride:
    idle: float | None = field(default=None, metadata=DURATION)
    upstream_first_byte: float | None = field(default=None, metadata=DURATION)
    max_duration: float | None = field(default=None, metadata=DURATION)


@dataclass(frozen=True, slots=True, kw_only=True)
class EffectiveTimeouts:
    idle: float
    upstream_first_byte: float
    max_duration: float  # 0 = unlimited


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    idle: float = field(default=30.0, metadata=DURATION)
    upstream_first_byte: float = field(default=10.0, metadata=DURATION)
    max_duration: float = field(default=0.0, metadata=DURATION)
    by_type: Mapping[str, TimeoutOverride] = field(default_factory=dict)

    def for_content_type(self, content_type: str | None) -> EffectiveTimeouts:
        """Apply the longest `by_type` prefix the content type starts with (case-insensitive)."""
        ctype = (content_type or "").lower()
        best: TimeoutOverride | None = None
        best_len = -1
        for prefix, override in self.by_type.items():
            if ctype.startswith(prefix.lower()) and len(prefix) > best_len:
                best, best_len = override, len(prefix)
        if best is None:
            return EffectiveTimeouts(
                idle=self.idle,
                upstream_first_byte=self.upstream_first_byte,
                max_duration=self.max_duration,
            )
        return EffectiveTimeouts(
            idle=self.idle if best.idle is None else best.idle,
            upstream_first_byte=(
                self.upstream_first_byte
                if best.upstream_first_byte is None
                else best.upstream_first_byte
            ),
            max_duration=self.max_duration if best.max_duration is None else best.max_duration,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskStorageConfig:
    name: str = field(metadata={"internal": True})
    type: str = "disk"
    root: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class S3StorageConfig:
    name: str = field(metadata={"internal": True})
    type: str = "s3"
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: str = field(default="auto", metadata={"choices": ("auto", "path", "virtual")})
    access_key_id_env: str | None = field(default=None, metadata={"kind": "env"})
    secret_access_key_env: str | None = field(default=None, metadata={"kind": "env"})
    session_token_env: str | None = field(default=None, metadata={"kind": "env"})
    connect_timeout: float = field(default=3.0, metadata=DURATION)
    read_timeout: float = field(default=15.0, metadata=DURATION)
    max_attempts: int = field(default=3, metadata={"min": 1})


StorageConfig = DiskStorageConfig | S3StorageConfig
_STORAGE_TYPES: Final[dict[str, type[Any]]] = {"disk": DiskStorageConfig, "s3": S3StorageConfig}


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    prefix: str
    storage: str
    cache_control: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error")})
    format: str = field(default="json", metadata={"choices": ("json", "text")})
    access_log: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    source: str = field(metadata={"internal": True})
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    storages: Mapping[str, StorageConfig]
    routes: tuple[RouteConfig, ...]
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like `250ms`, `30s`, `5m`, `1h`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 250ms, 30s, 5m or 1h, got {value!r}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"expected a duration >= 0, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like `64KiB`, `8MiB`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64KiB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a size like 64KiB or 8MiB, got {value!r}")
    if size < 0:
        raise ValueError(f"expected a size >= 0, got {value!r}")
    return size


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; raise ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, [("", "cannot read file: not UTF-8")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(where, f"invalid YAML: {problem}")]) from None
    return parse_config(data, source)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate a YAML-shaped mapping; raise ConfigError listing every problem."""
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise ConfigError(source, [("(top level)", "expected a mapping of sections")])
    cfg = _build(Config, data, "", problems, {"source": source})
    if cfg is not None:
        declared = data.get("storages")
        _check_references(cfg, set(declared) if isinstance(declared, dict) else set(), problems)
    if problems or cfg is None:
        raise ConfigError(source, problems)
    return typing.cast(Config, cfg)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _build(
    cls: type[Any],
    data: object,
    path: str,
    problems: list[tuple[str, str]],
    internal: dict[str, Any] | None = None,
) -> Any:
    """Build dataclass `cls` from a mapping, appending every problem found."""
    if not isinstance(data, dict):
        problems.append((path or "(top level)", f"expected a mapping, got {_show(data)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = dict(internal or {})
    for key, raw in data.items():
        key_path = _join(path, key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            problems.append((key_path, f"unknown key{more}"))
            continue
        value = _convert(hints[key], fields[key], raw, key_path, problems)
        if value is not None or raw is None:
            values[key] = value  # partly invalid values are kept so later checks still run
    complete = True
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            problems.append((_join(path, name), "required key missing"))
        if required and values.get(name) is None:
            complete = False
    return cls(**values) if complete else None


def _convert(
    hint: Any, f: dataclasses.Field[Any], raw: object, path: str, problems: list[tuple[str, str]]
) -> Any:
    """Convert one YAML value to the field's type and check its metadata rules."""
    meta = f.metadata
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[...]
        if raw is None:
            return None
        hint = next(a for a in args if a is not type(None))
    kind = meta.get("kind")
    try:
        if kind == "duration":
            value: Any = parse_duration(raw)
        elif kind == "size":
            value = parse_size(raw)
        elif kind == "env":
            if not isinstance(raw, str) or not _ENV_NAME.match(raw):
                raise ValueError(f"expected an environment variable name, got {_show(raw)}")
            value = raw
        elif hint is bool:
            if not isinstance(raw, bool):
                raise ValueError(f"expected true or false, got {_show(raw)}")
            value = raw
        elif hint is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ValueError(f"expected an integer, got {_show(raw)}")
            value = raw
        elif hint is str:
            if not isinstance(raw, str):
                raise ValueError(f"expected a string, got {_show(raw)}")
            value = raw
        elif hint is Path:
            if not isinstance(raw, str) or not raw:
                raise ValueError(f"expected a path, got {_show(raw)}")
            value = Path(raw).absolute()
        elif dataclasses.is_dataclass(hint):
            return _build(typing.cast(type[Any], hint), raw, path, problems)
        elif typing.get_origin(hint) is tuple:
            return _build_list(args[0], raw, path, problems)
        elif typing.get_origin(hint) in (Mapping, dict) or hint is Mapping:
            return _build_mapping(typing.get_args(hint)[1], raw, path, problems)
        else:  # pragma: no cover - a field type this walker does not know
            raise TypeError(f"unsupported field type {hint!r}")
    except ValueError as exc:
        problems.append((path, str(exc)))
        return None
    choices = meta.get("choices")
    if choices and value not in choices:
        problems.append((path, f"expected one of {', '.join(choices)}, got {_show(raw)}"))
    if "min" in meta and value < meta["min"]:
        problems.append((path, f"must be at least {meta['min']}, got {_show(raw)}"))
    if "max" in meta and value > meta["max"]:
        problems.append((path, f"must be at most {meta['max']}, got {_show(raw)}"))
    return value


def _build_list(item: type[Any], raw: object, path: str, problems: list[tuple[str, str]]) -> Any:
    if not isinstance(raw, list):
        problems.append((path, f"expected a list, got {_show(raw)}"))
        return None
    items = [_build(item, entry, f"{path}[{i}]", problems) for i, entry in enumerate(raw)]
    return tuple(items)


def _build_mapping(value_type: Any, raw: object, path: str, problems: list[tuple[str, str]]) -> Any:
    if not isinstance(raw, dict):
        problems.append((path, f"expected a mapping, got {_show(raw)}"))
        return None
    if isinstance(value_type, types.UnionType):  # the storages mapping
        return _build_storages(raw, path, problems)
    result: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            problems.append((_join(path, key), "keys must be non-empty strings"))
            continue
        result[key] = _build(value_type, value, _join(path, key), problems)
    return types.MappingProxyType(result)


def _build_storages(raw: dict[Any, Any], path: str, problems: list[tuple[str, str]]) -> Any:
    result: dict[str, Any] = {}
    for name, body in raw.items():
        spath = _join(path, name)
        if not isinstance(name, str) or not _STORAGE_NAME.match(name):
            problems.append((spath, "storage names use letters, digits, '-' and '_'"))
            continue
        if not isinstance(body, dict):
            problems.append((spath, f"expected a mapping, got {_show(body)}"))
            continue
        kind = body.get("type")
        if kind is None:
            problems.append((_join(spath, "type"), "required key missing"))
            continue
        cls = _STORAGE_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            problems.append((_join(spath, "type"), f"expected one of disk, s3, got {_show(kind)}"))
            continue
        built = _build(cls, body, spath, problems, {"name": name})
        if built is not None:
            _check_storage(built, spath, problems)
            result[name] = built
    return types.MappingProxyType(result)


def _check_storage(s: StorageConfig, path: str, problems: list[tuple[str, str]]) -> None:
    if not isinstance(s, S3StorageConfig):
        return
    if s.prefix.startswith("/"):
        problems.append((_join(path, "prefix"), "must not start with '/'"))
    elif s.prefix and not s.prefix.endswith("/"):
        problems.append((_join(path, "prefix"), "must end with '/', e.g. 'uploads/'"))
    if s.endpoint_url is not None and not s.endpoint_url.startswith(("http://", "https://")):
        problems.append((_join(path, "endpoint_url"), "must start with http:// or https://"))
    if (s.access_key_id_env is None) != (s.secret_access_key_env is None):
        problems.append(
            (
                _join(path, "access_key_id_env"),
                "access_key_id_env and secret_access_key_env go together",
            )
        )


def _check_references(cfg: Config, declared: set[Any], problems: list[tuple[str, str]]) -> None:
    """Checks across sections: ports, route prefixes, storages named by routes."""
    for section in ("server", "admin"):
        port = getattr(cfg, section).port
        if not 0 <= port <= 65535:  # 0: any free port (tests, benchmarks)
            problems.append((f"{section}.port", f"expected a port from 0 to 65535, got {port}"))
    if cfg.server.port and (cfg.server.host, cfg.server.port) == (cfg.admin.host, cfg.admin.port):
        problems.append(("admin.port", "the admin listener must not share the media listener"))
    if not declared:
        problems.append(("storages", "at least one storage is required"))
    if not cfg.routes:
        problems.append(("routes", "at least one route is required"))
    defined = ", ".join(sorted(str(name) for name in declared)) or "none"
    seen: set[str] = set()
    for i, route in enumerate(cfg.routes):
        if route is None:
            continue
        if not (route.prefix.startswith("/") and route.prefix.endswith("/")):
            problems.append(
                (
                    f"routes[{i}].prefix",
                    f"must start and end with '/', e.g. '/media/', got {route.prefix!r}",
                )
            )
        elif route.prefix in seen:
            problems.append((f"routes[{i}].prefix", f"duplicate prefix {route.prefix!r}"))
        seen.add(route.prefix)
        if route.storage not in declared:
            problems.append(
                (f"routes[{i}].storage", f"unknown storage {route.storage!r} (defined: {defined})")
            )


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
