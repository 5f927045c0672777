"""`media-sidecar sign PATH --expires 1h`: the URL it prints verifies; mistakes exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from proxy.errors import Forbidden
from proxy.signing import verify
from tests.conftest import REPO

KEY = "a-signing-key-for-tests-only-0123456789"
CONFIG = {
    "storages": {"local": {"type": "disk", "root": "."}},
    "routes": [
        {
            "prefix": "/private/",
            "storage": "local",
            "access": {"mode": "signed", "keys_env": ["TEST_SIGN_KEY", "TEST_OLD_KEY"]},
        },
        {
            "prefix": "/bound/",
            "storage": "local",
            "access": {"mode": "signed", "keys_env": ["TEST_SIGN_KEY"], "bind_ip": True},
        },
        {"prefix": "/media/", "storage": "local"},
    ],
}


def sign(tmp_path: Path, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items() if k != "TEST_SIGN_KEY"}
    if key is not None:
        env["TEST_SIGN_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "proxy", "sign", *args, "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_sign_prints_a_url_the_sidecar_accepts(tmp_path: Path) -> None:
    done = sign(tmp_path, "/private/clip%20one.mp4", "--expires", "15m")
    assert done.returncode == 0, done.stderr
    url = urlsplit(done.stdout.strip())
    assert url.path == "/private/clip%20one.mp4"
    query = dict(parse_qsl(url.query))
    assert 14 * 60 <= int(query["expires"]) - time.time() <= 15 * 60 + 1
    verify(url.path, query, [KEY.encode()], now=time.time(), client_ip=None)
    with pytest.raises(Forbidden):  # only for that path
        verify("/private/other.mp4", query, [KEY.encode()], now=time.time(), client_ip=None)


def test_sign_binds_the_address_when_the_route_does(tmp_path: Path) -> None:
    assert sign(tmp_path, "/bound/a.bin").returncode == 2  # --ip is required there
    done = sign(tmp_path, "/bound/a.bin", "--ip", "203.0.113.7")
    assert done.returncode == 0, done.stderr
    url = urlsplit(done.stdout.strip())
    query = dict(parse_qsl(url.query))
    verify(url.path, query, [KEY.encode()], now=time.time(), client_ip="203.0.113.7")
    with pytest.raises(Forbidden):
        verify(url.path, query, [KEY.encode()], now=time.time(), client_ip="203.0.113.8")


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (("/media/a.bin",), KEY, "no route with access mode 'signed'"),
        (("/private/a.bin", "--expires", "soon"), KEY, "--expires"),
        (("/private/a.bin",), None, "TEST_SIGN_KEY"),
        (("/private/a.bin",), "short", "TEST_SIGN_KEY"),
        (("/private/a b.bin",), KEY, ""),  # not percent-encoded
        (("/private/a.bin", "--expires", "30d"), KEY, ""),  # longer than the 7-day bound
    ],
)
def test_sign_mistakes_exit_2_with_a_message(
    tmp_path: Path, args: tuple[str, ...], key: str | None, message: str
) -> None:
    done = sign(tmp_path, *args, key=key)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.strip()
    assert message in done.stderr
    if key == "short":
        assert "short" not in done.stderr  # the variable is named, never its value
