"""Route matching and key confinement (SPEC §3: keys are confined, decoded once)."""

from __future__ import annotations

import pytest

from proxy.config import RouteConfig
from proxy.errors import BadRequest, NotFound
from proxy.resolver.lookup import check_columns
from proxy.resolver.path import PathResolver, confine_key

ROUTES = (
    RouteConfig(prefix="/media/thumbs/", storage="thumbs"),
    RouteConfig(prefix="/media/", storage="local"),
    RouteConfig(prefix="/s3/", storage="uploads"),
)


@pytest.mark.parametrize(
    ("raw", "storage", "key"),
    [
        ("/media/a.jpg", "local", "a.jpg"),
        ("/media/thumbs/a.jpg", "thumbs", "a.jpg"),  # first matching prefix wins
        ("/s3/dir/sub/v.mp4?x=1", "uploads", "dir/sub/v.mp4"),  # query is not part of the key
        ("/media/with%20space.txt", "local", "with space.txt"),
        ("/media/caf%C3%A9.png", "local", "café.png"),
        ("/media/a%2Fb.txt", "local", "a/b.txt"),  # %2F is an ordinary separator once decoded
        ("/media/%252e%252e", "local", "%2e%2e"),  # decoded once only: a literal name
    ],
)
def test_resolves_prefix_and_decodes_once(raw: str, storage: str, key: str) -> None:
    resolved = PathResolver(ROUTES).resolve(raw)
    assert (resolved.route.storage, resolved.key) == (storage, key)


@pytest.mark.parametrize("raw", ["/", "/other/a.jpg", "/medi", "/MEDIA/a.jpg"])
def test_unrouted_paths_are_not_found(raw: str) -> None:
    with pytest.raises(NotFound):
        PathResolver(ROUTES).resolve(raw)


@pytest.mark.parametrize(
    "raw_key",
    [
        "..",
        "../secret",
        "a/../../secret",
        "%2e%2e/secret",
        "%2e%2e%2fsecret",
        "..%2fsecret",
        "a/./b",
        "a//b",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "a%00b",
        "a%0ab",
        "a%7fb",
        "a/",
        "%ff%fe",  # not UTF-8
        "x" * 1025,
        "a\\..\\b",  # backslashes separate paths on some storages
        "..%5csecret",
    ],
)
def test_hostile_keys_are_refused(raw_key: str) -> None:
    with pytest.raises(BadRequest):
        confine_key(raw_key)


def test_empty_key_is_not_found() -> None:
    with pytest.raises(NotFound):
        confine_key("")


@pytest.mark.parametrize("raw_key", ["a..b", "..a", "a..", ".hidden", "x" * 1024])
def test_dots_inside_names_are_ordinary(raw_key: str) -> None:
    assert confine_key(raw_key) == raw_key


def test_a_lookup_column_returned_twice_is_refused() -> None:
    assert check_columns(["storage", "key", "key"]) == ["column 'key' returned more than once"]
