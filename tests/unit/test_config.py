"""Config loading: exact messages, paths first, every problem at once (SPEC §1-§2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import (
    DiskStorageConfig,
    S3StorageConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {
    "storages": {"local": {"type": "disk", "root": "./media"}},
    "routes": [{"prefix": "/media/", "storage": "local"}],
}


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yaml")
    return info.value.lines()


def with_(**sections: object) -> dict[str, object]:
    return {**MINIMAL, **sections}


@pytest.mark.parametrize("name", ["sidecar.yaml", "example-s3.yaml"])
def test_shipped_files_load(name: str) -> None:
    cfg = load_config(REPO / "config" / name)
    assert cfg.routes and cfg.storages


def test_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert (cfg.server.host, cfg.server.port, cfg.server.event_loop) == ("0.0.0.0", 8080, "asyncio")
    assert (cfg.server.keepalive_timeout, cfg.server.shutdown_timeout) == (75.0, 30.0)
    assert (cfg.admin.host, cfg.admin.port, cfg.admin.token_env) == ("127.0.0.1", 9901, None)
    assert (cfg.limits.max_streams, cfg.limits.max_streams_per_client) == (1024, 0)
    assert cfg.limits.chunk_size == 65536
    assert (cfg.timeouts.idle, cfg.timeouts.upstream_first_byte) == (30.0, 10.0)
    assert (cfg.logging.level, cfg.logging.format, cfg.logging.access_log) == ("info", "json", True)
    local = cfg.storages["local"]
    assert isinstance(local, DiskStorageConfig)
    assert local.name == "local" and local.root == Path("./media").absolute()


def test_s3_storage_fields() -> None:
    cfg = parse_config(
        with_(
            storages={
                "u": {
                    "type": "s3",
                    "bucket": "b",
                    "prefix": "up/",
                    "endpoint_url": "http://127.0.0.1:8333",
                    "addressing_style": "path",
                    "access_key_id_env": "KEY",
                    "secret_access_key_env": "SECRET",
                    "read_timeout": "2s",
                }
            },
            routes=[{"prefix": "/s3/", "storage": "u", "cache_control": "no-store"}],
        )
    )
    u = cfg.storages["u"]
    assert isinstance(u, S3StorageConfig)
    assert (u.name, u.bucket, u.prefix, u.addressing_style, u.read_timeout) == (
        "u",
        "b",
        "up/",
        "path",
        2.0,
    )
    assert cfg.routes[0].cache_control == "no-store"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_(server={"prot": 1}), "c.yaml: server.prot: unknown key (did you mean 'port'?)"),
        (with_(extra=1), "c.yaml: extra: unknown key"),
        (with_(database={}), "c.yaml: database: unknown key"),
        (with_(server={"port": "abc"}), "c.yaml: server.port: expected an integer, got 'abc'"),
        (with_(server={"port": True}), "c.yaml: server.port: expected an integer, got true"),
        (
            with_(server={"port": 70000}),
            "c.yaml: server.port: expected a port from 0 to 65535, got 70000",
        ),
        (
            with_(server={"event_loop": "trio"}),
            "c.yaml: server.event_loop: expected one of asyncio, uvloop, got 'trio'",
        ),
        (
            with_(server={"keepalive_timeout": "soon"}),
            "c.yaml: server.keepalive_timeout: expected a duration like 250ms, 30s, 5m or 1h, "
            "got 'soon'",
        ),
        (
            with_(server={"port": 9901}, admin={"host": "0.0.0.0", "port": 9901}),
            "c.yaml: admin.port: the admin listener must not share the media listener",
        ),
        (
            with_(admin={"token_env": "not a name"}),
            "c.yaml: admin.token_env: expected an environment variable name, got 'not a name'",
        ),
        (with_(limits={"max_streams": 0}), "c.yaml: limits.max_streams: must be at least 1, got 0"),
        (
            with_(limits={"chunk_size": "1KiB"}),
            "c.yaml: limits.chunk_size: must be at least 4096, got '1KiB'",
        ),
        (
            with_(limits={"chunk_size": "1GiB"}),
            "c.yaml: limits.chunk_size: must be at most 16777216, got '1GiB'",
        ),
        (
            with_(timeouts={"by_type": {"video/": {"idel": "1s"}}}),
            "c.yaml: timeouts.by_type.video/.idel: unknown key (did you mean 'idle'?)",
        ),
        (
            with_(timeouts={"by_type": {"video/": 5}}),
            "c.yaml: timeouts.by_type.video/: expected a mapping, got 5",
        ),
        (
            with_(logging={"level": "loud"}),
            "c.yaml: logging.level: expected one of debug, info, warning, error, got 'loud'",
        ),
        (
            with_(logging={"access_log": "yes"}),
            "c.yaml: logging.access_log: expected true or false, got 'yes'",
        ),
        (
            with_(storages={"s": {"root": "."}}, routes=[{"prefix": "/m/", "storage": "s"}]),
            "c.yaml: storages.s.type: required key missing",
        ),
        (
            with_(storages={"s": {"type": "ftp"}}, routes=[{"prefix": "/m/", "storage": "s"}]),
            "c.yaml: storages.s.type: expected one of disk, s3, got 'ftp'",
        ),
        (
            with_(storages={"s": {"type": "s3"}}, routes=[{"prefix": "/m/", "storage": "s"}]),
            "c.yaml: storages.s.bucket: required key missing",
        ),
        (
            with_(storages={"s": {"type": "disk"}}, routes=[{"prefix": "/m/", "storage": "s"}]),
            "c.yaml: storages.s.root: required key missing",
        ),
        (
            with_(
                storages={"s 1": {"type": "disk", "root": "."}},
                routes=[{"prefix": "/m/", "storage": "s 1"}],
            ),
            "c.yaml: storages.s 1: storage names use letters, digits, '-' and '_'",
        ),
        (
            with_(
                storages={"s": {"type": "s3", "bucket": "b", "prefix": "/up/"}},
                routes=[{"prefix": "/m/", "storage": "s"}],
            ),
            "c.yaml: storages.s.prefix: must not start with '/'",
        ),
        (
            with_(
                storages={"s": {"type": "s3", "bucket": "b", "prefix": "up"}},
                routes=[{"prefix": "/m/", "storage": "s"}],
            ),
            "c.yaml: storages.s.prefix: must end with '/', e.g. 'uploads/'",
        ),
        (
            with_(
                storages={"s": {"type": "s3", "bucket": "b", "endpoint_url": "127.0.0.1:8333"}},
                routes=[{"prefix": "/m/", "storage": "s"}],
            ),
            "c.yaml: storages.s.endpoint_url: must start with http:// or https://",
        ),
        (
            with_(
                storages={"s": {"type": "s3", "bucket": "b", "access_key_id_env": "K"}},
                routes=[{"prefix": "/m/", "storage": "s"}],
            ),
            "c.yaml: storages.s.access_key_id_env: access_key_id_env and secret_access_key_env "
            "go together",
        ),
        (
            with_(
                storages={"s": {"type": "s3", "bucket": "b", "addressing_style": "host"}},
                routes=[{"prefix": "/m/", "storage": "s"}],
            ),
            "c.yaml: storages.s.addressing_style: expected one of auto, path, virtual, got 'host'",
        ),
        (
            with_(routes=[{"prefix": "media", "storage": "local"}]),
            "c.yaml: routes[0].prefix: must start and end with '/', e.g. '/media/', got 'media'",
        ),
        (
            with_(
                routes=[
                    {"prefix": "/m/", "storage": "local"},
                    {"prefix": "/m/", "storage": "local"},
                ]
            ),
            "c.yaml: routes[1].prefix: duplicate prefix '/m/'",
        ),
        (with_(routes=[{"prefix": "/m/"}]), "c.yaml: routes[0].storage: required key missing"),
        (
            with_(routes=[{"prefix": "/m/", "storage": "archive"}]),
            "c.yaml: routes[0].storage: unknown storage 'archive' (defined: local)",
        ),
        (with_(routes={"prefix": "/m/"}), "c.yaml: routes: expected a list, got a mapping"),
        (with_(routes=[]), "c.yaml: routes: at least one route is required"),
        ({"routes": MINIMAL["routes"]}, "c.yaml: storages: required key missing"),
        ([], "c.yaml: (top level): expected a mapping of sections"),
        (None, "c.yaml: (top level): expected a mapping of sections"),
    ],
)
def test_each_rule_has_its_exact_message(data: object, expected: str) -> None:
    assert problems(data) == [expected]


def test_every_problem_is_reported_in_document_order() -> None:
    data = {
        "server": {"prot": 8080, "keepalive_timeout": "-1s"},
        "limits": {"max_streams": "many"},
        "storages": {
            "local": {"type": "disk", "root": "./media"},
            "uploads": {"type": "s3"},
        },
        "routes": [
            {"prefix": "/media/", "storage": "local"},
            {"prefix": "/s3/", "storage": "archive"},
        ],
    }
    assert problems(data) == [
        "c.yaml: server.prot: unknown key (did you mean 'port'?)",
        "c.yaml: server.keepalive_timeout: expected a duration like 250ms, 30s, 5m or 1h, "
        "got '-1s'",
        "c.yaml: limits.max_streams: expected an integer, got 'many'",
        "c.yaml: storages.uploads.bucket: required key missing",
        # a storage that failed validation still counts as defined for the routes
        "c.yaml: routes[1].storage: unknown storage 'archive' (defined: local, uploads)",
    ]


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 2s ", 2.0),
    ],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(
    "raw",
    [True, False, -1, "-1s", "1d", "s", "", "1 minute", None, [1], float("nan"), float("inf")],
)
def test_bad_durations(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (4096, 4096),
        ("512B", 512),
        ("64KiB", 65536),
        ("8MiB", 8 << 20),
        ("1GiB", 1 << 30),
        ("64KB", 64000),
        ("2MB", 2_000_000),
        ("1GB", 10**9),
    ],
)
def test_sizes(raw: object, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", [True, -1, "64k", "64 kib", "1.5MiB", "MiB", 1.5, None])
def test_bad_sizes(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_size(raw)


def test_timeouts_by_type_longest_prefix_wins() -> None:
    cfg = parse_config(
        with_(
            timeouts={
                "idle": "30s",
                "upstream_first_byte": "10s",
                "by_type": {
                    "video/": {"idle": "60s"},
                    "video/mp4": {"idle": "90s", "max_duration": "1h"},
                    "image/": {"upstream_first_byte": "2s"},
                },
            }
        )
    )
    t = cfg.timeouts
    assert (
        t.for_content_type("video/webm").idle,
        t.for_content_type("video/webm").max_duration,
    ) == (
        60.0,
        0.0,
    )
    mp4 = t.for_content_type("VIDEO/MP4")
    assert (mp4.idle, mp4.max_duration, mp4.upstream_first_byte) == (90.0, 3600.0, 10.0)
    png = t.for_content_type("image/png")
    assert (png.idle, png.upstream_first_byte) == (30.0, 2.0)
    assert t.for_content_type(None).idle == 30.0


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}: line 3, column 1: invalid YAML: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.lines() == [
        f"{tmp_path / 'nope.yaml'}: cannot read file: No such file or directory"
    ]


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines() == [f"{path}: (top level): expected a mapping of sections"]
