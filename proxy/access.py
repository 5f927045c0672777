"""Who may read a route (SPEC §7): everyone, signed URLs, or an identity vouched for by a
trusted hop. Checked after the id is resolved, so a row's `visibility` and `owner_id` count.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Final

from proxy.config import AccessConfig
from proxy.errors import Forbidden
from proxy.resolver.lookup import MediaRow, Querier
from proxy.signing import verify

PUBLIC: Final = "public"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessPolicy:
    """The access rule of one route."""

    def __init__(
        self, cfg: AccessConfig, *, keys: Sequence[bytes] = (), db: Querier | None = None
    ) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self._keys = tuple(keys)
        self._db = db
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cfg.trusted_proxies
        )

    def trusted(self, peer: str) -> bool:
        """Is the TCP peer one of `trusted_proxies`?"""
        return _in_networks(peer, self._trusted)

    def client_ip(self, peer: str, headers: Mapping[str, str]) -> str:
        """The client's address: the peer, or what a trusted proxy reports for it."""
        if self.trusted(peer):
            real = headers.get("X-Real-IP")
            if real:
                return real.strip()
            forwarded = headers.get("X-Forwarded-For")
            if forwarded:
                return forwarded.rsplit(",", 1)[-1].strip()
        return peer

    async def check(
        self,
        *,
        raw_path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        peer: str,
        row: MediaRow | None,
        media_id: str | None,
    ) -> None:
        """Return if the request may read; raise Forbidden with a short reason otherwise."""
        if self.mode == PUBLIC or (row is not None and row.visibility == PUBLIC):
            return
        if self.mode == "signed":
            ip = self.client_ip(peer, headers) if self.cfg.bind_ip else None
            verify(raw_path, query, self._keys, now=time.time(), client_ip=ip)
            return
        user = headers.get(self.cfg.header)
        if user is not None and not self.trusted(peer):
            raise Forbidden("untrusted_peer")  # anyone can send the header; only hops vouch
        if not user:
            raise Forbidden("missing_identity")
        if self.cfg.allow_query is not None and self._db is not None:
            allowed = await self._db.fetch_one(
                self.cfg.allow_query, {"user": user, "id": media_id}, label="allow_query"
            )
            if allowed is None:
                raise Forbidden("not_allowed")
        elif row is not None and row.owner_id != user:
            raise Forbidden("not_owner")


@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in_networks(peer: str, networks: tuple[IPNetwork, ...]) -> bool:
    ip = _parse_ip(peer)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)
