"""Token verification with real keys and a real local JWKS server (no mocks)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import RSAAlgorithm

from signaling.auth import (
    Credentials,
    KeysUnavailable,
    SubscriptionGrant,
    TokenError,
    TokenExpired,
    TokenVerifier,
    mint_token,
)
from signaling.config import Secret, Settings

SECRET = "unit-test-secret-" + "x" * 47  # 64 bytes: long enough for HS512
OTHER_SECRET = "another-secret-" + "y" * 49


# --- keys and token helpers --------------------------------------------------------------


def _public_pem(private_key: Any) -> str:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built without pyjwt, so it can be one pyjwt would refuse to sign."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return f"{signing_input}."
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


# The audience a JWKS configuration must name (config refuses a JWKS without one).
AUD = "digis-test"


def _claims(user: str | None = "alice", ttl_s: float = 60, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + int(ttl_s), **extra}
    if user is not None:
        claims["sub"] = user
    return claims


def _hs(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _signed(
    private_key: Any, algorithm: str, claims: dict[str, Any], kid: str | None = None
) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, private_key, algorithm=algorithm, headers=headers)


async def _refused(
    verify: Callable[[str], Awaitable[object]], token: str, error: type[TokenError] = TokenError
) -> TokenError:
    with pytest.raises(error) as info:
        await verify(token)
    if error is TokenError:
        assert not isinstance(info.value, TokenExpired)
    text = str(info.value)
    # The message never carries the token or any of its segments.
    for part in [token, *token.split(".")]:
        assert len(part) < 8 or part not in text
    return info.value


@pytest.fixture
async def hs_verifier() -> Any:
    verifier = TokenVerifier(Settings(jwt_secret=Secret(SECRET)))
    yield verifier
    await verifier.aclose()


# --- HMAC -----------------------------------------------------------------------------------


async def test_valid_hs256(hs_verifier: TokenVerifier) -> None:
    claims = _claims()
    credentials = await hs_verifier.verify_connection(_hs(claims))
    assert credentials == Credentials(
        user="alice", expires_at=float(claims["exp"]), info=None, name=None
    )


async def test_expired(hs_verifier: TokenVerifier) -> None:
    error = await _refused(hs_verifier.verify_connection, _hs(_claims(ttl_s=-60)), TokenExpired)
    assert isinstance(error, TokenError)


async def test_expiry_within_leeway_is_accepted(hs_verifier: TokenVerifier) -> None:
    # Default leeway is 5 s.
    credentials = await hs_verifier.verify_connection(_hs(_claims(ttl_s=-2)))
    assert credentials.user == "alice"


async def test_not_yet_valid(hs_verifier: TokenVerifier) -> None:
    token = _hs(_claims(nbf=int(time.time()) + 120))
    await _refused(hs_verifier.verify_connection, token)


async def test_wrong_key(hs_verifier: TokenVerifier) -> None:
    await _refused(hs_verifier.verify_connection, _hs(_claims(), OTHER_SECRET))


async def test_alg_none_is_refused(hs_verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        token = _hand_token({"alg": alg, "typ": "JWT"}, _claims(), None)
        await _refused(hs_verifier.verify_connection, token)


async def test_unlisted_algorithm_is_refused(hs_verifier: TokenVerifier) -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS512")
    await _refused(hs_verifier.verify_connection, token)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "...", "a.b", "eyJhbGciOiJIUzI1NiJ9.."])
async def test_garbage(hs_verifier: TokenVerifier, garbage: str) -> None:
    await _refused(hs_verifier.verify_connection, garbage)


async def test_tampered_payload(hs_verifier: TokenVerifier) -> None:
    header, _, signature = _hs(_claims()).split(".")
    forged = _b64(json.dumps(_claims(user="admin")).encode())
    await _refused(hs_verifier.verify_connection, f"{header}.{forged}.{signature}")


@pytest.mark.parametrize("sub", [None, "", 42, ["alice"]])
async def test_missing_empty_or_non_string_user(hs_verifier: TokenVerifier, sub: object) -> None:
    claims = _claims(user=None)
    if sub is not None:
        claims["sub"] = sub
    await _refused(hs_verifier.verify_connection, _hs(claims))


async def test_non_numeric_exp(hs_verifier: TokenVerifier) -> None:
    claims = _claims()
    claims["exp"] = str(claims["exp"])
    await _refused(hs_verifier.verify_connection, _hs(claims))


async def test_token_without_exp_never_expires(hs_verifier: TokenVerifier) -> None:
    credentials = await hs_verifier.verify_connection(_hs({"sub": "alice"}))
    assert credentials.expires_at is None


async def test_custom_user_claim() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=Secret(SECRET), jwt_user_claim="uid"))
    credentials = await verifier.verify_connection(_hs(_claims(user="ignored", uid="u-1")))
    assert credentials.user == "u-1"
    await _refused(verifier.verify_connection, _hs(_claims(user="alice")))


async def test_info_and_name_claims(hs_verifier: TokenVerifier) -> None:
    info = {"avatar": "https://cdn.example/a.png", "tags": [1, "x", None], "vip": True}
    credentials = await hs_verifier.verify_connection(_hs(_claims(info=info, name="Alice")))
    assert (credentials.info, credentials.name) == (info, "Alice")
    credentials = await hs_verifier.verify_connection(_hs(_claims(info=[1, 2], name=7)))
    assert (credentials.info, credentials.name) == (None, None)


async def test_hmac_fast_path_skips_pyjwt_and_asymmetric_uses_it(
    rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HS* tokens are verified by signaling.jwt_hmac (tests/unit/test_jwt_hmac.py holds
    # the differential tests against pyjwt); every other algorithm still by pyjwt.
    settings = Settings(
        jwt_secret=Secret(SECRET),
        jwt_public_key=Secret(_public_pem(rsa_key)),
        jwt_algorithms=("HS256", "RS256"),
    )
    verifier = TokenVerifier(settings)
    pyjwt_calls: list[str] = []
    pyjwt_decode = verifier._jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        pyjwt_calls.append(token)
        return pyjwt_decode(token, *args, **kwargs)

    monkeypatch.setattr(verifier._jwt, "decode", counting_decode)
    assert not verifier._pyjwt_only
    assert (await verifier.verify_connection(_hs(_claims()))).user == "alice"
    await _refused(verifier.verify_connection, _hs(_claims(), OTHER_SECRET))
    assert pyjwt_calls == []
    rs_token = _signed(rsa_key, "RS256", _claims())
    assert (await verifier.verify_connection(rs_token)).user == "alice"
    assert pyjwt_calls == [rs_token]


@pytest.mark.parametrize("pyjwt_only", [False, True])
async def test_secret_pyjwt_refuses_refuses_every_hmac_token(pyjwt_only: bool) -> None:
    # Settings refuses such secrets at load; bypassed here to show both paths refuse the
    # key itself (short, or shaped like a PEM key) before looking at the signature.
    for bad_secret in ("short", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"):
        settings = Settings(jwt_secret=Secret(SECRET))
        object.__setattr__(settings, "jwt_secret", Secret(bad_secret))
        verifier = TokenVerifier(settings)
        verifier._pyjwt_only = pyjwt_only
        forged = _hand_token({"alg": "HS256"}, _claims(), bad_secret.encode())
        error = await _refused(verifier.verify_connection, forged)
        assert str(error) == "signing key refused"


async def test_a_subscription_token_does_not_open_a_connection(
    hs_verifier: TokenVerifier,
) -> None:
    """A subscription token (often long-lived, for one paid channel) carries its
    holder's user claim too; as a connection token it would open a whole session."""
    grant = _hs(_claims(channel="private:vip", ttl_s=30 * 86400))
    assert await hs_verifier.verify_subscription(grant, user="alice", channel="private:vip")
    error = await _refused(hs_verifier.verify_connection, grant)
    assert str(error) == "a subscription token is not a connection token"
    assert (await hs_verifier.verify_connection(_hs(_claims()))).user == "alice"


async def test_a_user_id_with_a_brace_does_not_connect(hs_verifier: TokenVerifier) -> None:
    for user in ("}x", "a{b", "{tag}"):
        error = await _refused(hs_verifier.verify_connection, _hs(_claims(user=user)))
        assert str(error) == "user id with a brace"


# --- audience and issuer -------------------------------------------------------------------


async def test_audience_checked_when_configured() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=Secret(SECRET), jwt_audience="digis"))
    assert (await verifier.verify_connection(_hs(_claims(aud="digis")))).user == "alice"
    assert (await verifier.verify_connection(_hs(_claims(aud=["x", "digis"])))).user == "alice"
    await _refused(verifier.verify_connection, _hs(_claims(aud="other")))
    await _refused(verifier.verify_connection, _hs(_claims()))


async def test_audience_ignored_when_not_configured(hs_verifier: TokenVerifier) -> None:
    assert (await hs_verifier.verify_connection(_hs(_claims(aud="anything")))).user == "alice"


async def test_issuer_checked_when_configured() -> None:
    issuer = "https://securetoken.google.com/digis"
    verifier = TokenVerifier(Settings(jwt_secret=Secret(SECRET), jwt_issuer=issuer))
    assert (await verifier.verify_connection(_hs(_claims(iss=issuer)))).user == "alice"
    await _refused(verifier.verify_connection, _hs(_claims(iss="https://evil.example")))
    await _refused(verifier.verify_connection, _hs(_claims()))


# --- asymmetric keys and algorithm confusion ---------------------------------------------------


async def test_valid_rs256(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(Settings(jwt_public_key=Secret(_public_pem(rsa_key))))
    credentials = await verifier.verify_connection(_signed(rsa_key, "RS256", _claims()))
    assert credentials.user == "alice"


async def test_rs256_signed_by_another_key(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(Settings(jwt_public_key=Secret(_public_pem(rsa_key))))
    await _refused(verifier.verify_connection, _signed(rsa_key2, "RS256", _claims()))


async def test_valid_es256(ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(Settings(jwt_public_key=Secret(_public_pem(ec_key))))
    credentials = await verifier.verify_connection(_signed(ec_key, "ES256", _claims()))
    assert credentials.user == "alice"
    await _refused(verifier.verify_connection, _signed(rsa_key, "RS256", _claims()))


async def test_valid_eddsa() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = TokenVerifier(Settings(jwt_public_key=Secret(_public_pem(key))))
    assert (await verifier.verify_connection(_signed(key, "EdDSA", _claims()))).user == "alice"


async def test_public_key_used_as_hmac_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _public_pem(rsa_key)
    settings = Settings(
        jwt_secret=Secret(SECRET),
        jwt_public_key=Secret(pem),
        jwt_algorithms=("RS256", "HS256"),
    )
    verifier = TokenVerifier(settings)
    for secret in (pem, pem.strip(), pem.replace("\n", "")):
        forged = _hand_token(
            {"alg": "HS256", "typ": "JWT"}, _claims(user="mallory"), secret.encode()
        )
        await _refused(verifier.verify_connection, forged)
    # Both legitimate kinds still work with the same settings.
    assert (await verifier.verify_connection(_hs(_claims()))).user == "alice"
    assert (await verifier.verify_connection(_signed(rsa_key, "RS256", _claims()))).user == "alice"


async def test_hmac_without_secret_is_refused_even_if_listed(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _public_pem(rsa_key)
    settings = Settings(jwt_public_key=Secret(pem))
    # Validation forbids listing HS256 without a secret; bypass it to prove the verifier
    # holds the line on its own.
    object.__setattr__(settings, "jwt_algorithms", ("RS256", "HS256"))
    verifier = TokenVerifier(settings)
    forged = _hand_token({"alg": "HS256", "typ": "JWT"}, _claims(user="mallory"), pem.encode())
    await _refused(verifier.verify_connection, forged)


# --- subscription tokens ----------------------------------------------------------------------


async def test_subscription_token(hs_verifier: TokenVerifier) -> None:
    claims = _claims(channel="chat:room1", info={"role": "moderator"})
    grant = await hs_verifier.verify_subscription(_hs(claims), user="alice", channel="chat:room1")
    assert grant == SubscriptionGrant(
        channel="chat:room1", expires_at=float(claims["exp"]), info={"role": "moderator"}
    )


async def test_subscription_token_for_another_user(hs_verifier: TokenVerifier) -> None:
    token = _hs(_claims(user="bob", channel="chat:room1"))

    async def verify(t: str) -> SubscriptionGrant:
        return await hs_verifier.verify_subscription(t, user="alice", channel="chat:room1")

    await _refused(verify, token)


async def test_subscription_token_for_another_channel(hs_verifier: TokenVerifier) -> None:
    async def verify(t: str) -> SubscriptionGrant:
        return await hs_verifier.verify_subscription(t, user="alice", channel="chat:room2")

    await _refused(verify, _hs(_claims(channel="chat:room1")))
    await _refused(verify, _hs(_claims()))


async def test_subscription_token_expired(hs_verifier: TokenVerifier) -> None:
    async def verify(t: str) -> SubscriptionGrant:
        return await hs_verifier.verify_subscription(t, user="alice", channel="chat:room1")

    await _refused(verify, _hs(_claims(ttl_s=-60, channel="chat:room1")), TokenExpired)


# --- mint_token -------------------------------------------------------------------------------


async def test_mint_token_round_trip(hs_verifier: TokenVerifier) -> None:
    now = time.time()
    token = mint_token(SECRET, "alice", ttl_s=120, claims={"info": {"a": 1}, "name": "Al"}, now=now)
    credentials = await hs_verifier.verify_connection(token)
    assert credentials == Credentials("alice", float(int(now + 120)), {"a": 1}, "Al")
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["iat"] == int(now)


async def test_mint_token_without_expiry(hs_verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, "alice", ttl_s=None)
    assert (await hs_verifier.verify_connection(token)).expires_at is None


async def test_mint_token_extra_claims_win(hs_verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, "alice", claims={"exp": int(time.time()) - 60})
    await _refused(hs_verifier.verify_connection, token, TokenExpired)


def test_mint_token_hs512() -> None:
    token = mint_token(SECRET, "alice", algorithm="HS512")
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert jwt.decode(token, SECRET, algorithms=["HS512"])["sub"] == "alice"


def test_mint_token_refuses_weak_setups() -> None:
    with pytest.raises(ValueError):
        mint_token("short", "alice")
    with pytest.raises(ValueError):
        mint_token(SECRET, "alice", algorithm="RS256")
    with pytest.raises(ValueError):
        mint_token(SECRET, "alice", algorithm="none")


# --- JWKS -------------------------------------------------------------------------------------


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a mutable JWKS and counting requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.status = 200
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests += 1
                    status, body = owner.status, json.dumps({"keys": owner.keys}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks.json"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def _jwk(private_key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


async def test_jwks_verify_and_rotate(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks_server.keys = [_jwk(rsa_key, "k1")]
    verifier = TokenVerifier(Settings(jwt_jwks_url=jwks_server.url, jwt_audience=AUD))
    try:
        for _ in range(3):
            token = _signed(rsa_key, "RS256", _claims(aud=AUD), kid="k1")
            assert (await verifier.verify_connection(token)).user == "alice"
        assert jwks_server.requests == 1  # cached

        # Rotation: the issuer publishes k2 and starts signing with it.
        jwks_server.keys = [_jwk(rsa_key, "k1"), _jwk(rsa_key2, "k2")]
        token = _signed(rsa_key2, "RS256", _claims(user="bob", aud=AUD), kid="k2")
        assert (await verifier.verify_connection(token)).user == "bob"
        assert jwks_server.requests == 2  # one refetch for the unknown kid

        # Unknown kids cannot make us hammer the issuer: at most one refetch per 30 s.
        for i in range(5):
            token = _signed(rsa_key2, "RS256", _claims(aud=AUD), kid=f"junk-{i}")
            await _refused(verifier.verify_connection, token)
        # A known kid with the wrong key is a bad signature, not a reason to refetch.
        await _refused(
            verifier.verify_connection, _signed(rsa_key2, "RS256", _claims(aud=AUD), kid="k1")
        )
        # HS256 tokens have no key here at all (JWKS only configures RS256).
        await _refused(verifier.verify_connection, _hs(_claims(aud=AUD)))
        assert jwks_server.requests == 2
    finally:
        await verifier.aclose()


async def test_jwks_concurrent_verifications_share_one_fetch(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.keys = [_jwk(rsa_key, "k1")]
    verifier = TokenVerifier(Settings(jwt_jwks_url=jwks_server.url, jwt_audience=AUD))
    try:
        token = _signed(rsa_key, "RS256", _claims(aud=AUD), kid="k1")
        results = await asyncio.gather(*(verifier.verify_connection(token) for _ in range(20)))
        assert {c.user for c in results} == {"alice"}
        assert jwks_server.requests == 1
    finally:
        await verifier.aclose()


async def test_jwks_symmetric_keys_are_never_used(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    # An "oct" key in a JWKS must never become an HMAC secret: HS* uses the configured
    # secret only, and the symmetric entry is dropped from the key set.
    oct_key = {"kty": "oct", "kid": "sym", "k": _b64(OTHER_SECRET.encode()), "alg": "HS256"}
    jwks_server.keys = [oct_key, _jwk(rsa_key, "k1")]
    settings = Settings(jwt_secret=Secret(SECRET), jwt_jwks_url=jwks_server.url, jwt_audience=AUD)
    assert settings.jwt_algorithms == ("HS256", "RS256")
    verifier = TokenVerifier(settings)
    try:
        token = _signed(rsa_key, "RS256", _claims(aud=AUD), kid="k1")
        assert (await verifier.verify_connection(token)).user == "alice"
        forged = _hand_token(
            {"alg": "HS256", "kid": "sym"}, _claims(aud=AUD), OTHER_SECRET.encode()
        )
        await _refused(verifier.verify_connection, forged)
        forged = _hand_token(
            {"alg": "RS256", "kid": "sym"}, _claims(aud=AUD), OTHER_SECRET.encode()
        )
        await _refused(verifier.verify_connection, forged)
    finally:
        await verifier.aclose()


async def test_jwks_server_error_without_cache(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.status = 500
    verifier = TokenVerifier(Settings(jwt_jwks_url=jwks_server.url, jwt_audience=AUD))
    try:
        token = _signed(rsa_key, "RS256", _claims(aud=AUD), kid="k1")
        with caplog.at_level(logging.WARNING, logger="signaling.auth"):
            for _ in range(3):
                with pytest.raises(KeysUnavailable):
                    await verifier.verify_connection(token)
        assert jwks_server.requests == 1  # failures back off too
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await verifier.aclose()


async def test_jwks_down_without_cache(
    rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    # A port that was free a moment ago: connections are refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = TokenVerifier(
        Settings(jwt_jwks_url=f"http://127.0.0.1:{port}/jwks.json", jwt_audience=AUD)
    )
    try:
        token = _signed(rsa_key, "RS256", _claims(aud=AUD), kid="k1")
        with caplog.at_level(logging.DEBUG, logger="signaling.auth"):
            for _ in range(3):
                # Not the client's fault: temporary, not "invalid token".
                with pytest.raises(KeysUnavailable):
                    await verifier.verify_connection(token)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert token not in caplog.text and token.split(".")[1] not in caplog.text
    finally:
        await verifier.aclose()
