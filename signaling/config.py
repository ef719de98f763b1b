"""Server settings: one frozen dataclass, built from defaults, environment and CLI flags.

:func:`load_settings` merges three sources, later ones winning:

1. the defaults declared on :class:`Settings`;
2. the environment (``SIGNAL_*``, plus the platform's ``PORT``, ``REDIS_URL`` and
   ``WEB_CONCURRENCY``; see :data:`ENV_NAMES`);
3. ``overrides`` from CLI flags, keyed by field name.

Every :class:`Settings` is validated when it is built (``__post_init__``), so an invalid
value stops start-up before any socket opens, with one :class:`ConfigError` naming the
environment variable to fix. Nothing here warns and carries on, logs, or exits.

Building settings has no side effects, with one exception: ``SIGNAL_JWT_PUBLIC_KEY`` may
be a path to a PEM file, which is read once here.

Secrets (JWT secret and public key, Agora certificate) are wrapped in :class:`Secret`, so
they never show up in a repr, a log line or an error message.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Never
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "ENV_NAMES",
    "HMAC_ALGORITHMS",
    "JWT_ALGORITHMS",
    "ConfigError",
    "Secret",
    "Settings",
    "describe",
    "key_kind",
    "load_settings",
]


class Secret:
    """A secret string that refuses to show itself.

    ``repr()`` and ``str()`` give ``Secret('***')``; the text is only reachable through
    :attr:`value`, so an accidental ``f"{settings}"`` or ``logger.info(settings)`` cannot
    leak it. Equality compares values in constant time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def value(self) -> str:
        """The secret text."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


class ConfigError(Exception):
    """An invalid setting. ``str(error)`` is one line: ``"SETTING: message"``.

    ``setting`` is the environment variable name (``PORT``, ``SIGNAL_JWT_SECRET``...),
    because that is what an operator edits, even when the value came from a CLI flag.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


# HS* keys must be at least as long as the hash output (RFC 7518 §3.2). pyjwt warns below
# that and the verifier turns the warning into a refusal, so a short secret would make
# every token fail at run time: refuse it at start-up instead.
HMAC_ALGORITHMS: dict[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
# Asymmetric algorithms -> the kind of public key (see key_kind) each one verifies with.
ASYMMETRIC_ALGORITHMS: dict[str, str] = {
    **{f"RS{n}": "RSA" for n in (256, 384, 512)},
    **{f"PS{n}": "RSA" for n in (256, 384, 512)},
    "ES256": "EC P-256",
    "ES384": "EC P-384",
    "ES512": "EC P-521",
    "EdDSA": "Ed25519",
}
# Every algorithm a token may use. "none" is deliberately absent and refused by name.
JWT_ALGORITHMS: tuple[str, ...] = (*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS)
_ALGORITHMS_BY_LOWER = {name.lower(): name for name in JWT_ALGORITHMS}
# The algorithm to use by default for a configured PEM key of each kind.
_DEFAULT_ALGORITHM_FOR_KEY = {
    "RSA": "RS256",
    "EC P-256": "ES256",
    "EC P-384": "ES384",
    "EC P-521": "ES512",
    "Ed25519": "EdDSA",
}
_RSA_MIN_BITS = 2048  # NIST SP 800-131A; pyjwt refuses smaller keys like HMAC above
_EC_CURVES = {"secp256r1": "EC P-256", "secp384r1": "EC P-384", "secp521r1": "EC P-521"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# Strict number syntax: int()/float() also accept "1_000", "nan", "inf" and non-ASCII
# digits, none of which an operator means.
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PEM_PREFIX = "-----BEGIN"


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated server settings. Build with :func:`load_settings`.

    Every field has a default, so tests may also write ``Settings(dev=True, port=0)``;
    construction validates either way and raises :class:`ConfigError`.
    """

    # --- listening -----------------------------------------------------------------
    host: str = "0.0.0.0"  # interface to bind; default all interfaces
    port: int = 8000  # TCP port, 0-65535 (0 = ephemeral); default 8000
    workers: int = 1  # processes, >= 1; more than one needs redis_url; default 1
    dev: bool = False  # development mode: allows running without a JWT key; default off

    # --- broker --------------------------------------------------------------------
    redis_url: str | None = None  # redis://, rediss:// or unix:// URL; default None = in memory
    redis_cluster: bool = False  # treat redis_url as a Redis Cluster node; default off
    # Redis Cluster client connections per process, >= 2; default 16 (standalone Redis
    # uses one pipelined command connection).
    redis_pool_size: int = 16
    redis_prefix: str = "sig:"  # prefix of every Redis key and channel; default "sig:"

    # --- authentication (JWT) ------------------------------------------------------
    jwt_secret: Secret | None = None  # HMAC secret for HS*, >= hash size in bytes; default None
    jwt_public_key: Secret | None = None  # PEM public key (RSA, EC, Ed25519); default None
    # https URL of a JWKS (Firebase etc.; http only on loopback); needs jwt_audience;
    # default None
    jwt_jwks_url: str | None = None
    # Accepted token algorithms; default () = derived from the configured keys.
    jwt_algorithms: tuple[str, ...] = ()
    # required "aud" when set (must be, with a JWKS); default None = not checked
    jwt_audience: str | None = None
    jwt_issuer: str | None = None  # required "iss" when set; default None = not checked
    jwt_user_claim: str = "sub"  # claim holding the user id; default "sub"
    jwt_leeway_s: float = 5.0  # clock skew allowed on exp/nbf/iat, seconds 0-300; default 5
    jwks_cache_s: float = 3600.0  # how long fetched JWKS keys are trusted, seconds; default 1 h
    allowed_origins: tuple[str, ...] = ()  # accepted Origin headers; default () = any origin

    # --- Agora (calls) -------------------------------------------------------------
    agora_app_id: str | None = None  # Agora project app id; default None = calls disabled
    agora_app_certificate: Secret | None = None  # Agora certificate for RTC tokens; default None

    # --- WebSocket transport -------------------------------------------------------
    max_frame_bytes: int = 65536  # largest incoming frame, bytes >= 1024; default 64 KiB
    compression: bool = False  # permessage-deflate; default off (CPU and memory per client)
    send_buffer_max_bytes: int = 1048576  # per-client unsent bytes before "slow"; default 1 MiB
    ping_interval_s: float = 25.0  # server ping period, seconds >= 1; default 25
    pong_timeout_s: float = 10.0  # wait for pong, seconds, > 0 and < ping interval; default 10
    connect_timeout_s: float = 15.0  # WebSocket open -> successful connect, seconds; default 15
    expired_close_delay_s: float = 25.0  # refresh grace after a token's exp (3005, 2501), s; def 25

    # --- limits --------------------------------------------------------------------
    max_connections_per_user: int = 32  # concurrent connections per user, 0 = unlimited; def 32
    # Connect commands being processed at once, per process; beyond it upgrades
    # are answered 503 (reconnect storms), 0 = unlimited; default 5000
    max_connecting: int = 5000
    # Upgrades are answered 503 while recent connects took longer than this on
    # average (or none finished for that long) with 64+ in progress
    # (signaling.admission), seconds 0-60, 0 = off; default 3 (SDKs time out at 5)
    max_connect_wait_s: float = 3.0
    commands_per_second: float = 20.0  # token-bucket refill per connection, 0 = unlimited; def 20
    command_burst: int = 50  # token-bucket size, commands >= 1; default 50
    max_publication_bytes: int = 16384  # publication data, bytes < max_frame_bytes; default 16 KiB
    max_subscriptions_per_connection: int = 64  # channels per connection, >= 1; default 64

    # --- history and presence ------------------------------------------------------
    history_size: int = 100  # publications kept per channel, >= 0 (0 = none); default 100
    history_ttl_s: float = 86400.0  # channel history lifetime, seconds > 0; default 1 day
    presence_ttl_s: float = 60.0  # presence entry lifetime without refresh, seconds; default 60

    # --- calls (handlers/calls) ----------------------------------------------------
    call_ring_timeout_s: float = 30.0  # unanswered invite -> missed, seconds > 0; default 30
    call_max_duration_s: float = 14400.0  # accepted call is ended after, seconds; default 4 h
    # Warnings before the maximum duration, seconds before it; default 600,300,60.
    call_warnings_s: tuple[float, ...] = (600.0, 300.0, 60.0)
    call_tick_s: float = 60.0  # billing tick period of an accepted call, seconds; default 60
    call_grace_s: float = 20.0  # participant offline this long ends the call, s; default 20
    call_invites_per_minute: int = 3  # call.invite per caller per minute, >= 1; default 3
    agora_token_ttl_s: float = 3600.0  # Agora RTC token lifetime, seconds 60-86400; default 1 h
    call_events_stream: str = "signal:call-events"  # billing stream key; default as shown
    call_events_maxlen: int = 1000000  # entries kept in the billing stream (approx); def 1e6

    # --- chat and presence (handlers/chat, handlers/presence) ------------------------
    chat_max_text: int = 2000  # characters in a chat message's text, >= 1; default 2000
    chat_dedupe_window_s: float = 600.0  # client_msg_id remembered, seconds > 0; default 10 min
    typing_per_second: float = 2.0  # typing events per user per second, > 0; default 2
    viewer_count_interval_s: float = 5.0  # live-room viewer count period, seconds; default 5
    offline_grace_s: float = 10.0  # last connection closed -> offline after, seconds; def 10

    # --- lifecycle and logging -----------------------------------------------------
    drain_s: float = 5.0  # graceful-shutdown drain window, seconds 0-300; default 5
    # Restart without downtime: listen with SO_REUSEPORT so that a successor
    # started on the same port takes new connections, and on SIGTERM stop
    # listening at once (not after the drain); default off.
    handover: bool = False
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR (stored upper case); default INFO
    log_json: bool = False  # one JSON object per log line; default off (plain text)

    def __post_init__(self) -> None:
        _validate(self)


# Field name -> environment variable. The CLI uses it for --help text.
ENV_NAMES: dict[str, str] = {
    "host": "HOST",
    "port": "PORT",
    "workers": "WEB_CONCURRENCY",
    "dev": "SIGNAL_DEV",
    "redis_url": "REDIS_URL",
    "redis_cluster": "SIGNAL_REDIS_CLUSTER",
    "redis_pool_size": "SIGNAL_REDIS_POOL_SIZE",
    "redis_prefix": "SIGNAL_REDIS_PREFIX",
    "jwt_secret": "SIGNAL_JWT_SECRET",
    "jwt_public_key": "SIGNAL_JWT_PUBLIC_KEY",
    "jwt_jwks_url": "SIGNAL_JWT_JWKS_URL",
    "jwt_algorithms": "SIGNAL_JWT_ALGORITHMS",
    "jwt_audience": "SIGNAL_JWT_AUDIENCE",
    "jwt_issuer": "SIGNAL_JWT_ISSUER",
    "jwt_user_claim": "SIGNAL_JWT_USER_CLAIM",
    "jwt_leeway_s": "SIGNAL_JWT_LEEWAY_S",
    "jwks_cache_s": "SIGNAL_JWKS_CACHE_S",
    "allowed_origins": "SIGNAL_ALLOWED_ORIGINS",
    "agora_app_id": "AGORA_APP_ID",
    "agora_app_certificate": "AGORA_APP_CERTIFICATE",
    "max_frame_bytes": "SIGNAL_MAX_FRAME_BYTES",
    "compression": "SIGNAL_COMPRESSION",
    "send_buffer_max_bytes": "SIGNAL_SEND_BUFFER_MAX_BYTES",
    "ping_interval_s": "SIGNAL_PING_INTERVAL_S",
    "pong_timeout_s": "SIGNAL_PONG_TIMEOUT_S",
    "connect_timeout_s": "SIGNAL_CONNECT_TIMEOUT_S",
    "expired_close_delay_s": "SIGNAL_EXPIRED_CLOSE_DELAY_S",
    "max_connections_per_user": "SIGNAL_MAX_CONNECTIONS_PER_USER",
    "max_connecting": "SIGNAL_MAX_CONNECTING",
    "max_connect_wait_s": "SIGNAL_MAX_CONNECT_WAIT_S",
    "commands_per_second": "SIGNAL_COMMANDS_PER_SECOND",
    "command_burst": "SIGNAL_COMMAND_BURST",
    "max_publication_bytes": "SIGNAL_MAX_PUBLICATION_BYTES",
    "max_subscriptions_per_connection": "SIGNAL_MAX_SUBSCRIPTIONS",
    "history_size": "SIGNAL_HISTORY_SIZE",
    "history_ttl_s": "SIGNAL_HISTORY_TTL_S",
    "presence_ttl_s": "SIGNAL_PRESENCE_TTL_S",
    "call_ring_timeout_s": "SIGNAL_CALL_RING_TIMEOUT_S",
    "call_max_duration_s": "SIGNAL_CALL_MAX_DURATION_S",
    "call_warnings_s": "SIGNAL_CALL_WARNINGS_S",
    "call_tick_s": "SIGNAL_CALL_TICK_S",
    "call_grace_s": "SIGNAL_CALL_GRACE_S",
    "call_invites_per_minute": "SIGNAL_CALL_INVITES_PER_MINUTE",
    "agora_token_ttl_s": "SIGNAL_AGORA_TOKEN_TTL_S",
    "call_events_stream": "SIGNAL_CALL_EVENTS_STREAM",
    "call_events_maxlen": "SIGNAL_CALL_EVENTS_MAXLEN",
    "chat_max_text": "SIGNAL_CHAT_MAX_TEXT",
    "chat_dedupe_window_s": "SIGNAL_CHAT_DEDUPE_WINDOW_S",
    "typing_per_second": "SIGNAL_TYPING_PER_SECOND",
    "viewer_count_interval_s": "SIGNAL_VIEWER_COUNT_INTERVAL_S",
    "offline_grace_s": "SIGNAL_OFFLINE_GRACE_S",
    "drain_s": "SIGNAL_DRAIN_S",
    "handover": "SIGNAL_HANDOVER",
    "log_level": "SIGNAL_LOG_LEVEL",
    "log_json": "SIGNAL_LOG_JSON",
}

_SECRET_FIELDS = frozenset({"jwt_secret", "jwt_public_key", "agora_app_certificate"})
_BOOL_FIELDS = frozenset({"dev", "redis_cluster", "compression", "handover", "log_json"})
_INT_FIELDS = frozenset(
    {
        "port",
        "workers",
        "max_frame_bytes",
        "send_buffer_max_bytes",
        "max_connections_per_user",
        "max_connecting",
        "command_burst",
        "max_publication_bytes",
        "max_subscriptions_per_connection",
        "history_size",
        "redis_pool_size",
        "call_invites_per_minute",
        "call_events_maxlen",
        "chat_max_text",
    }
)
_FLOAT_TUPLE_FIELDS = frozenset({"call_warnings_s"})
_FLOAT_FIELDS = frozenset(
    name for name in ENV_NAMES if name.endswith("_s") and name not in _FLOAT_TUPLE_FIELDS
) | {"commands_per_second", "typing_per_second"}
_TUPLE_FIELDS = frozenset({"jwt_algorithms", "allowed_origins"})


# --- building -----------------------------------------------------------------------


def load_settings(
    environ: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> Settings:
    """Build validated settings from defaults, then ``environ``, then ``overrides``.

    Args:
        environ: usually ``os.environ``; only the names in :data:`ENV_NAMES` are read.
            An empty value counts as unset.
        overrides: CLI flag values keyed by field name, already typed (a ``str`` is also
            accepted and parsed like the environment). ``None`` values are ignored.

    Raises:
        ConfigError: the first invalid setting, named by its environment variable.
    """
    values: dict[str, object] = {}
    for name, env_name in ENV_NAMES.items():
        text = environ.get(env_name, "").strip()
        if text:
            values[name] = _parse_text(name, text)
    for name, value in (overrides or {}).items():
        if name not in ENV_NAMES:
            # A programming error in the CLI, not an operator mistake; still one line.
            raise ConfigError(name, "unknown setting")
        if value is not None:
            values[name] = _coerce_override(name, value)
    public_key = values.get("jwt_public_key")
    if isinstance(public_key, Secret):
        values["jwt_public_key"] = _resolve_public_key(public_key)
    return Settings(**values)  # type: ignore[arg-type]  # each value was type-checked above


def describe(settings: Settings) -> dict[str, str]:
    """A loggable summary of ``settings``, field name -> text, for the start-up log line.

    Secrets appear as ``"***"`` (``"None"`` when unset), and a password inside
    ``redis_url`` is masked the same way.
    """
    summary: dict[str, str] = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, Secret):
            text = "***"
        elif field.name == "redis_url" and isinstance(value, str):
            text = _mask_url_password(value)
        elif field.name == "allowed_origins" and not value:
            text = "*"
        elif isinstance(value, tuple):
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "-"
        else:
            text = str(value)
        summary[field.name] = text
    return summary


def _parse_text(name: str, text: str) -> object:
    """Parse one environment (or string override) value for field ``name``."""
    env_name = ENV_NAMES[name]
    if name in _SECRET_FIELDS:
        return Secret(text)
    if name in _BOOL_FIELDS:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(env_name, f"expected 1/0/true/false/yes/no/on/off, got {text!r}")
    if name in _INT_FIELDS:
        if not _INT_RE.fullmatch(text):
            raise ConfigError(env_name, f"expected an integer, got {text!r}")
        return int(text)
    if name in _FLOAT_FIELDS:
        if not _FLOAT_RE.fullmatch(text):
            raise ConfigError(env_name, f"expected a number of seconds, got {text!r}")
        return float(text)
    if name in _TUPLE_FIELDS:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if name in _FLOAT_TUPLE_FIELDS:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not all(_FLOAT_RE.fullmatch(p) for p in parts):
            raise ConfigError(env_name, f"expected comma-separated seconds, got {text!r}")
        return tuple(float(p) for p in parts)
    return text


def _coerce_override(name: str, value: object) -> object:
    """Check the type of one CLI override; strings are parsed like the environment."""
    env_name = ENV_NAMES[name]
    if isinstance(value, str) and name not in _SECRET_FIELDS and name in _typed_fields():
        return _parse_text(name, value.strip())
    checks: dict[str, Callable[[object], bool]] = {
        "secret": lambda v: isinstance(v, Secret | str),
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "tuple": lambda v: isinstance(v, list | tuple) and all(isinstance(i, str) for i in v),
        "floats": lambda v: (
            isinstance(v, list | tuple)
            and all(isinstance(i, int | float) and not isinstance(i, bool) for i in v)
        ),
        "str": lambda v: isinstance(v, str),
    }
    kind = _kind(name)
    if not checks[kind](value):
        raise ConfigError(env_name, f"expected a {kind} value, got {type(value).__name__}")
    if isinstance(value, str) and kind == "secret":
        return Secret(value)
    if isinstance(value, list | tuple):
        return tuple(float(v) for v in value) if kind == "floats" else tuple(value)
    if kind == "float" and isinstance(value, int):
        return float(value)
    return value


def _kind(name: str) -> str:
    if name in _SECRET_FIELDS:
        return "secret"
    if name in _BOOL_FIELDS:
        return "bool"
    if name in _INT_FIELDS:
        return "int"
    if name in _FLOAT_FIELDS:
        return "float"
    if name in _TUPLE_FIELDS:
        return "tuple"
    if name in _FLOAT_TUPLE_FIELDS:
        return "floats"
    return "str"


def _typed_fields() -> frozenset[str]:
    return _BOOL_FIELDS | _INT_FIELDS | _FLOAT_FIELDS | _TUPLE_FIELDS | _FLOAT_TUPLE_FIELDS


def _resolve_public_key(value: Secret) -> Secret:
    """PEM text stays as is; anything else is a path to a PEM file, read here."""
    text = value.value.strip()
    if text.startswith(_PEM_PREFIX):
        # Some dashboards only take one-line values, so operators paste "\n" escapes.
        if "\n" not in text and "\\n" in text:
            text = text.replace("\\n", "\n")
        return Secret(text)
    try:
        return Secret(Path(text).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        # The value is not echoed: it may be key material pasted without its PEM header.
        raise ConfigError(
            ENV_NAMES["jwt_public_key"],
            f"not PEM text (starting {_PEM_PREFIX}) and not a readable PEM file path",
        ) from None


def _mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


# --- validation ---------------------------------------------------------------------


def _validate(s: Settings) -> None:
    """Field checks in declaration order, then cross-field rules; first failure raises."""
    for name in ENV_NAMES:
        if name in _FLOAT_FIELDS and not math.isfinite(getattr(s, name)):
            _fail(name, "must be a finite number")
    _check(bool(s.host), "host", "must not be empty")
    _check_range(s, "port", 0, 65535)
    _check_range(s, "workers", 1)
    _validate_redis(s)
    _validate_jwt(s)
    _validate_origins(s)
    _check(
        s.agora_app_certificate is None or s.agora_app_id is not None,
        "agora_app_certificate",
        "an Agora certificate needs its app id: set AGORA_APP_ID",
    )
    _check_range(s, "max_frame_bytes", 1024)
    _check_range(s, "send_buffer_max_bytes", 16384)
    _check_range(s, "ping_interval_s", 1.0)
    _check(s.pong_timeout_s > 0, "pong_timeout_s", "must be > 0")
    _check(
        s.pong_timeout_s < s.ping_interval_s,
        "pong_timeout_s",
        f"must be shorter than the ping interval ({s.ping_interval_s:g} s, "
        f"{ENV_NAMES['ping_interval_s']})",
    )
    _check(s.connect_timeout_s > 0, "connect_timeout_s", "must be > 0")
    _check_range(s, "expired_close_delay_s", 0.0)
    _check_range(s, "max_connections_per_user", 0)
    _check_range(s, "max_connecting", 0)
    _check_range(s, "max_connect_wait_s", 0.0, 60.0)
    _check_range(s, "commands_per_second", 0.0)
    _check_range(s, "command_burst", 1)
    _check_range(s, "max_publication_bytes", 1)
    _check(
        s.max_publication_bytes < s.max_frame_bytes,
        "max_publication_bytes",
        f"must be below the frame limit ({s.max_frame_bytes} bytes, "
        f"{ENV_NAMES['max_frame_bytes']}) to leave room for the envelope",
    )
    _check_range(s, "max_subscriptions_per_connection", 1)
    _check_range(s, "history_size", 0)
    _check(s.history_ttl_s > 0, "history_ttl_s", "must be > 0")
    _check(s.presence_ttl_s > 0, "presence_ttl_s", "must be > 0")
    _validate_domain(s)
    _check_range(s, "drain_s", 0.0, 300.0)
    level = s.log_level.upper()
    _check(level in _LOG_LEVELS, "log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
    object.__setattr__(s, "log_level", level)


def _validate_domain(s: Settings) -> None:
    """Calls and chat settings."""
    _check(s.call_ring_timeout_s > 0, "call_ring_timeout_s", "must be > 0")
    _check(s.call_max_duration_s > 0, "call_max_duration_s", "must be > 0")
    _check(
        all(0 < w < s.call_max_duration_s for w in s.call_warnings_s),
        "call_warnings_s",
        "each warning must be > 0 and shorter than the maximum call duration",
    )
    _check(s.call_tick_s > 0, "call_tick_s", "must be > 0")
    _check(s.call_grace_s > 0, "call_grace_s", "must be > 0")
    _check_range(s, "call_invites_per_minute", 1)
    _check_range(s, "agora_token_ttl_s", 60.0, 86400.0)
    _check(bool(s.call_events_stream), "call_events_stream", "must not be empty")
    _check_range(s, "call_events_maxlen", 1000)
    _check_range(s, "chat_max_text", 1)
    _check(s.chat_dedupe_window_s > 0, "chat_dedupe_window_s", "must be > 0")
    _check(s.typing_per_second > 0, "typing_per_second", "must be > 0")
    _check(s.viewer_count_interval_s > 0, "viewer_count_interval_s", "must be > 0")
    _check(s.offline_grace_s >= 0, "offline_grace_s", "must be >= 0")


def _validate_redis(s: Settings) -> None:
    if s.redis_url is not None:
        scheme = urlsplit(s.redis_url).scheme
        # Only the scheme is echoed: the URL may carry a password.
        _check(
            scheme in ("redis", "rediss", "unix"),
            "redis_url",
            f"must start with redis://, rediss:// or unix:// (got scheme {scheme!r})",
        )
    _check_range(s, "redis_pool_size", 2, 1024)
    _check(bool(s.redis_prefix), "redis_prefix", "must not be empty")
    _check(
        not s.redis_cluster or s.redis_url is not None,
        "redis_cluster",
        "cluster mode needs a node address: set REDIS_URL",
    )
    _check(
        s.workers == 1 or s.redis_url is not None,
        "workers",
        "several workers need a shared broker: set REDIS_URL",
    )
    _check(
        s.workers == 1 or s.port != 0,
        "workers",
        "several workers share one port: PORT=0 would give each a port of its own",
    )


def _validate_jwt(s: Settings) -> None:
    """Keys, algorithms and claim settings; derives jwt_algorithms when left empty."""
    key_kind = _public_key_kind(s.jwt_public_key) if s.jwt_public_key is not None else None
    _check(
        s.dev or s.jwt_secret is not None or key_kind is not None or s.jwt_jwks_url is not None,
        "jwt_secret",
        "no JWT key configured: set SIGNAL_JWT_SECRET, SIGNAL_JWT_PUBLIC_KEY or "
        "SIGNAL_JWT_JWKS_URL (or run with --dev)",
    )
    if s.jwt_jwks_url is not None:
        _validate_jwks(s, s.jwt_jwks_url)
    algorithms = _canonical_algorithms(s.jwt_algorithms) or _default_algorithms(s, key_kind)
    object.__setattr__(s, "jwt_algorithms", algorithms)
    for algorithm in algorithms:
        if algorithm in HMAC_ALGORITHMS:
            _check_hmac_secret(s.jwt_secret, algorithm)
        else:
            _check(
                key_kind is not None or s.jwt_jwks_url is not None,
                "jwt_algorithms",
                f"{algorithm} needs a public key: set SIGNAL_JWT_PUBLIC_KEY or SIGNAL_JWT_JWKS_URL",
            )
    if key_kind is not None and s.jwt_jwks_url is None:
        # Without a JWKS the PEM key is the only asymmetric key: some listed
        # algorithm must be able to use it, or every such token would fail.
        usable = [a for a in algorithms if ASYMMETRIC_ALGORITHMS.get(a) == key_kind]
        _check(
            bool(usable),
            "jwt_algorithms",
            f"none of the listed algorithms verifies the {key_kind} key of "
            f"SIGNAL_JWT_PUBLIC_KEY (use {_DEFAULT_ALGORITHM_FOR_KEY[key_kind]})",
        )
    _check(bool(s.jwt_user_claim), "jwt_user_claim", "must not be empty")
    _check_range(s, "jwt_leeway_s", 0.0, 300.0)
    _check(s.jwks_cache_s > 0, "jwks_cache_s", "must be > 0")


def _validate_jwks(s: Settings, url: str) -> None:
    parts = urlsplit(url)
    _check(
        parts.scheme in ("http", "https") and bool(parts.netloc),
        "jwt_jwks_url",
        f"must be an http:// or https:// URL (got scheme {parts.scheme!r})",
    )
    # Whoever can answer for the key set can sign in as anyone: plain http only
    # where nobody sits between us and the issuer.
    _check(
        parts.scheme == "https" or _is_loopback(parts.hostname),
        "jwt_jwks_url",
        "must be an https:// URL (plain http only on a loopback address)",
    )
    # A JWKS is usually shared far beyond this application: Google signs every
    # Firebase project's ID tokens with the same keys, an Auth0 tenant signs the
    # tokens of all its APIs. Only the audience says a token was made for us.
    _check(
        s.jwt_audience is not None,
        "jwt_audience",
        "SIGNAL_JWT_JWKS_URL needs SIGNAL_JWT_AUDIENCE (the keys also sign tokens for "
        "other applications; e.g. the Firebase project id)",
    )


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _canonical_algorithms(names: tuple[str, ...]) -> tuple[str, ...]:
    """Map names case-insensitively to their JOSE spelling ("hs256" -> "HS256"), deduped."""
    result: list[str] = []
    for raw in names:
        name = raw.strip()
        if name.lower() == "none":
            # Unsigned tokens would let anyone claim any user (RFC 8725 §2.1).
            _fail("jwt_algorithms", "'none' is never allowed: tokens must be signed")
        canonical = _ALGORITHMS_BY_LOWER.get(name.lower())
        if canonical is None:
            _fail(
                "jwt_algorithms",
                f"unknown algorithm {name!r}; choose from {', '.join(JWT_ALGORITHMS)}",
            )
        elif canonical not in result:
            result.append(canonical)
    return tuple(result)


def _default_algorithms(s: Settings, key_kind: str | None) -> tuple[str, ...]:
    result: list[str] = []
    if s.jwt_secret is not None:
        result.append("HS256")
    if key_kind is not None:
        result.append(_DEFAULT_ALGORITHM_FOR_KEY[key_kind])
    if s.jwt_jwks_url is not None and "RS256" not in result:
        # RS256 is what JWKS issuers such as Firebase and Auth0 sign with.
        result.append("RS256")
    return tuple(result)


def _check_hmac_secret(secret: Secret | None, algorithm: str) -> None:
    _check(
        secret is not None,
        "jwt_algorithms",
        f"{algorithm} needs a shared secret: set SIGNAL_JWT_SECRET",
    )
    if secret is not None:
        min_bytes = HMAC_ALGORITHMS[algorithm]
        _check(
            len(secret.value.encode()) >= min_bytes,
            "jwt_secret",
            f"too short for {algorithm}: use at least {min_bytes} bytes (RFC 7518 §3.2)",
        )


def key_kind(key: object) -> str | None:
    """Name a public key object's kind as in :data:`ASYMMETRIC_ALGORITHMS`.

    Returns ``"RSA"``, ``"EC P-256"``, ``"EC P-384"``, ``"EC P-521"``, ``"Ed25519"``, or
    ``None`` for anything else (other curves, private keys, non-keys).
    """
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_CURVES.get(key.curve.name)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return None


def _public_key_kind(pem: Secret) -> str:
    """Parse the PEM public key and name its kind ("RSA", "EC P-256", "Ed25519")."""
    setting = "jwt_public_key"
    try:
        key = load_pem_public_key(pem.value.encode())
    except (ValueError, TypeError):
        # Never echo the text, and hint at the usual mistake.
        _fail(setting, "not a PEM public key (a private key or certificate is not accepted)")
    kind = key_kind(key)
    if kind is None:
        _fail(setting, "unsupported key type; use RSA, EC (P-256, P-384, P-521) or Ed25519")
    if isinstance(key, rsa.RSAPublicKey):
        _check(
            key.key_size >= _RSA_MIN_BITS,
            setting,
            f"RSA key of {key.key_size} bits is too small (minimum {_RSA_MIN_BITS})",
        )
    return kind


def _validate_origins(s: Settings) -> None:
    origins = tuple(o.strip().rstrip("/") for o in s.allowed_origins if o.strip())
    if origins == ("*",):
        origins = ()
    for origin in origins:
        _check(origin != "*", "allowed_origins", "'*' (any origin) must be the only entry")
        # A bare host never equals a browser's Origin header, which always has a scheme.
        _check(
            "://" in origin,
            "allowed_origins",
            f"{origin!r} is not an origin; write it like https://app.example.com",
        )
    object.__setattr__(s, "allowed_origins", origins)


def _check_range(s: Settings, name: str, low: float, high: float | None = None) -> None:
    value = getattr(s, name)
    if high is None:
        _check(value >= low, name, f"must be >= {low:g}, got {value:g}")
    else:
        _check(low <= value <= high, name, f"must be between {low:g} and {high:g}, got {value:g}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        _fail(name, message)


def _fail(name: str, message: str) -> Never:
    raise ConfigError(ENV_NAMES[name], message)
