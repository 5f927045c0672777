"""The CLI lifts the soft descriptor limit: a spliced stream needs up to six."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from proxy.cli import raise_fd_limit


@pytest.fixture
def restored_limit() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_soft_limit_is_raised_to_the_hard_one(restored_limit: tuple[int, int]) -> None:
    _, hard = restored_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert raise_fd_limit() == expected
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expected, hard)


def test_a_soft_limit_already_at_the_hard_one_is_kept(restored_limit: tuple[int, int]) -> None:
    _, hard = restored_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert raise_fd_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
