"""The DSN libpq gets: statement timeout, application name, and a host looked up for it."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Final

import psycopg2
import psycopg2.extensions

APPLICATION_NAME: Final = "media-sidecar"


def statement_dsn(dsn: str, statement_timeout_s: float) -> str:
    """The DSN with `-c statement_timeout=<ms>` added to its options (pitfalls P9)."""
    try:
        parsed = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise ValueError("invalid database DSN") from None  # the text may hold a password
    ms = max(1, round(statement_timeout_s * 1000))
    options = f"{parsed.get('options', '')} -c statement_timeout={ms}".strip()
    return str(
        psycopg2.extensions.make_dsn(
            dsn,
            options=options,
            client_encoding="UTF8",
            application_name=parsed.get("application_name", APPLICATION_NAME),
        )
    )


def host_to_resolve(dsn: str) -> str | None:
    """The one host name of the DSN that libpq would look up while blocking the loop.

    libpq resolves `host` inside PQconnectStart, synchronously, even in async mode; with
    `hostaddr` it does not. Lists, IP literals, socket directories and DSNs that already
    carry `hostaddr` are left to libpq.
    """
    parsed = psycopg2.extensions.parse_dsn(dsn)
    host = str(parsed.get("host") or "")
    if not host or "hostaddr" in parsed or "," in host or host.startswith(("/", "@")):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


async def resolve_dsn(dsn: str, host: str | None) -> str:
    """The DSN with `hostaddr` from a lookup in the executor, so libpq does not block."""
    if host is None:
        return dsn
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
    # One `host` entry per address, so libpq still tries each in turn (IPv6, then IPv4).
    return str(
        psycopg2.extensions.make_dsn(
            dsn, host=",".join([host] * len(addrs)), hostaddr=",".join(addrs)
        )
    )
