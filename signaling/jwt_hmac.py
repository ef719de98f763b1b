"""Fast verification of HMAC-signed JWTs (HS256, HS384, HS512), mirroring PyJWT 2.15.1.

PyJWT spends 50-100 µs on an HS256 token, most of it outside the HMAC: it parses the
header twice with the stdlib json, re-checks the secret for PEM/SSH/DER/JWK shapes on
every call, merges option dicts and builds datetimes. Here the static work is done once
(:class:`HmacVerifier`), and a token costs a split, three base64url decodes, one HMAC
(a copy of a pre-keyed one), a constant-time compare and two orjson parses.

This is security code that must agree with PyJWT, decision for decision and exception
type for exception type: :mod:`signaling.auth` maps PyJWT exception types to its fixed
messages, so every check raises the PyJWT exception PyJWT raises at the same point, in
the same order. What is mirrored (``jwt/api_jws.py`` and ``jwt/api_jwt.py`` of 2.15.1):

* ``PyJWS._load``: split at the last and the first dot; each segment strictly
  base64url (at most two trailing ``=`` and only on a length multiple of 4, alphabet
  ``A-Za-z0-9-_``, length not 1 mod 4, canonical: no stray bits in the last character);
  header a JSON object; ``"b64": false`` requires an empty payload segment.
* ``PyJWS._validate_headers``: ``kid`` a string; ``crit`` a non-empty list of strings
  naming only ``b64``, which must be present.
* ``PyJWS.decode_complete``: ``"b64": false`` tokens are refused (they need a detached
  payload, which is never passed), after checking ``crit`` lists ``b64``.
* ``PyJWS._verify_signature``: ``alg`` present, truthy and allowed; the key refused
  (``InvalidKeyError``) when PyJWT's own ``prepare_key`` or, with
  ``enforce_minimum_key_length``, ``check_key_length`` refuses it — decided once at
  construction by calling those very methods; then HMAC compared in constant time.
* ``PyJWT._decode_payload``: payload a JSON object.
* ``PyJWT._validate_claims`` with the merged options: ``require``; ``iat``, ``nbf``,
  ``exp`` through ``int()`` exactly as PyJWT (so ``"123"`` and ``true`` pass it, ``1.5``
  truncates) with the leeway, ``iat``/``nbf`` in the future ``ImmatureSignatureError``;
  ``iss``; ``aud`` (string or list of strings, non-strict); ``sub`` type; ``jti`` type.

Not mirrored: ``typ`` (PyJWT does not check it on decode either). Options TokenVerifier
does not use — ``detached_payload``, ``strict_aud``, ``verify_signature=False``, a
non-enforced key length (PyJWT would warn per token) — are refused by
:class:`HmacVerifier`; audience and issuer are single strings, not collections. ``now``
is ``time.time()`` where PyJWT uses ``datetime.now(utc).timestamp()``: the same clock,
rounded to the microsecond.

JSON: orjson, except where it would disagree with the stdlib json PyJWT uses. orjson
refuses what json accepts (``NaN``, ``Infinity``, ``1e400``, a UTF-8 BOM, UTF-16/32,
lone surrogates): those inputs are re-parsed with json, so the verdict stays PyJWT's.
orjson turns integers beyond 64 bits into lossy floats and nests 1024 levels where
json's limit is the recursion limit minus the stack depth: inputs with a run of 19+
digits or more than 256 brackets go to json directly. (PyJWT's own verdict on nesting
within a few levels of the recursion limit depends on how deep its caller's stack is;
that one cannot be reproduced exactly, and no real token nests ~1000 levels.) Both
keep the last of duplicate keys, so ``{"sub":"a","sub":"b"}`` is user ``b`` either way.

After a PyJWT upgrade, re-read those two files against this one; the differential
tests in ``tests/unit/test_jwt_hmac.py`` pin the version they were written against.
"""

from __future__ import annotations

import binascii
import hmac
import json
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidJTIError,
    InvalidKeyError,
    InvalidSignatureError,
    InvalidSubjectError,
    InvalidTokenError,
    MissingRequiredClaimError,
)
from jwt.types import Options

__all__ = ["HMAC_HASHES", "HmacVerifier", "JwsParts", "loads_json", "split_token"]

# JOSE name -> hashlib name, the HMAC hash (RFC 7518 §3.2).
HMAC_HASHES: dict[str, str] = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}

_BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_JUNK = b"!"  # in neither alphabet
# One translate both maps base64url to the standard alphabet binascii decodes and turns
# every other byte ("+", "/", "=", ".", non-ASCII...) into _JUNK.
_URLSAFE_TO_STD = bytes(
    _BASE64_ALPHABET[_BASE64URL_ALPHABET.index(c)] if c in _BASE64URL_ALPHABET else _JUNK[0]
    for c in range(256)
)
# The last character of an unpadded segment of length 2 or 3 mod 4 carries 4 or 2 bits
# that decode to nothing. PyJWT refuses a segment that does not re-encode to itself,
# i.e. whose unused bits are not zero: allowed last characters by length mod 4.
_CANONICAL_LAST: dict[int, frozenset[int]] = {
    2: frozenset(c for i, c in enumerate(_BASE64URL_ALPHABET) if i % 16 == 0),
    3: frozenset(c for i, c in enumerate(_BASE64URL_ALPHABET) if i % 4 == 0),
}
_PADDING = {0: b"", 2: b"==", 3: b"="}
# Crit extensions PyJWS understands (PyJWS._supported_crit).
_SUPPORTED_CRIT = frozenset({"b64"})
# orjson parses integers beyond 64 bits as floats (json: exact ints). Any integer that
# fits in 18 digits is exact in both, so 19+ digits in a row sends the text to json.
# Found by blanking non-digits and splitting: three times faster than a regex search.
_MAX_DIGIT_RUN = 18
_DIGITS_ONLY = bytes(c if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
# Nesting depth is at most the number of opening brackets. json fails at the recursion
# limit (1000) minus the caller's stack depth, orjson at 1024: below this many brackets
# both succeed, above it json alone decides.
_MAX_ORJSON_BRACKETS = 256
# The PyJWT options this module implements, with PyJWT.decode's defaults.
_DEFAULT_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iat": True,
    "verify_aud": True,
    "verify_iss": True,
    "verify_sub": True,
    "verify_jti": True,
    "require": [],
    "strict_aud": False,
    "enforce_minimum_key_length": False,
}


class JwsParts(NamedTuple):
    """A compact JWS split and decoded, signature not yet checked (``PyJWS._load``).

    A NamedTuple rather than a frozen dataclass: built once per token, three times faster.
    """

    header: dict[str, Any]  # a JSON object; kid and crit already validated
    signing_input: bytes  # header and payload segments as sent, joined by "."
    payload: bytes  # decoded payload; b"" when the header says "b64": false
    signature: bytes  # decoded signature


def split_token(token: str) -> JwsParts:
    """Split and decode ``token`` as ``PyJWS._load`` then ``_validate_headers`` do.

    Raises:
        DecodeError: not three well-formed segments, or the header is not a JSON object.
        InvalidTokenError: a bad ``kid`` or ``crit`` header.
    """
    try:
        raw = token.encode()
    except UnicodeEncodeError:
        # Lone surrogates; PyJWT's own encode() raises UnicodeEncodeError here.
        raise DecodeError("Invalid token encoding") from None
    signing_input, dot, crypto_segment = raw.rpartition(b".")
    header_segment, dot2, payload_segment = signing_input.partition(b".")
    if not dot or not dot2:
        raise DecodeError("Not enough segments")
    header_data = _decode_segment(header_segment, "header")
    try:
        header = loads_json(header_data)
    except (ValueError, RecursionError):
        raise DecodeError("Invalid header string") from None
    if not isinstance(header, dict):
        raise DecodeError("Invalid header string: must be a json object")
    if header.get("b64", True) is False:
        # PyJWT skips decoding the payload of a detached-payload token but insists the
        # segment be empty.
        if payload_segment:
            raise DecodeError("Payload segment must be empty when 'b64' is false.")
        payload = b""
    else:
        payload = _decode_segment(payload_segment, "payload")
    signature = _decode_segment(crypto_segment, "crypto")
    _validate_headers(header)
    return JwsParts(header, signing_input, payload, signature)


def loads_json(data: bytes) -> Any:
    """Parse JSON as ``json.loads(data)`` would, with orjson whenever they agree.

    Raises what ``json.loads`` raises (``ValueError``, ``RecursionError``).
    """
    if (
        data.count(b"[") + data.count(b"{") > _MAX_ORJSON_BRACKETS
        or max(map(len, data.translate(_DIGITS_ONLY).split()), default=0) > _MAX_DIGIT_RUN
    ):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # Let json decide: it accepts NaN, BOMs, UTF-16 and lone surrogates, and PyJWT
        # accepted them before this module existed. Only malformed input pays this.
        return json.loads(data)


class HmacVerifier:
    """Verifies HS* tokens with one static secret, as ``PyJWT().decode`` would.

    The arguments mean what they mean to ``PyJWT().decode(token, secret, algorithms,
    options, audience=..., issuer=..., leeway=...)``; options this module does not
    implement raise ``ValueError`` here rather than be silently ignored.
    """

    def __init__(
        self,
        secret: bytes,
        algorithms: Iterable[str],
        *,
        options: Options,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        merged: dict[str, Any] = {**_DEFAULT_OPTIONS, **options}
        if set(merged) != set(_DEFAULT_OPTIONS):
            raise ValueError(f"unsupported options: {sorted(set(merged) - set(_DEFAULT_OPTIONS))}")
        if merged["verify_signature"] is not True:
            raise ValueError("verify_signature=False is not supported")
        if merged["strict_aud"] is not False:
            raise ValueError("strict_aud is not supported")
        if merged["enforce_minimum_key_length"] is not True:
            # PyJWT would warn once per token and go on; refuse to guess at that.
            raise ValueError("enforce_minimum_key_length must be True")
        self._algorithms = tuple(algorithms)
        unknown = [a for a in self._algorithms if a not in HMAC_HASHES]
        if unknown:
            raise ValueError(f"not HMAC algorithms: {unknown}")
        # A keyed HMAC per algorithm, copied per token: saves the key set-up (hmac.digest
        # would redo it on every call).
        self._keyed = {
            alg: hmac.new(secret, digestmod=HMAC_HASHES[alg]) for alg in self._algorithms
        }
        self._audience = audience
        self._issuer = issuer
        self._leeway = float(leeway)
        self._require: tuple[str, ...] = tuple(merged["require"])
        self._verify_exp = bool(merged["verify_exp"])
        self._verify_nbf = bool(merged["verify_nbf"])
        self._verify_iat = bool(merged["verify_iat"])
        self._verify_aud = bool(merged["verify_aud"])
        self._verify_iss = bool(merged["verify_iss"])
        self._verify_sub = bool(merged["verify_sub"])
        self._verify_jti = bool(merged["verify_jti"])
        # PyJWT prepares and length-checks the key on every call; the key never changes,
        # so ask PyJWT's own HMAC algorithm objects once. A refused key still refuses each
        # token at the same step, with the same exception.
        self._refused_key: dict[str, str] = {}
        pyjwt_algorithms = get_default_algorithms()
        for alg in self._algorithms:
            alg_obj = pyjwt_algorithms[alg]
            try:
                prepared = alg_obj.prepare_key(secret)
                message = alg_obj.check_key_length(prepared)
            except InvalidKeyError as exc:
                self._refused_key[alg] = str(exc)
                continue
            if prepared != secret:
                # hmac.digest below uses the raw secret: only valid if PyJWT does too.
                raise ValueError("PyJWT prepares HMAC keys differently; re-audit jwt_hmac")
            if message:
                self._refused_key[alg] = message

    def decode(self, parts: JwsParts) -> dict[str, Any]:
        """Verify the signature and claims of a :func:`split_token` result; the claims.

        Raises:
            jwt.PyJWTError: the subclass ``PyJWT().decode`` raises for this token.
        """
        if not self._algorithms:
            # PyJWS.decode_complete refuses an empty allow-list before looking at the token.
            raise DecodeError('It is required that you pass in a value for the "algorithms"')
        header = parts.header
        # PyJWS.decode_complete: detached payloads are never supplied here.
        if header.get("b64", True) is False:
            crit = header.get("crit") or []
            if not isinstance(crit, list) or "b64" not in crit:
                raise InvalidTokenError("The 'b64' header parameter requires 'b64' in 'crit'.")
            raise DecodeError("A detached payload is required when 'b64' is false.")
        # PyJWS._verify_signature.
        if "alg" not in header:
            raise InvalidAlgorithmError("Algorithm not specified")
        alg = header["alg"]
        if not alg or alg not in self._algorithms:
            raise InvalidAlgorithmError("The specified alg value is not allowed")
        refused = self._refused_key.get(alg)
        if refused is not None:
            raise InvalidKeyError(refused)
        mac = self._keyed[alg].copy()
        mac.update(parts.signing_input)
        if not hmac.compare_digest(parts.signature, mac.digest()):
            raise InvalidSignatureError("Signature verification failed")
        # PyJWT._decode_payload.
        try:
            payload = loads_json(parts.payload)
        except (ValueError, RecursionError):
            raise DecodeError("Invalid payload string") from None
        if not isinstance(payload, dict):
            raise DecodeError("Invalid payload string: must be a json object")
        self._validate_claims(payload)
        return payload

    def _validate_claims(self, payload: dict[str, Any]) -> None:
        """``PyJWT._validate_claims``: same checks, same order, same exceptions."""
        for claim in self._require:
            if payload.get(claim) is None:
                raise MissingRequiredClaimError(claim)
        now = time.time()
        leeway = self._leeway
        if "iat" in payload and self._verify_iat:
            iat = _int_claim(
                payload["iat"], InvalidIssuedAtError, "Issued At claim (iat) must be an integer."
            )
            if iat > now + leeway:
                raise ImmatureSignatureError("The token is not yet valid (iat)")
        if "nbf" in payload and self._verify_nbf:
            nbf = _int_claim(
                payload["nbf"], DecodeError, "Not Before claim (nbf) must be an integer."
            )
            if nbf > now + leeway:
                raise ImmatureSignatureError("The token is not yet valid (nbf)")
        if "exp" in payload and self._verify_exp:
            exp = _int_claim(
                payload["exp"], DecodeError, "Expiration Time claim (exp) must be an integer."
            )
            if exp <= now - leeway:
                raise ExpiredSignatureError("Signature has expired")
        if self._verify_iss:
            _validate_iss(payload, self._issuer)
        if self._verify_aud:
            _validate_aud(payload, self._audience)
        if self._verify_sub and "sub" in payload and not isinstance(payload["sub"], str):
            # PyJWT._validate_sub with subject=None: only the type is checked.
            raise InvalidSubjectError("Subject must be a string")
        if self._verify_jti and "jti" in payload and not isinstance(payload["jti"], str):
            raise InvalidJTIError("JWT ID must be a string")


def _decode_segment(segment: bytes, name: str) -> bytes:
    """``PyJWS._decode_base64url_segment``: strict, canonical base64url."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    # Padding is tolerated (some issuers send it) only where it would be correct.
    if padding > 2 or (padding and len(segment) % 4 != 0):
        raise DecodeError(f"Invalid {name} padding")
    remainder = len(stripped) % 4
    standard = stripped.translate(_URLSAFE_TO_STD)
    if remainder == 1 or _JUNK in standard:
        raise DecodeError(f"Invalid {name} padding")
    # Canonical form only: stray low bits in the last character decode to the same
    # bytes, so without this check one token would have several accepted spellings.
    if remainder and stripped[-1] not in _CANONICAL_LAST[remainder]:
        raise DecodeError(f"Invalid {name} padding")
    try:
        return binascii.a2b_base64(standard + _PADDING[remainder])
    except binascii.Error:  # unreachable after the checks above; refuse, never crash
        raise DecodeError(f"Invalid {name} padding") from None


def _validate_headers(header: dict[str, Any]) -> None:
    """``PyJWS._validate_headers`` (decoding): ``kid`` and ``crit``."""
    if "kid" in header and not isinstance(header["kid"], str):
        raise InvalidTokenError("Key ID header parameter must be a string")
    if "crit" in header:
        crit = header["crit"]
        if not isinstance(crit, list) or len(crit) == 0:
            raise InvalidTokenError("Invalid 'crit' header: must be a non-empty list")
        for ext in crit:
            if not isinstance(ext, str):
                raise InvalidTokenError("Invalid 'crit' header: values must be strings")
            if ext not in _SUPPORTED_CRIT:
                raise InvalidTokenError("Unsupported critical extension")
            if ext not in header:
                raise InvalidTokenError("Critical extension is missing from headers")


def _int_claim(value: Any, error: type[Exception], message: str) -> int:
    """A time claim as PyJWT reads it: ``int()`` of the value, or ``error``."""
    try:
        return int(value)
    except (ValueError, TypeError, OverflowError):
        raise error(message) from None


def _validate_iss(payload: dict[str, Any], issuer: str | None) -> None:
    """``PyJWT._validate_iss`` for a single expected issuer."""
    if issuer is None:
        return
    if "iss" not in payload:
        raise MissingRequiredClaimError("iss")
    iss = payload["iss"]
    if not isinstance(iss, str):
        raise InvalidIssuerError("Payload Issuer (iss) must be a string")
    if iss != issuer:
        raise InvalidIssuerError("Invalid issuer")


def _validate_aud(payload: dict[str, Any], audience: str | None) -> None:
    """``PyJWT._validate_aud`` for a single expected audience, non-strict."""
    if audience is None:
        if "aud" not in payload or not payload["aud"]:
            return
        # The application expects no audience but the token names one.
        raise InvalidAudienceError("Invalid audience")
    if "aud" not in payload or not payload["aud"]:
        raise MissingRequiredClaimError("aud")
    claims = payload["aud"]
    if isinstance(claims, str):
        claims = [claims]
    if not isinstance(claims, list) or any(not isinstance(c, str) for c in claims):
        raise InvalidAudienceError("Invalid claim format in token")
    if audience not in claims:
        raise InvalidAudienceError("Audience doesn't match")
