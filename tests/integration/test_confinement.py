"""Keys never escape their storage (SPEC §3): raw request targets, symlinks, S3 prefixes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import FILES, SECRET_BYTES, SidecarProcess
from tests.integration.httpclient import raw_request, request

HOSTILE_TARGETS = [
    b"/media/../secret.txt",
    b"/media/%2e%2e/secret.txt",
    b"/media/%2E%2E/secret.txt",
    b"/media/%2e%2e%2fsecret.txt",
    b"/media/..%2fsecret.txt",
    b"/media/..%2Fsecret.txt",
    b"/media/sub/../../secret.txt",
    b"/media/sub/%2e%2e/%2e%2e/secret.txt",
    b"/media/./../secret.txt",
    b"/media//etc/passwd",
    b"/media/%2fetc%2fpasswd",
    b"/media/%2Fetc/passwd",
    b"/media/secret.txt%00.png",
    b"/media/%00",
    b"/media/..\\secret.txt",
    b"/media/..%5csecret.txt",
    b"/media/escape-dir/secret.txt",
    b"/media/%252e%252e/secret.txt",
    b"/s3/../secret.txt",
    b"/s3/%2e%2e/secret.txt",
    b"/s3/%2e%2e%2fother%2fsecret.txt",
    b"/s3/..%2fuploadsecret.txt",
    b"/s3//secret.txt",
    b"/s3/%2fsecret.txt",
    b"/s3/secret.txt%00",
    b"/media/../../../../../../etc/passwd",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS, ids=lambda t: t.decode("latin-1"))
def test_hostile_targets_never_escape(sidecar: SidecarProcess, target: bytes) -> None:
    reply = raw_request(sidecar.port, target)
    assert reply.status in (400, 404), reply
    assert SECRET_BYTES not in reply.body
    assert b"root:" not in reply.body
    assert json.loads(reply.body)["error"] in ("bad_request", "not_found")


def test_dot_segments_are_rejected_not_normalised(sidecar: SidecarProcess) -> None:
    # A client that does not normalise must not reach a *different* file inside the root.
    assert raw_request(sidecar.port, b"/media/sub/../one.bin").status == 400
    assert raw_request(sidecar.port, b"/s3/sub/../one.bin").status == 400


def test_symlink_leaving_the_root_is_404(sidecar: SidecarProcess) -> None:
    reply = request(sidecar.port, "GET", "/media/escape.txt")
    assert reply.status == 404
    assert SECRET_BYTES not in reply.body


def test_symlink_inside_the_root_is_served(sidecar: SidecarProcess) -> None:
    reply = request(sidecar.port, "GET", "/media/alias.bin")
    assert (reply.status, reply.body) == (200, FILES["one.bin"])


def test_s3_keys_are_prefixed(sidecar: SidecarProcess) -> None:
    # "secret.txt" exists at the bucket root, outside the storage's "uploads/" prefix.
    reply = request(sidecar.port, "GET", "/s3/secret.txt")
    assert reply.status == 404
    assert SECRET_BYTES not in reply.body


def test_disk_etag_changes_when_the_file_changes(sidecar: SidecarProcess, media_root: Path) -> None:
    path = media_root / "mutable" / "file.bin"
    path.write_bytes(b"a" * 100)
    first = request(sidecar.port, "GET", "/media/mutable/file.bin")
    time.sleep(0.02)  # file times tick with the kernel clock, a few ms at most
    path.write_bytes(b"b" * 100)  # same size, rewritten in place
    second = request(sidecar.port, "GET", "/media/mutable/file.bin")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"c" * 100)
    os.utime(tmp, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))  # even same mtime
    os.replace(tmp, path)  # atomic replacement: a new inode
    third = request(sidecar.port, "GET", "/media/mutable/file.bin")
    assert [r.body for r in (first, second, third)] == [b"a" * 100, b"b" * 100, b"c" * 100]
    etags = [r.header("ETag") for r in (first, second, third)]
    assert len(set(etags)) == 3, etags
    # The old validator no longer matches: a conditional GET with it gets the new bytes.
    stale = request(
        sidecar.port, "GET", "/media/mutable/file.bin", {"If-None-Match": etags[0] or ""}
    )
    assert (stale.status, stale.body) == (200, b"c" * 100)
