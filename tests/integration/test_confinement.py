"""Keys never leave their storage (SPEC §3): raw request targets, symlinks, the S3 prefix.

Targets go out byte for byte over a raw socket, so no client normalises `..` or `%2e`
first. Whatever the status, the real assertion is that the secret's bytes (a file beside
the disk root; S3 objects outside the `uploads/` prefix) appear nowhere in the response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BUCKET, FILES, S3_SECRET_KEYS, SECRET_BYTES, S3Server
from tests.integration import rawhttp

pytestmark = pytest.mark.asyncio(loop_scope="session")

BAD_REQUEST = {"error": "bad_request"}
NOT_FOUND = {"error": "not_found"}

# target -> the status SPEC §3 requires.
DISK_TARGETS: dict[bytes, int] = {
    # `..` segments, plain and percent-encoded (decoded exactly once)
    b"/media/../secret": 400,
    b"/media/../secret.txt": 400,
    b"/media/%2e%2e/secret": 400,
    b"/media/%2E%2E/secret": 400,
    b"/media/.%2e/secret": 400,
    b"/media/%2e%2e%2fsecret": 400,
    b"/media/..%2fsecret": 400,
    b"/media/..%2Fsecret": 400,
    b"/media/a/../../secret": 400,
    b"/media/sub/%2e%2e/%2e%2e/secret": 400,
    b"/media/./../secret": 400,
    b"/media/../../../../../../etc/passwd": 400,
    b"/media/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd": 400,
    b"/media/..": 400,
    b"/media/.": 400,
    # dot segments that would stay inside the root are refused too, not normalised
    b"/media/sub/../one.bin": 400,
    b"/media/sub/./dir/nested.bin": 400,
    # NUL and other control characters
    b"/media/%00": 400,
    b"/media/secret%00": 400,
    b"/media/one.bin%00.png": 400,
    b"/media/one%0a.bin": 400,
    b"/media/one%0d.bin": 400,
    b"/media/one%1f.bin": 400,
    b"/media/one%7f.bin": 400,
    # absolute paths and empty segments
    b"/media//etc/passwd": 400,
    b"/media/%2fetc%2fpasswd": 400,
    b"/media/%2Fetc/passwd": 400,
    b"/media/sub//dir/nested.bin": 400,
    b"/media/sub%2f%2fdir/nested.bin": 400,
    # decoded once: "%2e%2e" stays a literal (missing) name
    b"/media/%252e%252e/secret": 404,
    b"/media/%252e%252e%252fsecret": 404,
    # symlinks leaving the root
    b"/media/escape.txt": 404,
    b"/media/escape-dir/secret": 404,
    b"/media/escape-dir/secret.txt": 404,
}
# A backslash is an ordinary character in a POSIX name: refused or not found, never served.
BACKSLASH_TARGETS = [
    b"/media/..\\secret",
    b"/media/..%5csecret",
    b"/media/..%5Csecret",
    b"/media/%5c..%5csecret",
    b"/media/sub\\..\\..\\secret",
    b"/media/..%5c..%5cetc%5cpasswd",
    b"/s3/..%5csecret.txt",
    b"/s3/..\\secret.txt",
    b"/s3/..%5cother%5csecret.txt",
]
S3_TARGETS: dict[bytes, int] = {
    b"/s3/../secret.txt": 400,
    b"/s3/%2e%2e/secret.txt": 400,
    b"/s3/%2e%2e%2fsecret.txt": 400,
    b"/s3/%2e%2e%2fother%2fsecret.txt": 400,
    b"/s3/..%2fother/secret.txt": 400,
    b"/s3/..%2fuploadsecret.txt": 400,
    b"/s3/sub/../../secret.txt": 400,
    b"/s3/./secret.txt": 400,
    b"/s3//secret.txt": 400,
    b"/s3/%2fsecret.txt": 400,
    b"/s3/%2Fother%2Fsecret.txt": 400,
    b"/s3/secret.txt%00": 400,
    b"/s3/%00/../secret.txt": 400,
    # inside the prefix these names do not exist: uploads/secret.txt, uploads/other/...
    b"/s3/secret.txt": 404,
    b"/s3/other/secret.txt": 404,
    b"/s3/%252e%252e/secret.txt": 404,
}


def assert_no_secret(resp: rawhttp.RawResponse) -> None:
    assert SECRET_BYTES not in resp.wire
    assert SECRET_BYTES.strip() not in resp.wire
    assert b"root:x:" not in resp.wire
    assert b"Traceback" not in resp.wire


async def test_the_secrets_exist(media_root: Path, s3_server: S3Server) -> None:
    """Sanity: the files these tests guard exactly where an escape would find them."""
    assert (media_root.parent / "secret").read_bytes() == SECRET_BYTES
    assert (media_root / "escape.txt").read_bytes() == SECRET_BYTES  # through the symlink
    assert (media_root / "escape-dir" / "secret").read_bytes() == SECRET_BYTES
    for key in S3_SECRET_KEYS:
        body = s3_server.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert body == SECRET_BYTES


@pytest.mark.parametrize(
    ("target", "status"),
    [*DISK_TARGETS.items(), *S3_TARGETS.items()],
    ids=lambda v: v.decode("latin-1") if isinstance(v, bytes) else str(v),
)
async def test_hostile_target_is_refused(app_server: Any, target: bytes, status: int) -> None:
    for method in ("GET", "HEAD"):
        resp = await rawhttp.request(app_server.port, target, method, {"Range": "bytes=0-"})
        assert_no_secret(resp)
        assert resp.status == status, (method, resp.status, resp.body[:200])
        if method == "GET":
            assert resp.header("Content-Type") == "application/json"
            assert json.loads(resp.body) == (BAD_REQUEST if status == 400 else NOT_FOUND)


@pytest.mark.parametrize("target", BACKSLASH_TARGETS, ids=lambda t: t.decode("latin-1"))
async def test_backslash_target_is_refused(app_server: Any, target: bytes) -> None:
    resp = await rawhttp.request(app_server.port, target)
    assert_no_secret(resp)
    assert resp.status in (400, 404), resp.status
    assert json.loads(resp.body) in (BAD_REQUEST, NOT_FOUND)


async def test_symlink_inside_the_root_is_served(app_server: Any) -> None:
    resp = await rawhttp.request(app_server.port, b"/media/alias.bin")
    assert (resp.status, resp.body) == (200, FILES["one.bin"])
    resp = await rawhttp.request(
        app_server.port, b"/media/alias.bin", headers={"Range": "bytes=0-0"}
    )
    assert (resp.status, resp.body) == (206, FILES["one.bin"])


async def test_symlink_leaving_the_root_is_404_for_every_method_and_range(app_server: Any) -> None:
    for headers in ({}, {"Range": "bytes=0-4"}, {"Range": "bytes=0-1,3-4"}, {"If-None-Match": "*"}):
        for method in ("GET", "HEAD"):
            resp = await rawhttp.request(app_server.port, b"/media/escape.txt", method, headers)
            assert_no_secret(resp)
            assert resp.status == 404, (method, headers)
