"""The tests' own verifier of Agora RTC tokens, version 006 ("AccessToken").

Written from the format (shared/AGORA-NOTES.md), independently of the
``agora-token-builder`` package the server uses, and checked against the
fixed vectors of Agora's own tests (AgoraIO/Tools, DynamicKey/AgoraDynamicKey:
python3 test/AccessTokenTest.py and nodejs test/AccessTokenTest.js) in
tests/unit/test_calls_agora.py.

Layout, all integers little-endian::

    token   = "006" + app_id (32 chars) + base64(content)
    content = u16 len + signature (32 bytes, HMAC-SHA256)
              u32 crc32(channel)  u32 crc32(uid string)
              u16 len + message
    message = u32 salt  u32 ts  u16 n  n x (u16 privilege, u32 expiry)

The signature is HMAC-SHA256, keyed by the app certificate, over
``app_id + channel + uid string + message``; uid 0 is the empty string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "JOIN_CHANNEL",
    "PUBLISHER_PRIVILEGES",
    "PUBLISH_AUDIO",
    "PUBLISH_DATA",
    "PUBLISH_VIDEO",
    "DecodedToken",
    "TokenInvalid",
    "decode_token",
    "verify_token",
]

JOIN_CHANNEL = 1
PUBLISH_AUDIO = 2
PUBLISH_VIDEO = 3
PUBLISH_DATA = 4
PUBLISHER_PRIVILEGES = frozenset({JOIN_CHANNEL, PUBLISH_AUDIO, PUBLISH_VIDEO, PUBLISH_DATA})

_VERSION = "006"
_APP_ID_CHARS = 32


class TokenInvalid(AssertionError):
    """The token is malformed or does not verify."""


@dataclass(frozen=True)
class DecodedToken:
    app_id: str
    signature: bytes
    crc_channel: int
    crc_uid: int
    message: bytes
    salt: int
    ts: int
    # privilege id -> expiry (unix seconds), in token order.
    privileges: dict[int, int]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise TokenInvalid("token content is truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def blob(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> bool:
        return self._pos == len(self._data)


def decode_token(token: str) -> DecodedToken:
    """Parse a 006 token without checking its signature."""
    if not token.startswith(_VERSION):
        raise TokenInvalid(f"not a 006 token: {token[:3]!r}")
    app_id = token[3 : 3 + _APP_ID_CHARS]
    if len(app_id) != _APP_ID_CHARS:
        raise TokenInvalid("token too short for an app id")
    try:
        content = base64.b64decode(token[3 + _APP_ID_CHARS :], validate=True)
    except binascii.Error as exc:
        raise TokenInvalid(f"token content is not base64: {exc}") from None
    reader = _Reader(content)
    signature = reader.blob()
    crc_channel = reader.u32()
    crc_uid = reader.u32()
    message = reader.blob()
    if not reader.done():
        raise TokenInvalid("trailing bytes after the message")
    inner = _Reader(message)
    salt = inner.u32()
    ts = inner.u32()
    privileges: dict[int, int] = {}
    for _ in range(inner.u16()):
        privilege = inner.u16()
        privileges[privilege] = inner.u32()
    if not inner.done():
        raise TokenInvalid("trailing bytes after the privileges")
    return DecodedToken(app_id, signature, crc_channel, crc_uid, message, salt, ts, privileges)


def _uid_text(uid: int) -> str:
    return "" if uid == 0 else str(uid)


def verify_token(
    token: str,
    *,
    app_id: str,
    certificate: str,
    channel: str,
    uid: int,
    expires_at: int | None = None,
    privileges: frozenset[int] = PUBLISHER_PRIVILEGES,
) -> DecodedToken:
    """Check everything a 006 token claims; raise :class:`TokenInvalid` if any fails.

    Checks the app id, the HMAC-SHA256 signature keyed by ``certificate``, the
    CRCs of ``channel`` and ``uid``, that the privileges are exactly
    ``privileges`` and sorted by id, and, when ``expires_at`` is given, that
    every privilege expires exactly then.
    """
    decoded = decode_token(token)
    if decoded.app_id != app_id:
        raise TokenInvalid(f"app id {decoded.app_id!r} != {app_id!r}")
    uid_text = _uid_text(uid)
    signed = app_id.encode() + channel.encode() + uid_text.encode() + decoded.message
    expected = hmac.new(certificate.encode(), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, decoded.signature):
        raise TokenInvalid("signature does not match (certificate, channel, uid or message)")
    if decoded.crc_channel != zlib.crc32(channel.encode()) & 0xFFFFFFFF:
        raise TokenInvalid("channel CRC mismatch")
    if decoded.crc_uid != zlib.crc32(uid_text.encode()) & 0xFFFFFFFF:
        raise TokenInvalid("uid CRC mismatch")
    ids = list(decoded.privileges)
    if ids != sorted(ids):
        raise TokenInvalid(f"privileges not sorted by id: {ids}")
    if set(ids) != set(privileges):
        raise TokenInvalid(f"privileges {sorted(ids)} != {sorted(privileges)}")
    if expires_at is not None:
        wrong = {p: e for p, e in decoded.privileges.items() if e != expires_at}
        if wrong:
            raise TokenInvalid(f"privilege expiries {wrong} != {expires_at}")
    return decoded
