"""Redis URLs: where and how to connect (``redis://``, ``rediss://``, ``unix://``)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

from signaling.state.redis import RedisArg

__all__ = ["RedisAddress", "parse_redis_url"]


# --- addresses --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect (from :func:`parse_redis_url`)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix socket
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: bool = False
    # rediss:// options, as redis-py reads them from the URL query.
    ssl_cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED
    ssl_check_hostname: bool = True
    ssl_ca_certs: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_ca_certs)
        context.check_hostname = self.ssl_check_hostname and self.ssl_cert_reqs != ssl.CERT_NONE
        context.verify_mode = self.ssl_cert_reqs
        return context

    def handshake(self) -> list[tuple[RedisArg, ...]]:
        """Commands every new connection sends first (AUTH, SELECT)."""
        commands: list[tuple[RedisArg, ...]] = []
        if self.password is not None:
            if self.username:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


_CERT_REQS: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or
    ``unix://[[user]:password@]/path``; ``?db=N`` wins over the path, and
    ``ssl_cert_reqs`` (none/optional/required), ``ssl_check_hostname`` and
    ``ssl_ca_certs`` are read as redis-py reads them. Other query arguments
    (redis-py pool options) are ignored.

    Raises:
        ValueError: another scheme, or a malformed port, db or option.
    """
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    db = int(query["db"]) if "db" in query else 0
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        return RedisAddress(path=unquote(parts.path), username=username, password=password, db=db)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"Redis URL must start with redis://, rediss:// or unix:// ({url!r})")
    if "db" not in query and parts.path.strip("/"):
        db = int(unquote(parts.path).strip("/"))
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"invalid ssl_cert_reqs {cert_reqs!r} in the Redis URL")
    return RedisAddress(
        host=unquote(parts.hostname or "127.0.0.1"),
        port=parts.port or 6379,
        username=username,
        password=password,
        db=db,
        tls=parts.scheme == "rediss",
        ssl_cert_reqs=_CERT_REQS[cert_reqs],
        ssl_check_hostname=query.get("ssl_check_hostname", "true").lower()
        not in ("0", "false", "f", "n", "no", "off"),
        ssl_ca_certs=query.get("ssl_ca_certs"),
    )
