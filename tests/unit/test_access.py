"""Access rules of a route: trusted hops, identities, owners, public rows; Content-Disposition."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from proxy.access import AccessPolicy
from proxy.config import AccessConfig
from proxy.errors import Forbidden
from proxy.mediatype import content_disposition
from proxy.resolver.lookup import MediaRow

PRIVATE = MediaRow(storage="local", key="a.bin", visibility="private", owner_id="u1")
PUBLIC = PRIVATE._replace(visibility="public")


class AllowQuery:
    """A database stand-in that records allow_query calls (the real one is in integration)."""

    def __init__(self, allowed: set[tuple[str, str | None]]) -> None:
        self.allowed = allowed
        self.calls: list[Mapping[str, object]] = []

    async def fetch_one(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> dict[str, object] | None:
        self.calls.append(params)
        return {"ok": 1} if (params["user"], params["id"]) in self.allowed else None

    async def fetch_value(
        self, query: str, params: Mapping[str, object], *, label: str
    ) -> object | None:
        raise AssertionError("access control reads rows, not values")

    async def columns(self, query: str, params: Mapping[str, object]) -> list[str]:
        return []


async def check(
    policy: AccessPolicy,
    *,
    peer: str = "127.0.0.1",
    headers: Mapping[str, str] | None = None,
    row: MediaRow | None = PRIVATE,
) -> str | None:
    try:
        await policy.check(
            raw_path="/api/media/1",
            query={},
            headers=headers or {},
            peer=peer,
            row=row,
            media_id="1",
        )
    except Forbidden as exc:
        return exc.reason
    return None


def trusted_header(**kw: object) -> AccessPolicy:
    return AccessPolicy(AccessConfig(mode="trusted_header", **kw))  # type: ignore[arg-type]


async def test_identity_from_a_trusted_hop_must_own_the_row() -> None:
    policy = trusted_header()
    assert await check(policy, headers={"X-User-Id": "u1"}) is None
    assert await check(policy, headers={"X-User-Id": "u2"}) == "not_owner"
    assert await check(policy, headers={}) == "missing_identity"
    assert await check(policy, headers={"X-User-Id": "u2"}, row=PUBLIC) is None


async def test_a_spoofed_header_from_an_untrusted_peer_is_refused() -> None:
    policy = trusted_header(trusted_proxies=("10.0.0.0/8",))
    assert await check(policy, peer="10.1.2.3", headers={"X-User-Id": "u1"}) is None
    assert await check(policy, peer="192.0.2.7", headers={"X-User-Id": "u1"}) == "untrusted_peer"
    assert await check(policy, peer="not-an-ip", headers={"X-User-Id": "u1"}) == "untrusted_peer"
    assert await check(policy, peer="::ffff:10.0.0.1", headers={"X-User-Id": "u1"}) is None


async def test_allow_query_decides_when_configured() -> None:
    db = AllowQuery({("u2", "1")})
    policy = AccessPolicy(
        AccessConfig(mode="trusted_header", allow_query="SELECT 1 WHERE %(user)s = %(id)s"), db=db
    )
    assert await check(policy, headers={"X-User-Id": "u2"}) is None
    assert await check(policy, headers={"X-User-Id": "u1"}) == "not_allowed"
    assert db.calls == [{"user": "u2", "id": "1"}, {"user": "u1", "id": "1"}]


def test_client_ip_trusts_forwarding_headers_only_from_trusted_hops() -> None:
    policy = trusted_header(trusted_proxies=("127.0.0.1/32",))
    forwarded = {"X-Forwarded-For": "198.51.100.9, 203.0.113.5"}
    assert policy.client_ip("127.0.0.1", forwarded) == "203.0.113.5"
    assert policy.client_ip("127.0.0.1", {"X-Real-IP": "203.0.113.8"}) == "203.0.113.8"
    assert policy.client_ip("192.0.2.1", forwarded) == "192.0.2.1"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "inline; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"),
        (
            "Café menu.pdf",
            "inline; filename=\"Caf_ menu.pdf\"; filename*=UTF-8''Caf%C3%A9%20menu.pdf",
        ),
        ('a"b\\c.txt', "inline; filename=\"a_b_c.txt\"; filename*=UTF-8''a%22b%5Cc.txt"),
        ("日本.png", "inline; filename=\"__.png\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.png"),
        (
            "line\r\nX-Evil: 1",
            "inline; filename=\"line__X-Evil: 1\"; filename*=UTF-8''line%0D%0AX-Evil%3A%201",
        ),
    ],
)
def test_content_disposition_has_an_ascii_fallback_and_utf8(name: str, expected: str) -> None:
    value = content_disposition(name)
    assert value == expected
    assert value.isascii() and "\r" not in value and "\n" not in value
