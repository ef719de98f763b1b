"""Agora RTC tokens (version 006) for accepted calls.

Built with the ``agora-token-builder`` package (shared/AGORA-NOTES.md), which
validates nothing, so everything is checked here before building:

* the channel is derived from the call id (``call_<32 hex>``, 37 bytes: under
  Agora's 64-byte limit, in its safe alphabet);
* uids are nonzero and below 2^31 (below Agora's 2^32 limit, and positive in
  the SDKs that hold a uid in a signed 32-bit int);
* the privilege expiry is an absolute unix time, now + the configured
  lifetime (a 006 token never outlives 24 h anyway, hence the 86400 s cap in
  the settings).

The certificate is a :class:`~signaling.config.Secret` until the moment a
token is signed; it never reaches a reply, a log line or an error. Tokens
leave only in RPC replies: never in publications, history or the call-events
stream, and never in logs.
"""

from __future__ import annotations

import re

from agora_token_builder.RtcTokenBuilder import Role_Publisher, RtcTokenBuilder

from signaling.config import ConfigError, Secret, Settings
from signaling.values import record

__all__ = [
    "CHANNEL_PREFIX",
    "MAX_CHANNEL_BYTES",
    "MAX_UID",
    "RtcGrant",
    "TokenIssuer",
    "channel_name",
]

CHANNEL_PREFIX = "call_"
MAX_CHANNEL_BYTES = 63
MAX_UID = 2**31 - 1
# Agora app ids and certificates are 32 hexadecimal characters.
_CREDENTIAL_RE = re.compile(r"[0-9a-fA-F]{32}")
# Agora's channel-name alphabet (AGORA-NOTES: a-z A-Z 0-9 space and punctuation).
_CHANNEL_RE = re.compile(r"[a-zA-Z0-9 !#$%&()+\-:;<=.>?@\[\]^_{}|~,]{1,63}")


def channel_name(call_id: str) -> str:
    """The Agora channel of a call; ValueError if it would not be a valid one."""
    channel = CHANNEL_PREFIX + call_id
    if len(channel.encode()) > MAX_CHANNEL_BYTES or not _CHANNEL_RE.fullmatch(channel):
        raise ValueError("call id does not make a valid Agora channel name")
    return channel


@record
class RtcGrant:
    """What a participant needs to join the call's Agora channel.

    ``repr`` leaves the token out, so a stray log of a grant leaks nothing.
    """

    app_id: str
    channel: str
    uid: int
    token: str
    # Unix seconds when the token's privileges expire.
    expires_at: int

    def __repr__(self) -> str:
        return (
            f"RtcGrant(app_id={self.app_id!r}, channel={self.channel!r}, uid={self.uid}, "
            f"token='***', expires_at={self.expires_at})"
        )


class TokenIssuer:
    """Signs publisher tokens with the app certificate.

    Args:
        app_id: the Agora project's app id (public), or None.
        certificate: its app certificate, or None.
        ttl_s: token lifetime in seconds.

    Raises:
        ConfigError: an app id or certificate that is not 32 hex characters
            (named by its environment variable; the value is never echoed).
    """

    def __init__(self, app_id: str | None, certificate: Secret | None, ttl_s: float) -> None:
        if app_id is not None and not _CREDENTIAL_RE.fullmatch(app_id):
            raise ConfigError("AGORA_APP_ID", "must be 32 hexadecimal characters")
        if certificate is not None and not _CREDENTIAL_RE.fullmatch(certificate.value):
            raise ConfigError("AGORA_APP_CERTIFICATE", "must be 32 hexadecimal characters")
        self._app_id = app_id
        self._certificate = certificate
        self.ttl_s = int(ttl_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenIssuer:
        return cls(
            settings.agora_app_id, settings.agora_app_certificate, settings.agora_token_ttl_s
        )

    @property
    def configured(self) -> bool:
        """Tokens need both the app id and the certificate."""
        return self._app_id is not None and self._certificate is not None

    def issue(self, channel: str, uid: int, now_s: int, *, until_s: int | None = None) -> RtcGrant:
        """A publisher token for ``uid`` in ``channel``, valid until now + ttl, or
        until ``until_s`` if that is sooner (Agora removes a user from the channel
        when the token expires: a call's token must not outlast the call).

        Raises:
            RuntimeError: not configured (check :attr:`configured` first).
            ValueError: an invalid channel or uid.
        """
        if self._app_id is None or self._certificate is None:
            raise RuntimeError("Agora credentials are not configured")
        if not _CHANNEL_RE.fullmatch(channel) or len(channel.encode()) > MAX_CHANNEL_BYTES:
            raise ValueError("invalid Agora channel name")
        if not 0 < uid <= MAX_UID:
            raise ValueError("Agora uid out of range")
        expires_at = now_s + self.ttl_s
        if until_s is not None:
            expires_at = max(now_s + 1, min(expires_at, until_s))
        token = RtcTokenBuilder.buildTokenWithUid(
            self._app_id, self._certificate.value, channel, uid, Role_Publisher, expires_at
        )
        return RtcGrant(self._app_id, channel, uid, str(token), expires_at)
