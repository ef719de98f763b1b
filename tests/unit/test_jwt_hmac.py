"""Differential tests: the HMAC fast path (signaling.jwt_hmac) against PyJWT itself.

Every token goes through one TokenVerifier twice, once on the fast path and once with
``_pyjwt_only`` (PyJWT parses and verifies, the code as it was before the fast path),
and both outcomes must be identical: the same claims (compared by ``repr``, so ``1``,
``1.0`` and ``True`` differ) or the same exception type and message. The corpus is
hand-written edge cases plus seeded random mutations, over several settings. The
sabotage tests at the end break the fast path on purpose and check the corpus notices.
"""

from __future__ import annotations

import base64
import hmac
import json
import random
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.api_jws import PyJWS

from signaling import jwt_hmac
from signaling.auth import KeysUnavailable, TokenError, TokenVerifier
from signaling.config import Secret, Settings

SECRET = "differential-secret-" + "z" * 44  # 64 bytes: enough for HS512
KEY = SECRET.encode()
AUDIENCE = "digis"
ISSUER = "https://issuer.example"
HASHES = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
HEADER = b'{"alg":"HS256","typ":"JWT"}'

Outcome = tuple[str, str]


# --- token building ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(signing_input: str, key: bytes = KEY, hash_name: str = "sha256") -> str:
    return _b64(hmac.digest(key, signing_input.encode(), hash_name))


def _token(
    payload: bytes | dict[str, Any],
    header: bytes | dict[str, Any] = HEADER,
    *,
    key: bytes = KEY,
    hash_name: str | None = None,
) -> str:
    """A token from raw header and payload bytes (or objects), HMAC-signed over them."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    if hash_name is None:
        try:
            alg = json.loads(header).get("alg")
        except (ValueError, AttributeError):
            alg = None
        hash_name = HASHES.get(alg, "sha256") if isinstance(alg, str) else "sha256"
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    return f"{signing_input}.{_sign(signing_input, key, hash_name)}"


def _claims(now: int, **extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 3600}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP = object()  # a claim value meaning "leave this claim out"


# --- the two paths -----------------------------------------------------------------------


async def _run(verifier: TokenVerifier, token: str, *, pyjwt: bool) -> tuple[Outcome, ...]:
    verifier._pyjwt_only = pyjwt
    try:
        return (
            await _outcome(verifier._decode(token)),
            await _outcome(verifier.verify_connection(token)),
            await _outcome(verifier.verify_subscription(token, user="alice", channel="chat:1")),
        )
    finally:
        verifier._pyjwt_only = False


async def _outcome(call: Any) -> Outcome:
    try:
        result = await call
    except (TokenError, KeysUnavailable) as exc:
        return (type(exc).__name__, str(exc))
    except Exception as exc:  # a crash on either path is a difference too
        return (f"unexpected {type(exc).__name__}", str(exc))
    return ("ok", repr(result))


async def _differences(verifier: TokenVerifier, tokens: list[str]) -> list[str]:
    """Tokens whose fast-path outcome differs from PyJWT's, described."""
    found = []
    for token in tokens:
        fast = await _run(verifier, token, pyjwt=False)
        reference = await _run(verifier, token, pyjwt=True)
        assert not any(kind.startswith("unexpected") for kind, _ in reference), reference
        if fast != reference:
            found.append(f"{token!r}\n  fast:  {fast}\n  pyjwt: {reference}")
    return found


# --- settings under test -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _with_secret(settings: Settings, secret: str) -> Settings:
    # Settings refuses these secrets at load; bypass that to prove the verifier treats
    # them exactly as PyJWT does on its own.
    object.__setattr__(settings, "jwt_secret", Secret(secret))
    return settings


ALL_HS = ("HS256", "HS384", "HS512")


def _settings_cases(pem: str) -> dict[str, Callable[[], Settings]]:
    return {
        "default": lambda: Settings(jwt_secret=Secret(SECRET)),
        "aud-iss-no-leeway": lambda: Settings(
            jwt_secret=Secret(SECRET),
            jwt_algorithms=ALL_HS,
            jwt_audience=AUDIENCE,
            jwt_issuer=ISSUER,
            jwt_leeway_s=0,
        ),
        "aud-leeway-30-uid": lambda: Settings(
            jwt_secret=Secret(SECRET),
            jwt_algorithms=("HS384", "HS512"),
            jwt_audience=AUDIENCE,
            jwt_leeway_s=30,
            jwt_user_claim="uid",
        ),
        "iss-fractional-leeway": lambda: Settings(
            jwt_secret=Secret(SECRET), jwt_issuer=ISSUER, jwt_leeway_s=0.5
        ),
        "hmac-and-pem": lambda: Settings(
            jwt_secret=Secret(SECRET), jwt_public_key=Secret(pem), jwt_algorithms=("HS256", "RS256")
        ),
        "secret-unused": lambda: Settings(
            jwt_secret=Secret(SECRET), jwt_public_key=Secret(pem), jwt_algorithms=("RS256",)
        ),
        "short-secret": lambda: _with_secret(
            Settings(jwt_secret=Secret(SECRET), jwt_algorithms=ALL_HS), "short-secret"
        ),
        "40-byte-secret": lambda: _with_secret(
            Settings(jwt_secret=Secret(SECRET), jwt_algorithms=ALL_HS), "k" * 40
        ),
        "pem-as-secret": lambda: _with_secret(Settings(jwt_secret=Secret(SECRET)), pem),
        "jwk-as-secret": lambda: _with_secret(
            Settings(jwt_secret=Secret(SECRET)), '{"kty": "oct", "k": "' + "A" * 60 + '"}'
        ),
    }


# Settings name -> the algorithms the corpus is built with (the first HMAC one it allows,
# and more where several are allowed).
CORPUS_ALGS = {"aud-iss-no-leeway": ("HS256", "HS512"), "aud-leeway-30-uid": ("HS384",)}

SETTINGS_NAMES = [
    "default",
    "aud-iss-no-leeway",
    "aud-leeway-30-uid",
    "iss-fractional-leeway",
    "hmac-and-pem",
    "secret-unused",
    "short-secret",
    "40-byte-secret",
    "pem-as-secret",
    "jwk-as-secret",
]


@pytest.fixture
async def make_verifier(rsa_key: rsa.RSAPrivateKey) -> Any:
    made: list[TokenVerifier] = []
    cases = _settings_cases(_public_pem(rsa_key))

    def make(name: str) -> TokenVerifier:
        verifier = TokenVerifier(cases[name]())
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.aclose()


# --- the corpus ----------------------------------------------------------------------------


def _corpus(rsa_key: rsa.RSAPrivateKey, alg: str = "HS256") -> list[str]:
    """Edge-case tokens; those without an explicit header use ``alg``."""
    now = int(time.time())

    def tok(
        payload: bytes | dict[str, Any],
        header: bytes | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        return _token(payload, {"alg": alg, "typ": "JWT"} if header is None else header, **kwargs)

    tokens: list[str] = []
    add = tokens.append
    good = _claims(now, aud=AUDIENCE, iss=ISSUER, uid="u-1", channel="chat:1")

    # Valid tokens of each HMAC algorithm, by PyJWT and by hand.
    for other in ALL_HS:
        add(jwt.encode(good, SECRET, algorithm=other))
        add(tok(good, {"alg": other}))
        add(tok(good, {"typ": "JWT", "alg": other, "kid": "k1"}))
    add(jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"))  # no exp at all
    add(tok(b'{"sub":"alice"}'))

    # exp, nbf and iat around the leeways used (0, 0.5, 5 and 30 s), never within a
    # second of a boundary so the two paths' clocks cannot disagree.
    for offset in (-7200, -100, -45, -20, -12, -3, 2, 3, 12, 45, 7200):
        add(tok(_claims(now, exp=now + offset, aud=AUDIENCE, iss=ISSUER, uid="u")))
        add(tok(_claims(now, nbf=now + offset, aud=AUDIENCE, iss=ISSUER, uid="u")))
        add(tok(_claims(now, iat=now + offset, aud=AUDIENCE, iss=ISSUER, uid="u")))
    odd_times: list[Any] = [
        str(now + 3600),
        str(now - 3600),
        f" {now + 3600} ",
        "1_900_000_000",
        "\u0661\u0669\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",  # Arabic digits
        "abc",
        "",
        "1.5e9",
        True,
        False,
        None,
        [],
        {},
        [now + 3600],
        float(now + 3600) + 0.75,
        float(now - 3600) + 0.25,
        1.9e9,
        10**30,
        -(10**30),
        2**63,
        2**64 + 1,
        0,
        -1,
    ]
    for value in odd_times:
        for claim in ("exp", "nbf", "iat"):
            add(tok(_claims(now, **{claim: value}, aud=AUDIENCE, iss=ISSUER)))
    # Numbers json accepts and orjson refuses, or reads differently.
    base = f'"sub":"alice","aud":"{AUDIENCE}","iss":"{ISSUER}"'
    for literal in (
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
        "99999999999999999999999",
        "18446744073709551616",
        "-9223372036854775809",
        "9223372036854775807",
        "1" * 5000,
        "1.0",
        "-0",
        "-0.0",
        "1E3",
        "0.1e1",
    ):
        for claim in ("exp", "nbf", "iat"):
            add(tok(f'{{{base},"{claim}":{literal}}}'.encode()))
        add(tok(f'{{{base},"info":{{"n":{literal}}}}}'.encode()))

    # aud and iss, when configured or not.
    for aud in (AUDIENCE, [AUDIENCE], ["x", AUDIENCE], ["x"], "other", [], "", None, 5, {}):
        add(tok(_claims(now, aud=aud, iss=ISSUER)))
    add(tok(_claims(now, aud=[AUDIENCE, 5], iss=ISSUER)))
    add(tok(_claims(now, aud=_DROP, iss=ISSUER)))
    for iss in (ISSUER, "https://evil.example", None, 5, [ISSUER], "", ISSUER + "/"):
        add(tok(_claims(now, aud=AUDIENCE, iss=iss)))
    add(tok(_claims(now, aud=AUDIENCE, iss=_DROP)))
    # jti and sub types (pyjwt checks jti; sub is ours).
    for jti in ("id-1", 5, None, ["x"]):
        add(tok(_claims(now, jti=jti, aud=AUDIENCE, iss=ISSUER)))
    for sub in ("alice", "", 5, ["alice"], None, "\u0430\u043b\u0438\u0441\u0430", "\U0001f600"):
        add(tok(_claims(now, sub=sub, aud=AUDIENCE, iss=ISSUER, uid=sub)))
    add(tok(_claims(now, sub=_DROP, aud=AUDIENCE, iss=ISSUER)))
    add(tok(_claims(now, info={"a": [1, "x", None]}, name="Alice", aud=AUDIENCE, iss=ISSUER)))
    add(tok(_claims(now, info=[1], name=7, channel="chat:2", aud=AUDIENCE, iss=ISSUER)))

    # JSON oddities in the payload (signed, so only JSON parsing decides).
    tail = f'"aud":"{AUDIENCE}","iss":"{ISSUER}","uid":"u"'
    for raw in (
        f'{{"sub":"alice","sub":"admin",{tail}}}',
        f'{{"sub":"admin","sub":"alice",{tail}}}',
        f'{{"\\u0073ub":"mallory","sub":"alice",{tail}}}',
        f'{{"sub":"alice","exp":1,"exp":{now + 60},{tail}}}',
        f'{{"sub":"alice","exp":{now + 60},"exp":1,{tail}}}',
        f'{{"sub":"\\ud800",{tail}}}',
        f'{{"sub":"\\ud83d\\ude00",{tail}}}',
        f'{{"sub":"alice","info":{{"x":"\\u0000"}},{tail}}}',
        f' \n{{"sub":"alice",{tail}}}\t ',
        f'{{"sub":"alice",{tail}}}x',
        f'{{"sub":"alice",{tail},}}',
        f'{{"sub":"alice",{tail}}}{{}}',
        f"{{\"sub\":'alice',{tail}}}",
        f'{{"sub":"alice",{tail},"n":01}}',
        "[]",
        "null",
        "true",
        '"alice"',
        "42",
        "",
        "{",
        "not json",
    ):
        add(tok(raw.encode()))
    utf8 = f'{{"sub":"alice",{tail}}}'
    add(tok(b"\xef\xbb\xbf" + utf8.encode()))  # BOM: json accepts, orjson refuses
    add(tok(utf8.encode("utf-16")))
    add(tok(utf8.encode("utf-16-le")))
    add(tok(utf8.encode("utf-32")))
    add(tok(f'{{"sub":"caf\xe9",{tail}}}'.encode("latin-1")))  # not UTF-8
    add(tok(f'{{"sub":"\xe9\u00e9",{tail}}}'.encode()))
    add(tok(b'{"sub":"\xed\xa0\x80",' + tail.encode() + b"}"))  # UTF-8 surrogate
    for depth in (50, 255, 300, 1100, 5000):
        nested = "[" * depth + "]" * depth
        add(tok(f'{{"sub":"alice","info":{{"d":{nested}}},{tail}}}'.encode()))
    add(tok(("[" * 5000 + "]" * 5000).encode()))

    # Headers: alg, kid, crit, b64, typ, and not-objects.
    payload = _claims(now, aud=AUDIENCE, iss=ISSUER, uid="u")
    for header in (
        {"alg": "none"},
        {"alg": "None"},
        {"alg": "NONE"},
        {"alg": "hs256"},
        {"alg": ""},
        {"alg": None},
        {"alg": ["HS256"]},
        {"alg": 256},
        {"typ": "JWT"},
        {},
        {"alg": alg, "kid": 5},
        {"alg": alg, "kid": None},
        {"alg": alg, "kid": ""},
        {"alg": "none", "kid": 5},
        {"alg": alg, "typ": 5},
        {"alg": alg, "typ": "at+jwt"},
        {"alg": alg, "crit": ["b64"]},
        {"alg": alg, "crit": ["b64"], "b64": True},
        {"alg": alg, "crit": ["b64"], "b64": False},
        {"alg": alg, "b64": False},
        {"alg": "none", "b64": False, "crit": ["b64"]},
        {"alg": alg, "b64": 0},
        {"alg": alg, "b64": "false"},
        {"alg": alg, "crit": []},
        {"alg": alg, "crit": "b64", "b64": True},
        {"alg": alg, "crit": ["exp"], "exp": 1},
        {"alg": alg, "crit": [5]},
        {"alg": "none", "crit": []},
        {"alg": "RS256"},
        {"alg": "RS256", "kid": "k1"},
        {"alg": "ES256"},
        {"alg": "HS384"},
        {"alg": "HS512"},
    ):
        add(tok(payload, header))
        add(tok(payload, header, hash_name="sha256"))
    for raw_header in (
        b'{"alg":"none","alg":"HS256"}',
        b'{"alg":"HS256","alg":"none"}',
        b'{"alg":"HS256","kid":1e400}',
        b'{"alg":"HS256","x":NaN}',
        b'\xef\xbb\xbf{"alg":"HS256"}',
        '{"alg":"HS256"}'.encode("utf-16"),
        b'{"alg":"HS256","x":' + b"[" * 1100 + b"]" * 1100 + b"}",
        b'["HS256"]',
        b'"HS256"',
        b"null",
        b"",
        b"{",
        b"alg",
    ):
        add(tok(payload, raw_header, hash_name="sha256"))
    # b64=false tokens as a detached-payload issuer would send them: empty payload segment.
    for header in ({"alg": alg, "b64": False, "crit": ["b64"]}, {"alg": alg, "b64": False}):
        head = _b64(json.dumps(header).encode())
        add(f"{head}..{_sign(head + '.')}")
        add(f"{head}.{_b64(b'{}')}.{_sign(head + '.' + _b64(b'{}'))}")

    # Signatures and segments.
    valid = tok(payload)
    head, body, sig = valid.split(".")
    raw_sig = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    forged = _b64(json.dumps(_claims(now, sub="admin", aud=AUDIENCE, iss=ISSUER)).encode())
    add(f"{head}.{forged}.{sig}")  # tampered payload, original signature
    add(tok(payload, key=b"another-secret-" + b"w" * 49))
    add(tok(payload, {"alg": "HS256"}, hash_name="sha384"))
    add(tok(payload, {"alg": "HS512"}, hash_name="sha256"))
    add(tok(payload, key=_public_pem(rsa_key).encode()))  # the PEM as HMAC secret
    add(jwt.encode(payload, rsa_key, algorithm="RS256"))
    add(jwt.encode(payload, rsa_key, algorithm="RS256", headers={"kid": "k1"}))
    rs_header = _b64(b'{"alg":"RS256","kid":5}')
    rs_input = f"{rs_header}.{_b64(json.dumps(payload).encode())}"
    rs_signature = RSAAlgorithm(RSAAlgorithm.SHA256).sign(rs_input.encode(), rsa_key)
    add(f"{rs_input}.{_b64(rs_signature)}")  # pyjwt will not sign a non-string kid
    add(jwt.encode(payload, rsa_key, algorithm="PS256"))
    for variant in (
        f"{head}.{body}.",
        f"{head}.{body}.{sig[:-1]}",
        f"{head}.{body}.{sig[:-2]}",
        f"{head}.{body}.{sig[:-4]}",
        f"{head}.{body}.{_b64(raw_sig[:-1])}",
        f"{head}.{body}.{_b64(raw_sig + b'x')}",
        f"{head}.{body}.{sig}=",  # 43 chars + "=": correctly padded, PyJWT accepts
        f"{head}.{body}.{sig}==",
        f"{head}.{body}.{sig}===",
        f"{head}.{body}.{sig}A",
        f"{head}.{body}.{sig}AA",
        f"{head}.{body}.{sig[:-1]}{chr(ord(sig[-1]) ^ 1)}",
        f"{head}.{body}.{sig.replace('-', '+').replace('_', '/')}",
        f"{head}.{body}.{base64.b64encode(raw_sig).decode()}",
        f"{head}.{body}.{sig}.{sig}",
        f"{head}.{body}.{body}.{sig}",
        f"{head}.{sig}",
        f"{head}.{body}",
        head,
        f"{head}..{sig}",
        f".{body}.{sig}",
        "..",
        "...",
        ".",
        "a.b.c",
        "e30.e30.",
        f" {valid}",
        f"{valid} ",
        f"{valid}\n",
        f"{head}.{body} .{sig}",
        f"{head}.{body}.{sig}\u00e9",
        f"{head}\u0430.{body}.{sig}",
        f"{head}.{body}.{sig}\ud800",
        f"{head}.{body}.\x00",
    ):
        add(variant)
    # The same bytes with "=" padding on each segment: PyJWT tolerates exact padding.
    for padded in _padding_variants(valid):
        add(padded)
    # Non-canonical base64: a last character with stray low bits.
    for position, segment in enumerate((head, body, sig)):
        bumped = segment[:-1] + _bump_last(segment[-1], len(segment))
        parts = [head, body, sig]
        parts[position] = bumped
        add(".".join(parts))
    return tokens


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _bump_last(char: str, length: int) -> str:
    """The last character with its unused low bits set (a non-canonical spelling)."""
    index = _ALPHABET.index(char)
    unused = {2: 0b1111, 3: 0b11}.get(length % 4, 0)
    return _ALPHABET[index | unused] if unused else char


def _padding_variants(token: str) -> Iterator[str]:
    parts = token.split(".")
    for i, segment in enumerate(parts):
        pad = "=" * (-len(segment) % 4)
        for extra in (pad, pad + "=", pad[:-1] if pad else "=", "=" * 4):
            changed = list(parts)
            changed[i] = segment + extra
            yield ".".join(changed)


async def test_corpus_same_outcome_on_both_paths(
    make_verifier: Callable[[str], TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    for name in SETTINGS_NAMES:
        verifier = make_verifier(name)
        for alg in CORPUS_ALGS.get(name, ("HS256",)):
            tokens = _corpus(rsa_key, alg)
            assert len(tokens) > 350
            differences = await _differences(verifier, tokens)
            assert not differences, f"{name} {alg}: {len(differences)} differences\n" + (
                "\n".join(differences[:5])
            )


async def test_corpus_reaches_every_outcome(
    make_verifier: Callable[[str], TokenVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    # A differential test is only as good as the paths its corpus reaches: check that the
    # corpus produces every outcome the verifier has.
    seen: set[str] = set()
    for name in ("default", "aud-iss-no-leeway", "aud-leeway-30-uid", "short-secret"):
        verifier = make_verifier(name)
        for token in _corpus(rsa_key, CORPUS_ALGS.get(name, ("HS256",))[0]):
            for kind, message in await _run(verifier, token, pyjwt=False):
                seen.add("accepted" if kind == "ok" else f"{kind}: {message}")
    expected = {
        "accepted",
        "TokenExpired: token expired",
        "TokenError: malformed token",
        "TokenError: algorithm not allowed",
        "TokenError: bad signature",
        "TokenError: token not yet valid",
        "TokenError: wrong audience",
        "TokenError: wrong issuer",
        "TokenError: missing aud claim",
        "TokenError: missing iss claim",
        "TokenError: bad iat claim",
        "TokenError: signing key refused",
        "TokenError: exp claim must be a number",
        "TokenError: missing or empty user claim 'sub'",
        "TokenError: missing or empty user claim 'uid'",
        "TokenError: token belongs to another user",
        "TokenError: token is for another channel",
    }
    assert expected <= seen, expected - seen


# --- random mutations ----------------------------------------------------------------------

_MUTATION_CHARS = _ALPHABET + "=.+/ \x00\u00e9"
_JSON_CHARS = [*b'{}[]":,0123456789.eE+-tfnrueals \\u\t', 0xED, 0xA0, 0x80, 0xC3, 0xFF]


def _mutate_text(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(chars) + 1)
        op = rng.random()
        if op < 0.5 and chars:
            chars[min(position, len(chars) - 1)] = rng.choice(_MUTATION_CHARS)
        elif op < 0.75:
            chars.insert(position, rng.choice(_MUTATION_CHARS))
        elif op < 0.9 and chars:
            del chars[min(position, len(chars) - 1)]
        else:
            chars = chars[:position]
    return "".join(chars)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(mutated) + 1)
        op = rng.random()
        if op < 0.45 and mutated:
            mutated[min(position, len(mutated) - 1)] = rng.choice(_JSON_CHARS)
        elif op < 0.8:
            mutated[position:position] = bytes([rng.choice(_JSON_CHARS)])
        elif mutated:
            del mutated[min(position, len(mutated) - 1)]
    return bytes(mutated)


def _mutants(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    now = int(time.time())
    payloads = [
        _claims(now, aud=AUDIENCE, iss=ISSUER, uid="u", channel="chat:1"),
        _claims(now, aud=[AUDIENCE, "x"], iss=ISSUER, uid="u", nbf=now - 100, jti="j"),
        {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "info": {"n": [1, 2.5, None, True]}},
        _claims(now, exp=now - 2, aud=AUDIENCE, iss=ISSUER, uid="u"),
    ]
    headers = [
        {"alg": "HS256", "typ": "JWT"},
        {"alg": "HS384"},
        {"alg": "HS512", "kid": "k"},
        {"alg": "HS256", "crit": ["b64"], "b64": True},
    ]
    tokens = []
    for _ in range(count):
        payload = json.dumps(rng.choice(payloads), separators=(",", ":")).encode()
        header = json.dumps(rng.choice(headers), separators=(",", ":")).encode()
        kind = rng.random()
        if kind < 0.4:
            # Flip characters of a valid token: mostly malformed or bad signature.
            tokens.append(_mutate_text(rng, _token(payload, header)))
        elif kind < 0.8:
            # Mutate the payload JSON and sign it: exercises parsing and claims.
            tokens.append(_token(_mutate_bytes(rng, payload), header))
        else:
            # Mutate the header JSON and sign with the hash its alg would use.
            tokens.append(_token(payload, _mutate_bytes(rng, header)))
    return tokens


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_mutations_same_outcome_on_both_paths(
    make_verifier: Callable[[str], TokenVerifier], seed: int
) -> None:
    tokens = _mutants(seed, 1500)
    for name in ("default", "aud-iss-no-leeway", "aud-leeway-30-uid", "40-byte-secret"):
        verifier = make_verifier(name)
        differences = await _differences(verifier, tokens)
        assert not differences, f"{name}, seed {seed}:\n" + "\n".join(differences[:5])


# --- the building blocks against PyJWT's own -------------------------------------------------


def _pyjwt_segment(segment: bytes) -> bytes | None:
    try:
        return PyJWS._decode_base64url_segment(segment, "x")
    except jwt.DecodeError:
        return None


def _fast_segment(segment: bytes) -> bytes | None:
    try:
        return jwt_hmac._decode_segment(segment, "x")
    except jwt.DecodeError:
        return None


def test_base64url_segments_exhaustively_like_pyjwt() -> None:
    # Every one- and two-byte segment, padded or not, and every three-character one
    # over the alphabet plus junk: covers each last-character case.
    chars = (_ALPHABET + "=+/. \x00").encode()
    segments = [bytes([a]) for a in range(256)]
    segments += [bytes([a, b]) for a in range(256) for b in range(256)]
    segments += [bytes([a, b, c]) for a in chars for b in chars for c in chars]
    segments += [s + b"=" * n for s in segments[::97] for n in (1, 2, 3)]
    for segment in segments:
        assert _fast_segment(segment) == _pyjwt_segment(segment), segment


def test_base64url_random_segments_like_pyjwt() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        data = rng.randbytes(rng.randrange(40))
        encoded = base64.urlsafe_b64encode(data)
        segment = _mutate_text(rng, encoded.decode()).encode("utf-8", "surrogatepass")
        for candidate in (encoded, encoded.rstrip(b"="), segment):
            assert _fast_segment(candidate) == _pyjwt_segment(candidate), candidate


def _json_outcome(loads: Callable[[bytes], Any], data: bytes) -> str:
    try:
        return repr(loads(data))
    except (ValueError, RecursionError) as exc:
        return f"error {type(exc).__name__}"


def test_loads_json_like_stdlib_json() -> None:
    rng = random.Random(11)
    seeds = [
        b'{"a":1,"b":[1,2.5,-3e4,"x\\u00e9\\ud83d\\ude00"],"c":{"d":null,"e":true,"f":false}}',
        b'{"n":123456789012345678,"f":1.7976931348623157e308,"g":2.2250738585072011e-308}',
        b'{"big":18446744073709551616,"neg":-9223372036854775809,"x":1e400}',
        b'{"a":1,"a":2,"b":{"c":NaN}}',
    ]
    samples = [*seeds, b"\xef\xbb\xbf{}", "{}".encode("utf-16"), b"[" * 300 + b"]" * 300]
    for _ in range(30000):
        samples.append(_mutate_bytes(rng, rng.choice(seeds)))
    for data in samples:
        # json errors differ in wording; the kind (ValueError subclass) is what PyJWT uses.
        fast, stdlib = _json_outcome(jwt_hmac.loads_json, data), _json_outcome(json.loads, data)
        if fast.startswith("error"):
            assert stdlib.startswith("error"), data
        else:
            assert fast == stdlib, data


def test_orjson_and_json_differences_are_handled() -> None:
    # The differences loads_json exists for; if orjson changes, revisit loads_json.
    assert orjson.loads(b'{"n":18446744073709551616}') == {"n": 1.8446744073709552e19}
    assert json.loads(b'{"n":18446744073709551616}') == {"n": 18446744073709551616}
    assert jwt_hmac.loads_json(b'{"n":18446744073709551616}') == {"n": 18446744073709551616}
    for text in (b'{"n":NaN}', b'{"n":1e400}', b"\xef\xbb\xbf{}", b'{"s":"\\ud800"}'):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(text)
        assert repr(jwt_hmac.loads_json(text)) == repr(json.loads(text))
    # Duplicate keys: both keep the last value, in the first key's position.
    text = b'{"sub":"alice","x":1,"sub":"admin"}'
    assert list(orjson.loads(text).items()) == list(json.loads(text).items())
    deep = b"[" * 1000 + b"]" * 1000
    assert orjson.loads(deep) is not None  # json would hit the recursion limit here
    with pytest.raises(RecursionError):
        jwt_hmac.loads_json(deep)


def test_hmac_verifier_refuses_unsupported_options() -> None:
    for options in (
        {"verify_signature": False},
        {"strict_aud": True},
        {"enforce_minimum_key_length": False},
        {},
        {"enforce_minimum_key_length": True, "leeway": 5},
    ):
        with pytest.raises(ValueError):
            jwt_hmac.HmacVerifier(KEY, ["HS256"], options=options)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        jwt_hmac.HmacVerifier(KEY, ["RS256"], options={"enforce_minimum_key_length": True})


def _pyjwt_decode(token: str, algorithms: list[str], options: Any) -> Any:
    try:
        return jwt.PyJWT().decode(token, KEY, algorithms, options=options, leeway=1.0)
    except jwt.PyJWTError as exc:
        return type(exc)


def _fast_decode(token: str, algorithms: list[str], options: Any) -> Any:
    fast = jwt_hmac.HmacVerifier(KEY, algorithms, options=options, leeway=1.0)
    try:
        return fast.decode(jwt_hmac.split_token(token))
    except jwt.PyJWTError as exc:
        return type(exc)


def test_hmac_verifier_options_like_pyjwt() -> None:
    # TokenVerifier uses one option set and checks alg itself first; HmacVerifier alone
    # must still behave like PyJWT for the other toggles it accepts and for any alg.
    now = int(time.time())
    payload = _claims(now)
    tokens = [
        _token(_claims(now, sub=5, jti=5, exp=now - 100, nbf=now + 100, iat="x")),
        _token(_claims(now, aud="x", iss="y")),
        _token({"sub": None, "exp": None}),
        _token({"exp": now + 60}),
        _token(payload, {"typ": "JWT"}),
        _token(payload, {"alg": ""}),
        _token(payload, {"alg": None}),
        _token(payload, {"alg": ["HS256"]}),
        _token(payload, {"alg": "HS384"}),
        _token(payload, {"alg": "RS256"}),
        _token(payload, {"alg": "none"}),
    ]
    option_sets: list[dict[str, Any]] = [
        {},
        {"verify_exp": False},
        {"verify_nbf": False, "verify_iat": False},
        {"verify_sub": True, "verify_jti": False},
        {"require": ["exp", "sub"]},
        {"verify_aud": True, "verify_iss": True},
        {"verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False},
    ]
    for algorithms in (["HS256"], ["HS256", "HS384"], []):
        for options in option_sets:
            full = {"enforce_minimum_key_length": True, **options}
            for token in tokens:
                expected = _pyjwt_decode(token, algorithms, full)
                assert _fast_decode(token, algorithms, full) == expected, (options, token)


def test_pyjwt_version_is_the_audited_one() -> None:
    # signaling/jwt_hmac.py mirrors PyJWT 2.15.1's decode step by step. After an upgrade,
    # re-read jwt/api_jws.py and jwt/api_jwt.py against it, run these tests, then move
    # this pin.
    assert jwt.__version__ == "2.15.1"


# --- the tests can fail: sabotaged fast paths ------------------------------------------------


def _sabotage_signature(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    fake = types.SimpleNamespace(new=hmac.new, compare_digest=lambda a, b: True)
    monkeypatch.setattr(jwt_hmac, "hmac", fake)


def _sabotage_canonical_base64(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    anything = frozenset(_ALPHABET.encode())
    monkeypatch.setattr(jwt_hmac, "_CANONICAL_LAST", {2: anything, 3: anything})


def _sabotage_json_fallback(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    monkeypatch.setattr(jwt_hmac, "loads_json", orjson.loads)


def _sabotage_big_ints(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    monkeypatch.setattr(jwt_hmac, "_MAX_DIGIT_RUN", 10**6)


def _sabotage_header_checks(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    monkeypatch.setattr(jwt_hmac, "_validate_headers", lambda header: None)


def _sabotage_audience(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    monkeypatch.setattr(jwt_hmac, "_validate_aud", lambda payload, audience: None)


def _sabotage_leeway(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    assert verifier._hmac_fast is not None
    monkeypatch.setattr(verifier._hmac_fast, "_leeway", 0.0)


def _sabotage_key_check(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    assert verifier._hmac_fast is not None
    monkeypatch.setattr(verifier._hmac_fast, "_refused_key", {})


def _sabotage_iat(monkeypatch: pytest.MonkeyPatch, verifier: TokenVerifier) -> None:
    assert verifier._hmac_fast is not None
    monkeypatch.setattr(verifier._hmac_fast, "_verify_iat", False)


@pytest.mark.parametrize(
    ("sabotage", "settings_name"),
    [
        (_sabotage_signature, "default"),
        (_sabotage_canonical_base64, "default"),
        (_sabotage_json_fallback, "default"),
        (_sabotage_big_ints, "default"),
        (_sabotage_header_checks, "default"),
        (_sabotage_audience, "aud-iss-no-leeway"),
        (_sabotage_leeway, "default"),
        (_sabotage_key_check, "short-secret"),
        (_sabotage_iat, "default"),
    ],
)
async def test_corpus_catches_a_broken_fast_path(
    make_verifier: Callable[[str], TokenVerifier],
    rsa_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    sabotage: Callable[[pytest.MonkeyPatch, TokenVerifier], None],
    settings_name: str,
) -> None:
    verifier = make_verifier(settings_name)
    sabotage(monkeypatch, verifier)
    assert await _differences(verifier, _corpus(rsa_key))
