"""JWT verification for connection and subscription tokens (Centrifuge claims).

A connection token names the user (``settings.jwt_user_claim``, ``sub`` by default)
and may carry ``exp``, ``info`` (shown to others in presence and publications) and
``name``. A subscription token additionally names one ``channel`` and must belong to
the connection's user.

Key choice follows the token header's ``alg``, and only among
``settings.jwt_algorithms``:

* ``HS*``: the shared secret, and only the secret. Feeding a public key to HMAC is the
  classic algorithm-confusion forgery (RFC 8725 §2.1): anyone could sign with the
  published PEM text. With no secret configured, HS* tokens are refused.
* asymmetric: the JWKS key whose ``kid`` matches, else the configured PEM public key.
  Each key only verifies the algorithms that fit its type (an RSA key never checks an
  ES256 token), so pyjwt's ``algorithms=`` is always a subset of the settings.

HS* tokens take a fast path (:mod:`signaling.jwt_hmac`): the same checks, order and
outcomes as PyJWT's ``decode``, without its per-token overhead (the secret re-checked
for key shapes, the header parsed twice, option dicts merged, datetimes): about a fifth
of the CPU per connection set-up. Asymmetric tokens are verified by PyJWT itself, after
the same fast header parse. ``TokenVerifier._pyjwt_only`` restores PyJWT for everything:
the reference the differential tests compare the fast path against.

JWKS documents (Firebase, Auth0...) are fetched in a worker thread so the event loop
never blocks, cached for ``settings.jwks_cache_s``, and refetched at most once per
:data:`JWKS_REFETCH_MIN_S` when a token names an unknown ``kid`` (key rotation);
concurrent verifications share one in-flight fetch.

Errors: :class:`TokenExpired` for an ``exp`` in the past beyond the leeway, which the
SDKs answer by fetching a new token; :class:`TokenError` for everything else. Messages
are fixed phrases: they never contain the token, and tokens are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from .config import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, Settings, key_kind
from .jwt_hmac import HmacVerifier, JwsParts, split_token
from .values import JSON, JSONObject

__all__ = [
    "JWKS_REFETCH_MIN_S",
    "Credentials",
    "KeysUnavailable",
    "SubscriptionGrant",
    "TokenError",
    "TokenExpired",
    "TokenVerifier",
    "mint_token",
]

logger = logging.getLogger("signaling.auth")

# An unknown kid may be a rotation (refetch) or junk sent to make us hammer the issuer:
# refetch for unknown kids at most this often.
JWKS_REFETCH_MIN_S = 30.0
# After a failed fetch, wait this long before trying again, whatever the reason.
_JWKS_RETRY_AFTER_FAILURE_S = 10.0
_JWKS_TIMEOUT_S = 5.0  # per HTTP request; also bounds the worker thread after aclose()
_JWKS_MAX_BYTES = 1 << 20  # real documents are a few KiB; refuse to buffer more

_PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a valid connection token says the client is."""

    user: str  # from settings.jwt_user_claim; never empty
    expires_at: float | None  # unix seconds from "exp"; None when the token has no exp
    info: JSONObject | None  # "info" claim if a JSON object, shown to other clients
    name: str | None  # "name" claim if a string (display name)


@dataclass(frozen=True, slots=True)
class SubscriptionGrant:
    """What a valid subscription token allows: one channel, until ``expires_at``."""

    channel: str
    expires_at: float | None  # unix seconds from "exp"; None when the token has no exp
    info: JSONObject | None  # "info" claim if a JSON object (channel-specific info)


class TokenError(Exception):
    """The token is not acceptable: malformed, bad signature, wrong alg/aud/iss, bad claims."""


class KeysUnavailable(Exception):
    """The token cannot be judged now: its keys are served by a JWKS that
    could not be fetched. Temporary — not the client's fault."""


class TokenExpired(TokenError):
    """The token's ``exp`` has passed (beyond the leeway); a fresh token may succeed."""


@dataclass(frozen=True, slots=True)
class _VerifyKey:
    """One key and the algorithms (a subset of the settings) it may verify."""

    key: _PublicKey | bytes
    algorithms: tuple[str, ...]


# pyjwt exception -> our fixed message. Order matters: subclasses first.
_DECODE_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "signing key refused"),
    (jwt.InvalidIssuedAtError, "bad iat claim"),
)


class TokenVerifier:
    """Verifies connection and subscription JWTs against ``settings``.

    Create one per process and share it; call :meth:`aclose` at shutdown.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwt = jwt.PyJWT()
        self._hmac: _VerifyKey | None = None
        self._pem: _VerifyKey | None = None
        self._jwks: _JwksCache | None = None
        self._hmac_fast: HmacVerifier | None = None
        # True: PyJWT parses and verifies every token, as before the fast path. Only the
        # differential tests set it, to compare both paths on the same verifier.
        self._pyjwt_only = False
        secret: bytes | None = None
        if settings.jwt_secret is not None:
            secret = settings.jwt_secret.value.encode()
            hmac_algorithms = tuple(a for a in settings.jwt_algorithms if a in HMAC_ALGORITHMS)
            self._hmac = _VerifyKey(secret, hmac_algorithms)
        if settings.jwt_public_key is not None:
            # Already validated by Settings; parsed once here rather than per token.
            pem_key = load_pem_public_key(settings.jwt_public_key.value.encode())
            self._pem = _key_for(pem_key, None, settings.jwt_algorithms)
        if settings.jwt_jwks_url is not None:
            self._jwks = _JwksCache(
                settings.jwt_jwks_url, settings.jwks_cache_s, settings.jwt_algorithms
            )
        self._options: Options = {
            # aud and iss are checked only when configured; then they are required.
            "verify_aud": settings.jwt_audience is not None,
            "verify_iss": settings.jwt_issuer is not None,
            # The user claim is checked below, whichever claim holds it.
            "verify_sub": False,
            # pyjwt only warns about short keys; a warning per token helps nobody.
            "enforce_minimum_key_length": True,
        }
        if self._hmac is not None and secret is not None:
            # Same key, algorithms and options as the pyjwt call in _decode, so the same
            # decisions (HmacVerifier refuses any option it does not implement).
            self._hmac_fast = HmacVerifier(
                secret,
                self._hmac.algorithms,
                options=self._options,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway_s,
            )

    async def verify_connection(self, token: str) -> Credentials:
        """Verify a connection token (``connect.token`` or ``refresh.token``).

        Raises:
            TokenExpired: ``exp`` passed beyond ``settings.jwt_leeway_s``.
            TokenError: any other problem, including an empty or non-string user
                claim, or a ``channel`` claim (a subscription token).
        """
        claims = await self._decode(token)
        if "channel" in claims:
            # A subscription token (often long-lived, for one paid channel) must not
            # open a whole session as its user.
            raise TokenError("a subscription token is not a connection token")
        user = claims.get(self._settings.jwt_user_claim)
        if not isinstance(user, str) or not user:
            raise TokenError(f"missing or empty user claim {self._settings.jwt_user_claim!r}")
        if "{" in user or "}" in user:
            # User ids go into store keys after a hash tag of their own
            # ({<user>}): a brace would move such a key to another Redis
            # Cluster slot than its siblings, and the user could then not be
            # looked up, moderated or counted.
            raise TokenError("user id with a brace")
        name = claims.get("name")
        return Credentials(
            user=user,
            expires_at=_expires_at(claims),
            info=_object_claim(claims, "info"),
            name=name if isinstance(name, str) else None,
        )

    async def verify_subscription(
        self, token: str, *, user: str, channel: str
    ) -> SubscriptionGrant:
        """Verify a subscription token for ``channel`` held by connection user ``user``.

        The token's user claim (``sub`` by default) must equal ``user`` and its
        ``channel`` claim must equal ``channel``, so a token cannot be replayed by
        another user or for another channel.

        Raises:
            TokenExpired: ``exp`` passed beyond the leeway.
            TokenError: wrong user or channel, or any other problem.
        """
        claims = await self._decode(token)
        if claims.get(self._settings.jwt_user_claim) != user:
            raise TokenError("token belongs to another user")
        if claims.get("channel") != channel:
            raise TokenError("token is for another channel")
        return SubscriptionGrant(
            channel=channel, expires_at=_expires_at(claims), info=_object_claim(claims, "info")
        )

    async def aclose(self) -> None:
        """Stop any in-flight JWKS fetch. Verifications after this may fail."""
        if self._jwks is not None:
            await self._jwks.aclose()

    async def _decode(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise TokenError("empty token")
        parts: JwsParts | None = None
        try:
            if self._pyjwt_only:
                header = jwt.get_unverified_header(token)
            else:
                # Splits, decodes and validates the header exactly as pyjwt does.
                parts = split_token(token)
                header = parts.header
        except (jwt.PyJWTError, ValueError, TypeError):
            raise TokenError("malformed token") from None
        alg = header.get("alg")
        # Checked before choosing a key, so "none" and unlisted algorithms go no further.
        if not isinstance(alg, str) or alg not in self._settings.jwt_algorithms:
            raise TokenError("algorithm not allowed")
        key = await self._choose_key(alg, header.get("kid"))
        if alg not in key.algorithms:
            raise TokenError("algorithm does not fit the signing key")
        settings = self._settings
        try:
            if parts is not None and key is self._hmac and self._hmac_fast is not None:
                # Raises the pyjwt exception pyjwt would, so the mapping below applies.
                claims = self._hmac_fast.decode(parts)
            else:
                claims = self._jwt.decode(
                    token,
                    key.key,
                    algorithms=list(key.algorithms),
                    options=self._options,
                    audience=settings.jwt_audience,
                    issuer=settings.jwt_issuer,
                    leeway=settings.jwt_leeway_s,
                )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            # exc.claim is a claim name pyjwt was asked for ("aud", "iss"), not token text.
            raise TokenError(f"missing {exc.claim} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            # `from None`: pyjwt messages may quote decoded token parts.
            raise TokenError(_decode_error_message(exc)) from None
        if "exp" in claims and not _is_number(claims["exp"]):
            # pyjwt int()s exp, so a string "exp" would otherwise pass.
            raise TokenError("exp claim must be a number")
        return claims

    async def _choose_key(self, alg: str, kid: object) -> _VerifyKey:
        if alg in HMAC_ALGORITHMS:
            # The secret or nothing: never a public key (algorithm confusion).
            if self._hmac is None:
                raise TokenError("HMAC-signed tokens are not accepted")
            return self._hmac
        if self._jwks is not None and isinstance(kid, str) and kid:
            found = await self._jwks.get(kid)
            if found is not None:
                return found
        if self._pem is not None:
            return self._pem
        if self._jwks is not None and self._jwks.unavailable:
            raise KeysUnavailable("JWKS could not be fetched")
        raise TokenError("no signing key for this token")


def mint_token(
    secret: str,
    user: str,
    *,
    ttl_s: float | None = 3600,
    claims: Mapping[str, JSON] | None = None,
    algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """Make an HMAC-signed connection token, for the CLI ``token`` command and tests.

    Args:
        secret: the shared secret (``SIGNAL_JWT_SECRET``), at least the hash size in bytes.
        user: the ``sub`` claim.
        ttl_s: seconds until ``exp``; ``None`` omits ``exp`` (a token that never expires).
        claims: extra claims (``info``, ``name``, ``channel``...); they win over the
            standard ones, so tests can set ``exp`` or ``nbf`` directly.
        algorithm: HS256, HS384 or HS512.
        now: unix seconds used for ``iat``; default the current time.

    Raises:
        ValueError: a non-HMAC algorithm, or a secret too short for it.
    """
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"mint_token signs with HMAC only ({', '.join(HMAC_ALGORITHMS)})")
    issued_at = time.time() if now is None else now
    payload: dict[str, JSON] = {"sub": user, "iat": int(issued_at)}
    if ttl_s is not None:
        payload["exp"] = int(issued_at + ttl_s)
    payload.update(claims or {})
    try:
        return _STRICT_ENCODER.encode(payload, secret, algorithm=algorithm)
    except jwt.InvalidKeyError as exc:
        # pyjwt's message names the required length, never the secret.
        raise ValueError(str(exc)) from None


# Raises instead of warning on a short secret, matching what the verifier accepts.
_STRICT_ENCODER = jwt.PyJWT(options={"enforce_minimum_key_length": True})


def _decode_error_message(exc: Exception) -> str:
    for error_type, message in _DECODE_ERRORS:
        if isinstance(exc, error_type):
            return message
    return "malformed token"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _expires_at(claims: Mapping[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _object_claim(claims: Mapping[str, Any], name: str) -> JSONObject | None:
    value = claims.get(name)
    # Claims come from json.loads, so an object is a valid JSONObject.
    return cast(JSONObject, value) if isinstance(value, dict) else None


def _key_for(key: object, jwk_alg: str | None, allowed: tuple[str, ...]) -> _VerifyKey | None:
    """Pair a public key with the allowed algorithms that fit its type (and its JWK alg)."""
    kind = key_kind(key)
    if kind is None or not isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ):
        return None
    algorithms = tuple(
        a
        for a in allowed
        if ASYMMETRIC_ALGORITHMS.get(a) == kind and (jwk_alg is None or a == jwk_alg)
    )
    return _VerifyKey(key, algorithms) if algorithms else None


# --- JWKS -----------------------------------------------------------------------------


class _JwksCache:
    """Keys of one JWKS URL by kid, fetched lazily and shared by all verifications."""

    def __init__(self, url: str, cache_s: float, allowed: tuple[str, ...]) -> None:
        self._url = url
        self._cache_s = cache_s
        self._allowed = allowed
        self._keys: dict[str, _VerifyKey] = {}
        self._fetched_at: float | None = None  # monotonic, last successful fetch
        self._refetched_at: float | None = None  # monotonic, last unknown-kid refetch
        self._failed_at: float | None = None  # monotonic, last failure since a success
        self._inflight: asyncio.Task[None] | None = None
        # Logged without its query string, which could carry an API key.
        parts = urlsplit(url)
        self._log_url = f"{parts.scheme}://{parts.netloc}{parts.path}"

    async def get(self, kid: str) -> _VerifyKey | None:
        """The key for ``kid``, fetching first if the cache is empty, stale or lacks it."""
        if kid not in self._keys and self._inflight is not None:
            # A fetch is under way and may bring this kid: wait for it rather than fetch
            # again. Known kids do not wait for an unknown-kid refetch.
            await asyncio.shield(self._inflight)
        if self._claim_fetch(known=kid in self._keys):
            if self._inflight is None:
                self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
            # shield: a cancelled verification must not cancel the fetch others await.
            await asyncio.shield(self._inflight)
        return self._keys.get(kid)

    @property
    def unavailable(self) -> bool:
        """No keys at all, and the last fetch failed."""
        return not self._keys and self._failed_at is not None

    async def aclose(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _claim_fetch(self, *, known: bool) -> bool:
        """Whether to fetch now; records an unknown-kid refetch against its rate limit."""
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < _JWKS_RETRY_AFTER_FAILURE_S:
            return False
        if self._fetched_at is None or now - self._fetched_at >= self._cache_s:
            return True
        if known:
            return False
        if self._refetched_at is not None and now - self._refetched_at < JWKS_REFETCH_MIN_S:
            return False
        self._refetched_at = now
        return True

    async def _fetch(self) -> None:
        try:
            keys = await asyncio.to_thread(_download_jwks, self._url, self._allowed)
        except Exception as exc:
            # Keep serving the keys we had: an issuer outage must not log everyone out.
            # One WARNING per outage, not per token.
            if self._failed_at is None:
                logger.warning(
                    "JWKS fetch from %s failed (%s: %s); keeping %d cached keys, "
                    "retrying at most every %.0f s",
                    self._log_url,
                    type(exc).__name__,
                    exc,
                    len(self._keys),
                    _JWKS_RETRY_AFTER_FAILURE_S,
                )
            self._failed_at = time.monotonic()
        else:
            if self._failed_at is not None:
                logger.info("JWKS fetch from %s succeeded again", self._log_url)
            self._keys = keys
            self._fetched_at = time.monotonic()
            self._failed_at = None
            logger.debug("JWKS from %s: %d usable keys", self._log_url, len(keys))
        finally:
            self._inflight = None


def _download_jwks(url: str, allowed: tuple[str, ...]) -> dict[str, _VerifyKey]:
    """Fetch and parse a JWKS document. Blocking: runs in a worker thread."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "digis-signal"}
    )
    try:
        with urllib.request.urlopen(request, timeout=_JWKS_TIMEOUT_S) as response:
            body = response.read(_JWKS_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        # HTTPError holds the open response; close it rather than leave it to the GC.
        exc.close()
        raise OSError(f"HTTP {exc.code}") from None
    if len(body) > _JWKS_MAX_BYTES:
        raise ValueError(f"document larger than {_JWKS_MAX_BYTES} bytes")
    return _parse_jwks(json.loads(body), allowed)


def _parse_jwks(document: object, allowed: tuple[str, ...]) -> dict[str, _VerifyKey]:
    """Usable signing keys by kid; anything else in the set is skipped."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, _VerifyKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid, kty, alg = entry.get("kid"), entry.get("kty"), entry.get("alg")
        # Only public signing keys: an "oct" (symmetric) key would turn a published
        # document into an HMAC secret, and "enc" keys are not for signatures.
        if not isinstance(kid, str) or kty not in ("RSA", "EC", "OKP"):
            continue
        if entry.get("use", "sig") != "sig" or (alg is not None and not isinstance(alg, str)):
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue  # unsupported curve or algorithm, broken numbers
        key = _key_for(jwk.key, alg, allowed)
        if key is not None:
            keys[kid] = key
    if not keys:
        raise ValueError("JWKS has no usable signing keys for the configured algorithms")
    return keys
