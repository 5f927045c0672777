"""Config loading: exact messages, paths first, every problem at once (SPEC §1-§2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    Config,
    DiskStorageConfig,
    EffectiveTimeouts,
    S3StorageConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
LOCAL = {"local": {"type": "disk", "root": "./media"}}
MINIMAL: dict[str, Any] = {
    "storages": LOCAL,
    "routes": [{"prefix": "/media/", "storage": "local"}],
}


def problems(data: object) -> list[str]:
    """The lines of the ConfigError that `data` must raise, source `c.yaml`."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yaml")
    assert info.value.source == "c.yaml"
    return info.value.lines()


def with_(**sections: object) -> dict[str, object]:
    """MINIMAL with whole top-level sections replaced or added."""
    return {**MINIMAL, **sections}


def s3(**keys: object) -> dict[str, object]:
    """MINIMAL plus an S3 storage `s` (bucket `b`) with `keys`."""
    return with_(storages={**LOCAL, "s": {"type": "s3", "bucket": "b", **keys}})


# -- the shipped files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sidecar.yaml", "example-s3.yaml"])
def test_shipped_files_load(name: str) -> None:
    cfg = load_config(REPO / "config" / name)
    assert cfg.source == str(REPO / "config" / name)
    assert cfg.routes and cfg.storages


def test_shipped_default_serves_local_media(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "config" / "sidecar.yaml")
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8080)
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9901)
    assert (cfg.logging.format, cfg.logging.level) == ("json", "info")
    assert list(cfg.storages) == ["local"]
    local = cfg.storages["local"]
    assert isinstance(local, DiskStorageConfig)
    assert local.root == tmp_path / "media"  # relative to the working directory, not the file
    (route,) = cfg.routes
    assert (route.prefix, route.storage) == ("/media/", "local")
    assert route.cache_control == "public, max-age=86400"


def test_example_s3_file() -> None:
    cfg = load_config(REPO / "config" / "example-s3.yaml")
    uploads = cfg.storages["uploads"]
    assert isinstance(uploads, S3StorageConfig)
    assert (uploads.name, uploads.bucket, uploads.prefix) == ("uploads", "media", "uploads/")
    assert uploads.endpoint_url == "http://127.0.0.1:8333"
    assert (uploads.access_key_id_env, uploads.secret_access_key_env) == (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    )
    assert [r.storage for r in cfg.routes] == ["local", "uploads"]
    assert cfg.timeouts.for_content_type("image/png").idle == 15.0


# -- values and defaults -------------------------------------------------------------------


def test_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.source == "<config>"
    assert (cfg.server.host, cfg.server.port, cfg.server.event_loop) == ("0.0.0.0", 8080, "uvloop")
    assert (cfg.server.keepalive_timeout, cfg.server.shutdown_timeout) == (75.0, 30.0)
    assert (cfg.admin.host, cfg.admin.port, cfg.admin.token_env) == ("127.0.0.1", 9901, None)
    assert (cfg.limits.max_streams, cfg.limits.max_streams_per_client) == (1024, 0)
    assert cfg.limits.chunk_size == 65536
    t = cfg.timeouts
    assert (t.idle, t.upstream_first_byte, t.max_duration, dict(t.by_type)) == (30.0, 10.0, 0.0, {})
    assert (cfg.logging.level, cfg.logging.format, cfg.logging.access_log) == ("info", "json", True)
    local = cfg.storages["local"]
    assert isinstance(local, DiskStorageConfig)
    assert (local.name, local.type) == ("local", "disk")
    assert local.root == Path("./media").absolute() and local.root.is_absolute()
    assert cfg.routes[0].cache_control is None


def test_s3_storage_fields_and_defaults() -> None:
    cfg = parse_config(
        with_(
            storages={
                "u": {"type": "s3", "bucket": "b"},
                "v": {
                    "type": "s3",
                    "bucket": "b2",
                    "prefix": "up/",
                    "endpoint_url": "https://s3.example",
                    "region": "eu-west-3",
                    "addressing_style": "virtual",
                    "access_key_id_env": "KEY",
                    "secret_access_key_env": "SECRET",
                    "session_token_env": "TOKEN",
                    "connect_timeout": "500ms",
                    "read_timeout": 2,
                    "max_attempts": 5,
                },
            },
            routes=[{"prefix": "/s3/", "storage": "u", "cache_control": "no-store"}],
        )
    )
    u, v = cfg.storages["u"], cfg.storages["v"]
    assert u == S3StorageConfig(name="u", bucket="b")
    assert (u.type, u.prefix, u.endpoint_url, u.region, u.addressing_style) == (
        "s3",
        "",
        None,
        "us-east-1",
        "auto",
    )
    assert (u.connect_timeout, u.read_timeout, u.max_attempts) == (3.0, 15.0, 3)
    assert v == S3StorageConfig(
        name="v",
        bucket="b2",
        prefix="up/",
        endpoint_url="https://s3.example",
        region="eu-west-3",
        addressing_style="virtual",
        access_key_id_env="KEY",
        secret_access_key_env="SECRET",
        session_token_env="TOKEN",
        connect_timeout=0.5,
        read_timeout=2.0,
        max_attempts=5,
    )
    assert cfg.routes[0].cache_control == "no-store"


def test_explicit_values_and_nulls() -> None:
    cfg = parse_config(
        with_(
            server={"event_loop": "uvloop", "keepalive_timeout": 0, "shutdown_timeout": "1.5s"},
            admin={"token_env": None, "port": 9000},
            limits={"chunk_size": "1MiB", "max_streams": 1, "max_streams_per_client": 3},
            timeouts={"max_duration": "2h", "by_type": {"image/": {"idle": None}}},
            logging={"level": "debug", "format": "text", "access_log": False},
        )
    )
    assert (cfg.server.event_loop, cfg.server.keepalive_timeout) == ("uvloop", 0.0)
    assert cfg.server.shutdown_timeout == 1.5
    assert (cfg.admin.token_env, cfg.admin.port) == (None, 9000)
    assert (cfg.limits.chunk_size, cfg.limits.max_streams) == (1 << 20, 1)
    assert cfg.timeouts.max_duration == 7200.0
    assert cfg.timeouts.by_type["image/"].idle is None
    assert (cfg.logging.level, cfg.logging.format, cfg.logging.access_log) == (
        "debug",
        "text",
        False,
    )


def test_port_zero_means_any_free_port() -> None:
    cfg = parse_config(with_(server={"port": 0}, admin={"host": "0.0.0.0", "port": 0}))
    assert (cfg.server.port, cfg.admin.port) == (0, 0)


def test_listeners_may_share_a_port_on_different_hosts() -> None:
    cfg = parse_config(
        with_(server={"host": "127.0.0.1", "port": 9000}, admin={"host": "127.0.0.2", "port": 9000})
    )
    assert cfg.admin.port == 9000


def test_config_tree_is_immutable() -> None:
    cfg = parse_config(with_(timeouts={"by_type": {"image/": {"idle": 1}}}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.storages["x"] = cfg.storages["local"]  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.timeouts.by_type["video/"] = cfg.timeouts.by_type["image/"]  # type: ignore[index]
    assert isinstance(cfg.routes, tuple)
    assert isinstance(cfg, Config)


# -- every rule, its exact line ------------------------------------------------------------

RULES: list[tuple[object, str]] = [
    # unknown keys, at every level, with a hint when close
    (with_(server={"prot": 1}), "server.prot: unknown key (did you mean 'port'?)"),
    (with_(admin={"tokn_env": "X"}), "admin.tokn_env: unknown key (did you mean 'token_env'?)"),
    (with_(extra=1), "extra: unknown key"),
    (with_(database={}), "database.dsn_env: exactly one of dsn, dsn_env is required"),
    (with_(upstream={}), "upstream: unknown key (did you mean 'upstreams'?)"),
    (with_(source="x.yaml"), "source: unknown key"),
    (
        with_(storages={"local": {"type": "disk", "root": ".", "name": "x"}}),
        "storages.local.name: unknown key",
    ),
    (
        with_(storages={"local": {"type": "disk", "root": ".", "bukcet": "x"}}),
        "storages.local.bukcet: unknown key",
    ),
    (s3(bukcet="x"), "storages.s.bukcet: unknown key (did you mean 'bucket'?)"),
    (
        with_(routes=[{"prefix": "/m/", "storage": "local", "cache_contrl": "no"}]),
        "routes[0].cache_contrl: unknown key (did you mean 'cache_control'?)",
    ),
    (
        with_(timeouts={"by_type": {"video/": {"idel": "1s"}}}),
        "timeouts.by_type.video/.idel: unknown key (did you mean 'idle'?)",
    ),
    # wrong types
    (with_(server={"port": "abc"}), "server.port: expected an integer, got 'abc'"),
    (with_(server={"port": True}), "server.port: expected an integer, got true"),
    (with_(server={"port": 80.5}), "server.port: expected an integer, got 80.5"),
    (with_(server={"port": None}), "server.port: expected an integer, got null"),
    (with_(server={"host": 1}), "server.host: expected a string, got 1"),
    (with_(server=[1]), "server: expected a mapping, got a list"),
    (with_(server=None), "server: expected a mapping, got null"),
    (with_(logging={"access_log": "yes"}), "logging.access_log: expected true or false, got 'yes'"),
    (with_(logging={"access_log": 1}), "logging.access_log: expected true or false, got 1"),
    (
        with_(server={"keepalive_timeout": "soon"}),
        "server.keepalive_timeout: expected a duration like 250ms, 30s, 5m or 1h, got 'soon'",
    ),
    (
        with_(timeouts={"idle": True}),
        "timeouts.idle: expected a duration like 250ms, 30s, 5m or 1h, got true",
    ),
    (with_(timeouts={"idle": -1}), "timeouts.idle: expected a duration >= 0, got -1"),
    (
        with_(limits={"chunk_size": "big"}),
        "limits.chunk_size: expected a size like 64KiB or 8MiB, got 'big'",
    ),
    (
        with_(storages={"local": {"type": "disk", "root": 5}}),
        "storages.local.root: expected a path, got 5",
    ),
    (
        with_(storages={"local": {"type": "disk", "root": ""}}),
        "storages.local.root: expected a path, got ''",
    ),
    (with_(routes={"prefix": "/m/"}), "routes: expected a list, got a mapping"),
    (with_(routes=["/m/"]), "routes[0]: expected a mapping, got '/m/'"),
    # listeners
    (with_(server={"port": 70000}), "server.port: must be between 0 and 65535, got 70000"),
    (with_(admin={"port": -1}), "admin.port: must be between 0 and 65535, got -1"),
    (
        with_(server={"host": "127.0.0.1", "port": 9901}),
        "admin.port: the admin listener must not share the media listener (127.0.0.1:9901)",
    ),
    (
        with_(server={"port": 9901}),  # 0.0.0.0 covers 127.0.0.1
        "admin.port: the admin listener must not share the media listener (0.0.0.0:9901)",
    ),
    (
        with_(server={"host": "::", "port": 7000}, admin={"host": "::1", "port": 7000}),
        "admin.port: the admin listener must not share the media listener ([::]:7000)",
    ),
    (
        with_(server={"event_loop": "trio"}),
        "server.event_loop: expected one of asyncio, uvloop, got 'trio'",
    ),
    (
        with_(server={"allocator": "tcmalloc"}),
        "server.allocator: expected one of auto, jemalloc, system, got 'tcmalloc'",
    ),
    (
        with_(admin={"token_env": "not a name"}),
        "admin.token_env: expected an environment variable name, got 'not a name'",
    ),
    (
        with_(admin={"token_env": "1TOKEN"}),
        "admin.token_env: expected an environment variable name, got '1TOKEN'",
    ),
    # limits
    (with_(limits={"max_streams": 0}), "limits.max_streams: must be at least 1, got 0"),
    (
        with_(limits={"max_streams_per_client": -1}),
        "limits.max_streams_per_client: must be at least 0, got -1",
    ),
    (
        with_(limits={"chunk_size": "1KiB"}),
        "limits.chunk_size: must be between 4KiB and 16MiB, got '1KiB'",
    ),
    (
        with_(limits={"chunk_size": (16 << 20) + 1}),
        "limits.chunk_size: must be between 4KiB and 16MiB, got 16777217",
    ),
    # timeouts.by_type
    (
        with_(timeouts={"by_type": {"video/": 5}}),
        "timeouts.by_type.video/: expected a mapping, got 5",
    ),
    (
        with_(timeouts={"by_type": {"": {"idle": 1}}}),
        "timeouts.by_type.: expected a Content-Type prefix, got ''",
    ),
    (
        with_(timeouts={"by_type": {5: {"idle": 1}}}),
        "timeouts.by_type.5: expected a Content-Type prefix, got 5",
    ),
    (
        with_(timeouts={"by_type": {"image/": {"idle": "1d"}}}),
        "timeouts.by_type.image/.idle: expected a duration like 250ms, 30s, 5m or 1h, got '1d'",
    ),
    (with_(timeouts={"by_type": ["image/"]}), "timeouts.by_type: expected a mapping, got a list"),
    # logging
    (
        with_(logging={"level": "loud"}),
        "logging.level: expected one of debug, info, warning, error, got 'loud'",
    ),
    (with_(logging={"format": "xml"}), "logging.format: expected one of json, text, got 'xml'"),
    # storages
    (with_(storages={"local": {"root": "."}}), "storages.local.type: required key missing"),
    (
        with_(storages={"local": {"type": "ftp"}}),
        "storages.local.type: expected one of disk, s3, got 'ftp'",
    ),
    (with_(storages={"local": {"type": "disk"}}), "storages.local.root: required key missing"),
    (
        with_(storages={**LOCAL, "uploads": {"type": "s3"}}),
        "storages.uploads.bucket: required key missing",
    ),
    (with_(storages={"local": None}), "storages.local: expected a mapping, got null"),
    (
        with_(storages={**LOCAL, "s 1": {"type": "disk", "root": "."}}),
        "storages.s 1: storage names use letters, digits, '-' and '_', got 's 1'",
    ),
    (s3(bucket=""), "storages.s.bucket: must not be empty"),
    (s3(bucket=None), "storages.s.bucket: expected a string, got null"),
    (s3(prefix="/up/"), "storages.s.prefix: must not start with '/', got '/up/'"),
    (s3(prefix="up"), "storages.s.prefix: must end with '/', e.g. 'uploads/', got 'up'"),
    (
        s3(endpoint_url="127.0.0.1:8333"),
        "storages.s.endpoint_url: must start with http:// or https://, got '127.0.0.1:8333'",
    ),
    (
        s3(access_key_id_env="K"),
        "storages.s.secret_access_key_env: required when access_key_id_env is set "
        "(both or neither)",
    ),
    (
        s3(secret_access_key_env="S"),
        "storages.s.access_key_id_env: required when secret_access_key_env is set "
        "(both or neither)",
    ),
    (
        s3(session_token_env="T"),
        "storages.s.session_token_env: requires access_key_id_env and secret_access_key_env",
    ),
    (
        s3(access_key_id_env="K", secret_access_key_env="S$"),
        "storages.s.secret_access_key_env: expected an environment variable name, got 'S$'",
    ),
    (
        s3(addressing_style="host"),
        "storages.s.addressing_style: expected one of auto, path, virtual, got 'host'",
    ),
    (s3(connect_timeout=0), "storages.s.connect_timeout: must be greater than 0, got 0"),
    (s3(max_attempts=0), "storages.s.max_attempts: must be at least 1, got 0"),
    # routes
    (
        with_(routes=[{"prefix": "media", "storage": "local"}]),
        "routes[0].prefix: must start and end with '/', e.g. '/media/', got 'media'",
    ),
    (
        with_(routes=[{"prefix": "/media", "storage": "local"}]),
        "routes[0].prefix: must start and end with '/', e.g. '/media/', got '/media'",
    ),
    (
        with_(
            routes=[{"prefix": "/m/", "storage": "local"}, {"prefix": "/m/", "storage": "local"}]
        ),
        "routes[1].prefix: duplicate prefix '/m/' (first in routes[0])",
    ),
    (
        with_(
            routes=[{"prefix": "/m/", "storage": "local"}, {"prefix": "/m/x/", "storage": "local"}]
        ),
        "routes[1].prefix: never matched: routes[0] prefix '/m/' comes first",
    ),
    (
        with_(routes=[{"prefix": "/m/"}]),
        "routes[0].storage: exactly one of storage, lookup, upstream is required",
    ),
    (with_(routes=[{"storage": "local"}]), "routes[0].prefix: required key missing"),
    (
        with_(routes=[{"prefix": "/m/", "storage": "archive"}]),
        "routes[0].storage: unknown storage 'archive' (defined: local)",
    ),
    (
        with_(
            storages={**LOCAL, "uploads": {"type": "s3", "bucket": "b"}},
            routes=[
                {"prefix": "/media/", "storage": "local"},
                {"prefix": "/a/", "storage": "archive"},
            ],
        ),
        "routes[1].storage: unknown storage 'archive' (defined: local, uploads)",
    ),
    (with_(routes=[]), "routes: at least one route is required"),
    ({"storages": LOCAL}, "routes: required key missing"),
    # the top level
    ([], "(top level): expected a mapping, got a list"),
    ("media", "(top level): expected a mapping, got 'media'"),
    (None, "(top level): expected a mapping, the file is empty"),
    # upstreams
    (
        with_(upstreams={"app": {"url": "ftp://x"}}),
        "upstreams.app.url: expected http://host:port, got 'ftp://x'",
    ),
    (
        with_(upstreams={"app": {"url": "http://x:1/?a=1"}}),
        "upstreams.app.url: must not have a query or fragment",
    ),
    (
        with_(upstreams={"local": {"url": "http://x:1"}}),
        "upstreams.local: 'local' is also a storage name: names are shared in /stats",
    ),
    (
        with_(routes=[{"prefix": "/a/", "upstream": "app"}]),
        "routes[0].upstream: unknown upstream 'app' (defined: none)",
    ),
    (
        with_(
            upstreams={"app": {"url": "http://x:1"}},
            routes=[{"prefix": "/a/", "upstream": "app", "storage": "local"}],
        ),
        "routes[0].storage: storage and upstream exclude each other",
    ),
    (
        with_(
            upstreams={"app": {"url": "http://x:1"}},
            routes=[{"prefix": "/a/", "upstream": "app", "internal": True}],
        ),
        "routes[0].internal: an upstream route cannot be internal",
    ),
    (with_(upstreams={"app": {}}), "upstreams.app.url: required key missing"),
    # database, lookup routes, access control
    (
        with_(database={"dsn": "host=x", "dsn_env": "DB"}),
        "database.dsn_env: exactly one of dsn, dsn_env is required",
    ),
    (
        with_(database={"dsn_env": "DB", "pool_min": 5, "pool_max": 2}),
        "database.pool_min: must not exceed pool_max (2), got 5",
    ),
    (
        with_(database={"dsn_env": "1DB"}),
        "database.dsn_env: expected an environment variable name, got '1DB'",
    ),
    (
        with_(routes=[{"prefix": "/m/", "lookup": {"query": "SELECT 1 WHERE x = %(id)s"}}]),
        "routes[0].lookup: needs the top-level database section",
    ),
    (
        with_(
            database={"dsn_env": "DB"},
            routes=[{"prefix": "/m/", "storage": "local", "lookup": {"query": "q %(id)s"}}],
        ),
        "routes[0].storage: storage and lookup exclude each other",
    ),
    (
        with_(database={"dsn_env": "DB"}, routes=[{"prefix": "/m/", "lookup": {"query": "q"}}]),
        "routes[0].lookup.query: must use %(id)s",
    ),
    (
        with_(
            database={"dsn_env": "DB"},
            routes=[{"prefix": "/m/", "lookup": {"query": "q %(id)s %(name)s"}}],
        ),
        "routes[0].lookup.query: unknown parameter %(name)s (use %(id)s, %(variant)s)",
    ),
    (
        with_(
            database={"dsn_env": "DB"},
            routes=[{"prefix": "/m/", "lookup": {"query": "q %(id)s LIKE 'a%'"}}],
        ),
        "routes[0].lookup.query: a lone '%' (write '%%' for a literal percent sign)",
    ),
    (
        with_(
            database={"dsn_env": "DB"},
            routes=[{"prefix": "/m/", "lookup": {"query": "q %(id)s", "serve_statuses": []}}],
        ),
        "routes[0].lookup.serve_statuses: at least one status is required",
    ),
    (
        with_(routes=[{"prefix": "/m/", "storage": "local", "access": {"mode": "signed"}}]),
        "routes[0].access.keys_env: signed access needs at least one key variable",
    ),
    (
        with_(
            routes=[
                {
                    "prefix": "/m/",
                    "storage": "local",
                    "access": {"mode": "signed", "keys_env": ["K", "2"]},
                }
            ]
        ),
        "routes[0].access.keys_env[1]: expected an environment variable name, got '2'",
    ),
    (
        with_(routes=[{"prefix": "/m/", "storage": "local", "access": {"mode": "cookie"}}]),
        "routes[0].access.mode: expected one of public, signed, trusted_header, got 'cookie'",
    ),
    (
        with_(
            routes=[
                {
                    "prefix": "/m/",
                    "storage": "local",
                    "access": {"mode": "trusted_header", "trusted_proxies": ["10.0.0.0/8", "nope"]},
                }
            ]
        ),
        "routes[0].access.trusted_proxies[1]: not an IP network, got 'nope'",
    ),
    (
        with_(
            routes=[
                {
                    "prefix": "/m/",
                    "storage": "local",
                    "access": {"mode": "trusted_header", "header": "X User"},
                }
            ]
        ),
        "routes[0].access.header: not a header name, got 'X User'",
    ),
    (
        with_(
            routes=[
                {
                    "prefix": "/m/",
                    "storage": "local",
                    "access": {
                        "mode": "trusted_header",
                        "allow_query": "SELECT 1 WHERE u = %(user)s",
                    },
                }
            ]
        ),
        "routes[0].access.allow_query: needs the top-level database section",
    ),
    (
        with_(
            database={"dsn_env": "DB"},
            routes=[
                {
                    "prefix": "/m/",
                    "storage": "local",
                    "access": {"mode": "public", "allow_query": "SELECT 1 WHERE u = %(user)s"},
                }
            ],
        ),
        "routes[0].access.allow_query: only used with mode: trusted_header",
    ),
]


@pytest.mark.parametrize(("data", "expected"), RULES, ids=[r[1][:60] for r in RULES])
def test_each_rule_has_its_exact_line(data: object, expected: str) -> None:
    assert problems(data) == [f"c.yaml: {expected}"]


@pytest.mark.parametrize(
    ("storages", "expected"),
    [
        (None, "storages: required key missing"),  # reported after the keys that are there
        ({}, "storages: at least one storage is required"),
        (["local"], "storages: expected a mapping, got a list"),
    ],
)
def test_no_storages_and_the_routes_that_name_them(storages: object, expected: str) -> None:
    data: dict[str, object] = {"routes": [{"prefix": "/m/", "storage": "local"}]}
    if storages is not None:
        data = {"storages": storages, **data}
    lines = ["c.yaml: routes[0].storage: unknown storage 'local' (defined: none)"]
    lines.insert(0 if storages is not None else 1, f"c.yaml: {expected}")
    assert problems(data) == lines


def test_every_problem_is_reported_in_document_order() -> None:
    data = {
        "server": {"prot": 8080, "keepalive_timeout": "-1s"},
        "limits": {"max_streams": "many", "chunk_size": "1KiB"},
        "storages": {
            "local": {"type": "disk", "root": "./media"},
            "uploads": {"type": "s3", "prefix": "/up"},
        },
        "routes": [
            {"prefix": "/media/", "storage": "local"},
            {"prefix": "s3", "storage": "archive"},
        ],
        "logging": {"level": "loud"},
    }
    assert problems(data) == [
        "c.yaml: server.prot: unknown key (did you mean 'port'?)",
        "c.yaml: server.keepalive_timeout: expected a duration >= 0, got '-1s'",
        "c.yaml: limits.max_streams: expected an integer, got 'many'",
        "c.yaml: limits.chunk_size: must be between 4KiB and 16MiB, got '1KiB'",
        # an incomplete storage is still checked, and still counts as defined for the routes
        "c.yaml: storages.uploads.prefix: must not start with '/', got '/up'",
        "c.yaml: storages.uploads.bucket: required key missing",
        "c.yaml: routes[1].prefix: must start and end with '/', e.g. '/media/', got 's3'",
        "c.yaml: routes[1].storage: unknown storage 'archive' (defined: local, uploads)",
        "c.yaml: logging.level: expected one of debug, info, warning, error, got 'loud'",
    ]


def test_routes_before_storages_still_see_every_storage() -> None:
    routes = [{"prefix": "/s3/", "storage": "uploads"}]
    assert problems({"routes": routes, "storages": LOCAL}) == [
        "c.yaml: routes[0].storage: unknown storage 'uploads' (defined: local)"
    ]
    cfg = parse_config({"routes": routes, "storages": {"uploads": {"type": "s3", "bucket": "b"}}})
    assert cfg.routes[0].storage == "uploads"


def test_a_bad_storage_name_does_not_hide_its_other_problems() -> None:
    data = with_(storages={**LOCAL, "a b": {"type": "disk", "rot": "."}})
    assert problems(data) == [
        "c.yaml: storages.a b: storage names use letters, digits, '-' and '_', got 'a b'",
        "c.yaml: storages.a b.rot: unknown key (did you mean 'root'?)",
        "c.yaml: storages.a b.root: required key missing",
    ]


def test_invalid_credential_name_is_not_also_reported_as_missing() -> None:
    assert problems(s3(access_key_id_env="A B", secret_access_key_env="S")) == [
        "c.yaml: storages.s.access_key_id_env: expected an environment variable name, got 'A B'"
    ]


def test_config_error_is_a_value_error_with_every_line() -> None:
    with pytest.raises(ValueError) as info:
        parse_config(with_(server={"prot": 1, "port": "x"}), "c.yaml")
    assert isinstance(info.value, ConfigError)
    assert info.value.problems == [
        ("server.prot", "unknown key (did you mean 'port'?)"),
        ("server.port", "expected an integer, got 'x'"),
    ]
    assert str(info.value) == "\n".join(info.value.lines())


# -- durations and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (0.25, 0.25),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("0ms", 0.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2h", 7200.0),
        (" 2s ", 2.0),
        ("10 s", 10.0),
    ],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (True, "expected a duration like 250ms, 30s, 5m or 1h, got true"),
        (False, "expected a duration like 250ms, 30s, 5m or 1h, got false"),
        (None, "expected a duration like 250ms, 30s, 5m or 1h, got null"),
        ("30", "expected a duration like 250ms, 30s, 5m or 1h, got '30'"),
        ("1d", "expected a duration like 250ms, 30s, 5m or 1h, got '1d'"),
        ("1S", "expected a duration like 250ms, 30s, 5m or 1h, got '1S'"),
        ("s", "expected a duration like 250ms, 30s, 5m or 1h, got 's'"),
        ("", "expected a duration like 250ms, 30s, 5m or 1h, got ''"),
        (".5s", "expected a duration like 250ms, 30s, 5m or 1h, got '.5s'"),
        ("1 minute", "expected a duration like 250ms, 30s, 5m or 1h, got '1 minute'"),
        ([1], "expected a duration like 250ms, 30s, 5m or 1h, got a list"),
        (-1, "expected a duration >= 0, got -1"),
        (-0.5, "expected a duration >= 0, got -0.5"),
        ("-1s", "expected a duration >= 0, got '-1s'"),
        (float("nan"), "expected a duration >= 0, got nan"),
        (float("inf"), "expected a duration >= 0, got inf"),
    ],
)
def test_bad_durations(raw: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(raw)
    assert str(info.value) == reason


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("512B", 512),
        ("64KiB", 65536),
        ("64 KiB", 65536),
        ("8MiB", 8 << 20),
        ("1GiB", 1 << 30),
        ("64KB", 64000),
        ("2MB", 2_000_000),
        ("1GB", 10**9),
    ],
)
def test_sizes(raw: object, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (True, "expected a size like 64KiB or 8MiB, got true"),
        (False, "expected a size like 64KiB or 8MiB, got false"),
        (None, "expected a size like 64KiB or 8MiB, got null"),
        (1.5, "expected a size like 64KiB or 8MiB, got 1.5"),
        ("64k", "expected a size like 64KiB or 8MiB, got '64k'"),
        ("64kib", "expected a size like 64KiB or 8MiB, got '64kib'"),
        ("1.5MiB", "expected a size like 64KiB or 8MiB, got '1.5MiB'"),
        ("MiB", "expected a size like 64KiB or 8MiB, got 'MiB'"),
        ("4096", "expected a size like 64KiB or 8MiB, got '4096'"),
        (-1, "expected a size >= 0, got -1"),
        ("-1KiB", "expected a size >= 0, got '-1KiB'"),
    ],
)
def test_bad_sizes(raw: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(raw)
    assert str(info.value) == reason


# -- timeouts by Content-Type --------------------------------------------------------------


def test_timeouts_by_type_longest_prefix_wins() -> None:
    cfg = parse_config(
        with_(
            timeouts={
                "idle": "30s",
                "upstream_first_byte": "10s",
                "max_duration": 0,
                "by_type": {
                    "video/mp4": {"idle": "90s", "max_duration": "1h"},  # longer, listed first
                    "video/": {"idle": "60s"},
                    "Image/": {"upstream_first_byte": "2s"},
                },
            }
        )
    )
    t = cfg.timeouts
    assert t.for_content_type("video/webm") == EffectiveTimeouts(
        idle=60.0, upstream_first_byte=10.0, max_duration=0.0
    )
    assert t.for_content_type("VIDEO/MP4; codecs=avc1") == EffectiveTimeouts(
        idle=90.0, upstream_first_byte=10.0, max_duration=3600.0
    )
    assert t.for_content_type("image/png") == EffectiveTimeouts(
        idle=30.0, upstream_first_byte=2.0, max_duration=0.0
    )
    top = EffectiveTimeouts(idle=30.0, upstream_first_byte=10.0, max_duration=0.0)
    assert t.for_content_type("text/plain") == top
    assert t.for_content_type(None) == top
    assert t.for_content_type("") == top


def test_timeouts_without_by_type() -> None:
    t = parse_config(with_(timeouts={"idle": "250ms", "max_duration": "5m"})).timeouts
    assert t.for_content_type("video/mp4") == EffectiveTimeouts(
        idle=0.25, upstream_first_byte=10.0, max_duration=300.0
    )


# -- load_config: files --------------------------------------------------------------------


def test_load_config_keeps_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("my.yaml").write_text(
        "storages: {local: {type: disk, root: media}}\nroutes: [{prefix: /m/, storage: local}]\n"
    )
    cfg = load_config("my.yaml")
    assert cfg.source == "my.yaml"
    assert cfg.storages["local"] == DiskStorageConfig(name="local", root=tmp_path / "media")


def test_load_config_reports_problems_under_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "server: {prot: 1}\n"
        "storages: {local: {type: disk, root: .}}\n"
        "routes: [{prefix: /m/, storage: archive}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines() == [
        f"{path}: server.prot: unknown key (did you mean 'port'?)",
        f"{path}: routes[0].storage: unknown storage 'archive' (defined: local)",
    ]


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        ("line 3, column 1", "invalid YAML: expected ',' or ']', but got '<stream end>'")
    ]
    assert info.value.lines() == [
        f"{path}: line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'"
    ]


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: 1\n host: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    ((where, reason),) = info.value.problems
    assert (where, reason.split(":")[0]) == ("line 3, column 2", "invalid YAML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.lines() == [
        f"{tmp_path / 'nope.yaml'}: cannot read file: No such file or directory"
    ]


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.lines() == [f"{tmp_path}: cannot read file: Is a directory"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("server: {host: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines() == [f"{path}: cannot read file: not UTF-8 text"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected a mapping, the file is empty"),
        ("# only a comment\n", "expected a mapping, the file is empty"),
        ("- a\n- b\n", "expected a mapping, got a list"),
        ("just text\n", "expected a mapping, got 'just text'"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines() == [f"{path}: (top level): {reason}"]


def test_a_lookup_route_with_access_control_parses() -> None:
    cfg = parse_config(
        with_(
            database={"dsn_env": "DATABASE_URL", "statement_timeout": "250ms", "pool_max": 4},
            routes=[
                {
                    "prefix": "/api/media/",
                    "lookup": {
                        "query": "SELECT storage, key FROM media WHERE id = %(id)s"
                        " AND variant IS NOT DISTINCT FROM %(variant)s AND note NOT LIKE '%%x'",
                        "serve_statuses": ["ready", "published"],
                        "cache_ttl": "10s",
                    },
                    "access": {"mode": "signed", "keys_env": ["KEY_NEW", "KEY_OLD"]},
                },
                {"prefix": "/media/", "storage": "local"},
            ],
        )
    )
    route = cfg.routes[0]
    assert route.storage is None and route.lookup is not None
    assert route.lookup.serve_statuses == ("ready", "published") and route.lookup.cache_ttl == 10
    assert route.access.keys_env == ("KEY_NEW", "KEY_OLD")
    assert cfg.database is not None and cfg.database.statement_timeout == 0.25
    assert cfg.routes[1].access.mode == "public"
