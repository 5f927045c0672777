"""The `fake_s3` fixture: a fresh fault-injecting S3 endpoint per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.fake_s3 import FakeS3


@pytest.fixture
def fake_s3() -> Iterator[FakeS3]:
    """A `FakeS3` on an ephemeral 127.0.0.1 port, bucket "media"; stopped after the test.

    For a server shared by a module (e.g. with a sidecar subprocess pointed at it), use
    `with FakeS3() as s3:` in a module fixture and `s3.reset()` between tests.
    """
    with FakeS3() as fake:
        yield fake
    assert not fake.errors, f"the fake S3 itself failed: {fake.errors!r}"
