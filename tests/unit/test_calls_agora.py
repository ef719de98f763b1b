"""Agora 006 tokens: the tests' verifier against Agora's published vectors, and
the server's issuer (handlers.calls.agora) against the verifier."""

from __future__ import annotations

import time

import pytest

from handlers.calls.agora import MAX_UID, TokenIssuer, channel_name
from signaling.config import ConfigError, Secret
from support.agora import (
    JOIN_CHANNEL,
    PUBLISHER_PRIVILEGES,
    TokenInvalid,
    decode_token,
    verify_token,
)

# Fixed inputs of Agora's own token tests (AgoraIO/Tools, DynamicKey/AgoraDynamicKey:
# python3/test/AccessTokenTest.py, nodejs/test/AccessTokenTest.js): salt 1, ts 1111111.
APP_ID = "970CA35de60c44645bbae8a215061b33"
CERTIFICATE = "5CFd2fd1755d40ecb72977518be15d3b"
CHANNEL = "7d72365eb983485397e3e3f9d460bdda"
UID = 2882341273
EXPIRE = 1446455471
# Join privilege only, uid 2882341273 (python3 and nodejs tests).
VECTOR_JOIN = (
    "006970CA35de60c44645bbae8a215061b33IACV0fZUBw+72cVoL9eyGGh3Q6Poi8bgjwVLnyKSJyOXR7dIfRBXoFHlE"
    "AABAAAAR/QQAAEAAQCvKDdW"
)
# Same, uid 0 (signed as the empty string).
VECTOR_UID0 = (
    "006970CA35de60c44645bbae8a215061b33IACw1o7htY6ISdNRtku3p9tjTPi0jCKf9t49UHJhzCmL6bdIfRAAAAAAE"
    "AABAAAAR/QQAAEAAQCvKDdW"
)
# Publisher role: privileges 1-4 (nodejs RTCTokenBuilder test).
VECTOR_PUBLISHER = (
    "006970CA35de60c44645bbae8a215061b33IACMv3I+fsRSejxy6luEwzA/1t/zbEHWfJCJ5m8ssFP/fLdIfRBXoFHl"
    "IgABAAAAR/QQAAQAAQCvKDdWAgCvKDdWAwCvKDdWBACvKDdW"
)

TEST_APP_ID = "0123456789abcdef0123456789abcdef"
TEST_CERT = "fedcba9876543210fedcba9876543210"


# --------------------------------------------------------------------------- verifier


def test_verifier_accepts_agora_vector_join_only() -> None:
    decoded = verify_token(
        VECTOR_JOIN,
        app_id=APP_ID,
        certificate=CERTIFICATE,
        channel=CHANNEL,
        uid=UID,
        expires_at=EXPIRE,
        privileges=frozenset({JOIN_CHANNEL}),
    )
    assert (decoded.salt, decoded.ts) == (1, 1111111)
    assert decoded.privileges == {JOIN_CHANNEL: EXPIRE}


def test_verifier_accepts_agora_vector_uid_zero() -> None:
    verify_token(
        VECTOR_UID0,
        app_id=APP_ID,
        certificate=CERTIFICATE,
        channel=CHANNEL,
        uid=0,
        expires_at=EXPIRE,
        privileges=frozenset({JOIN_CHANNEL}),
    )


def test_verifier_accepts_agora_vector_publisher() -> None:
    decoded = verify_token(
        VECTOR_PUBLISHER,
        app_id=APP_ID,
        certificate=CERTIFICATE,
        channel=CHANNEL,
        uid=UID,
        expires_at=EXPIRE,
    )
    assert list(decoded.privileges) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("certificate", "5CFd2fd1755d40ecb72977518be15d3c"),
        ("channel", CHANNEL + "x"),
        ("uid", UID + 1),
        ("uid", 0),
        ("app_id", "970CA35de60c44645bbae8a215061b34"),
        ("expires_at", EXPIRE + 1),
        ("privileges", frozenset({JOIN_CHANNEL})),
    ],
)
def test_verifier_refuses_any_wrong_claim(field: str, value: object) -> None:
    claims: dict[str, object] = {
        "app_id": APP_ID,
        "certificate": CERTIFICATE,
        "channel": CHANNEL,
        "uid": UID,
        "expires_at": EXPIRE,
        "privileges": PUBLISHER_PRIVILEGES,
    }
    claims[field] = value
    with pytest.raises(TokenInvalid):
        verify_token(VECTOR_PUBLISHER, **claims)  # type: ignore[arg-type]


def test_verifier_refuses_tampered_and_malformed_tokens() -> None:
    # Change the first privilege's expiry byte: the signature no longer matches.
    decoded = decode_token(VECTOR_PUBLISHER)
    assert decoded.privileges[JOIN_CHANNEL] == EXPIRE
    tampered = VECTOR_PUBLISHER[:-1] + ("X" if VECTOR_PUBLISHER[-1] != "X" else "Y")
    for bad in (tampered, "007" + VECTOR_PUBLISHER[3:], VECTOR_PUBLISHER[:60], "006" + "a" * 10):
        with pytest.raises(TokenInvalid):
            verify_token(bad, app_id=APP_ID, certificate=CERTIFICATE, channel=CHANNEL, uid=UID)


# --------------------------------------------------------------------------- issuer


def test_issuer_builds_a_publisher_token_that_verifies() -> None:
    issuer = TokenIssuer(TEST_APP_ID, Secret(TEST_CERT), 3600)
    assert issuer.configured
    now = int(time.time())
    channel = channel_name("0123456789abcdef0123456789abcdef")
    grant = issuer.issue(channel, 12345, now)
    assert grant.expires_at == now + 3600
    assert (grant.app_id, grant.channel, grant.uid) == (TEST_APP_ID, channel, 12345)
    decoded = verify_token(
        grant.token,
        app_id=TEST_APP_ID,
        certificate=TEST_CERT,
        channel=channel,
        uid=12345,
        expires_at=now + 3600,
    )
    # A 006 token's ts is issue time + 24 h (AGORA-NOTES).
    assert abs(decoded.ts - (now + 86400)) <= 2
    # Random salt: two tokens for the same inputs differ, both verify.
    again = issuer.issue(channel, 12345, now)
    assert again.token != grant.token
    verify_token(again.token, app_id=TEST_APP_ID, certificate=TEST_CERT, channel=channel, uid=12345)
    assert TEST_CERT not in grant.token
    assert grant.token not in repr(grant) and "***" in repr(grant)


def test_issuer_cuts_the_lifetime_at_the_given_end() -> None:
    issuer = TokenIssuer(TEST_APP_ID, Secret(TEST_CERT), 3600)
    now = int(time.time())
    assert issuer.issue("call_x", 7, now, until_s=now + 90).expires_at == now + 90
    # A later end than the lifetime does not lengthen it...
    assert issuer.issue("call_x", 7, now, until_s=now + 7200).expires_at == now + 3600
    # ...and an end already reached still gives a token that expires, not one of 1970.
    grant = issuer.issue("call_x", 7, now, until_s=now - 5)
    assert grant.expires_at == now + 1
    verify_token(
        grant.token, app_id=TEST_APP_ID, certificate=TEST_CERT, channel="call_x", uid=7,
        expires_at=now + 1,
    )  # fmt: skip


def test_issuer_validates_before_building() -> None:
    issuer = TokenIssuer(TEST_APP_ID, Secret(TEST_CERT), 600)
    now = int(time.time())
    for uid in (0, -1, MAX_UID + 1, 2**32):
        with pytest.raises(ValueError):
            issuer.issue("call_x", uid, now)
    for channel in ("", "a" * 64, "bad/name", "é"):
        with pytest.raises(ValueError):
            issuer.issue(channel, 1, now)


def test_issuer_not_configured_and_bad_credentials() -> None:
    assert not TokenIssuer(None, None, 600).configured
    assert not TokenIssuer(TEST_APP_ID, None, 600).configured
    with pytest.raises(RuntimeError):
        TokenIssuer(TEST_APP_ID, None, 600).issue("call_x", 1, 0)
    with pytest.raises(ConfigError) as err:
        TokenIssuer("not-an-app-id", Secret(TEST_CERT), 600)
    assert err.value.setting == "AGORA_APP_ID"
    with pytest.raises(ConfigError) as err:
        TokenIssuer(TEST_APP_ID, Secret("secret-but-too-short"), 600)
    assert err.value.setting == "AGORA_APP_CERTIFICATE"
    assert "secret-but-too-short" not in str(err.value)


def test_channel_name_is_short_and_safe() -> None:
    channel = channel_name("0123456789abcdef0123456789abcdef")
    assert channel == "call_0123456789abcdef0123456789abcdef"
    assert len(channel.encode()) < 64
    with pytest.raises(ValueError):
        channel_name("x" * 64)
