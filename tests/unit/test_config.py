"""Settings: defaults, parsing, precedence, validation (one ConfigError naming the variable)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signaling.config import (
    ENV_NAMES,
    ConfigError,
    Secret,
    Settings,
    describe,
    load_settings,
)

SECRET = "unit-test-secret-" + "x" * 47  # 64 bytes: long enough for HS512
DEV = {"SIGNAL_DEV": "1"}


def _pem(public_key: object) -> str:
    assert isinstance(
        public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    )
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return _pem(ec.generate_private_key(ec.SECP256R1()).public_key())


def _error(environ: dict[str, str], overrides: dict[str, object] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(environ, overrides)
    return info.value


# --- defaults, parsing, precedence ----------------------------------------------------


def test_defaults() -> None:
    s = load_settings(DEV)
    assert s == Settings(dev=True)
    assert (s.host, s.port, s.workers, s.redis_url, s.redis_cluster) == (
        "0.0.0.0",
        8000,
        1,
        None,
        False,
    )
    assert s.jwt_secret is None and s.jwt_public_key is None and s.jwt_jwks_url is None
    assert s.jwt_algorithms == ()
    assert (s.jwt_user_claim, s.jwt_leeway_s, s.jwks_cache_s) == ("sub", 5.0, 3600.0)
    assert s.allowed_origins == ()
    assert (s.max_frame_bytes, s.send_buffer_max_bytes, s.compression) == (65536, 1048576, False)
    assert (s.ping_interval_s, s.pong_timeout_s, s.connect_timeout_s) == (25.0, 10.0, 15.0)
    assert s.expired_close_delay_s == 25.0
    assert (s.max_connections_per_user, s.commands_per_second, s.command_burst) == (32, 20.0, 50)
    assert (s.max_publication_bytes, s.max_subscriptions_per_connection) == (16384, 64)
    assert (s.history_size, s.history_ttl_s, s.presence_ttl_s) == (100, 86400.0, 60.0)
    assert (s.drain_s, s.log_level, s.log_json) == (5.0, "INFO", False)


def test_env_names_cover_every_field() -> None:
    assert list(ENV_NAMES) == [f.name for f in dataclasses.fields(Settings)]


def test_environment_is_parsed() -> None:
    s = load_settings(
        {
            "HOST": "127.0.0.1",
            "PORT": "9001",
            "REDIS_URL": "rediss://:pw@redis.example:6380/0",
            "SIGNAL_REDIS_CLUSTER": "on",
            "WEB_CONCURRENCY": "4",
            "SIGNAL_JWT_SECRET": SECRET,
            "SIGNAL_JWT_ALGORITHMS": " hs256 , HS512,HS256 ",
            "SIGNAL_JWT_AUDIENCE": "digis",
            "SIGNAL_JWT_ISSUER": "https://auth.example",
            "SIGNAL_JWT_USER_CLAIM": "uid",
            "SIGNAL_JWT_LEEWAY_S": "2.5",
            "SIGNAL_ALLOWED_ORIGINS": " https://a.example , https://b.example/ ",
            "AGORA_APP_ID": "app",
            "AGORA_APP_CERTIFICATE": "cert",
            "SIGNAL_COMPRESSION": "TRUE",
            "SIGNAL_PING_INTERVAL_S": "20",
            "SIGNAL_PONG_TIMEOUT_S": "5",
            "SIGNAL_COMMANDS_PER_SECOND": "0",
            "SIGNAL_MAX_CONNECTIONS_PER_USER": "0",
            "SIGNAL_LOG_LEVEL": "debug",
            "SIGNAL_LOG_JSON": "yes",
            "UNRELATED": "ignored",
        }
    )
    assert (s.host, s.port, s.workers, s.redis_cluster) == ("127.0.0.1", 9001, 4, True)
    assert s.jwt_secret == Secret(SECRET)
    assert s.jwt_algorithms == ("HS256", "HS512")
    assert (s.jwt_audience, s.jwt_issuer, s.jwt_user_claim) == (
        "digis",
        "https://auth.example",
        "uid",
    )
    assert s.jwt_leeway_s == 2.5
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.agora_app_certificate == Secret("cert")
    assert (s.compression, s.log_json, s.log_level) == (True, True, "DEBUG")
    assert (s.ping_interval_s, s.pong_timeout_s) == (20.0, 5.0)
    assert (s.commands_per_second, s.max_connections_per_user) == (0.0, 0)


@pytest.mark.parametrize("text", ["1", "true", "YES", "On"])
def test_booleans_true(text: str) -> None:
    assert load_settings({"SIGNAL_DEV": text}).dev is True


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_booleans_false(text: str) -> None:
    assert load_settings({**DEV, "SIGNAL_COMPRESSION": text}).compression is False


def test_empty_variable_counts_as_unset() -> None:
    assert load_settings({**DEV, "PORT": "", "REDIS_URL": "  "}) == Settings(dev=True)


@pytest.mark.parametrize("origins", ["*", " * ", ""])
def test_any_origin_is_stored_empty(origins: str) -> None:
    assert load_settings({**DEV, "SIGNAL_ALLOWED_ORIGINS": origins}).allowed_origins == ()


def test_overrides_win_over_environment() -> None:
    s = load_settings(
        {**DEV, "PORT": "9001", "SIGNAL_LOG_LEVEL": "ERROR"},
        {"port": 0, "log_level": "warning", "host": None, "jwt_secret": SECRET},
    )
    assert (s.port, s.log_level, s.host) == (0, "WARNING", "0.0.0.0")
    assert s.jwt_secret == Secret(SECRET)
    assert s.jwt_algorithms == ("HS256",)


def test_override_of_wrong_type_is_refused() -> None:
    err = _error(DEV, {"port": True})
    assert err.setting == "PORT"
    assert _error(DEV, {"nonsense": 1}).setting == "nonsense"
    assert _error(DEV, {"jwt_user_claim": ""}).setting == "SIGNAL_JWT_USER_CLAIM"


# --- JWT keys and algorithms -----------------------------------------------------------


def test_algorithms_derived_from_keys(rsa_pem: str, ec_pem: str) -> None:
    assert load_settings({"SIGNAL_JWT_SECRET": SECRET}).jwt_algorithms == ("HS256",)
    assert load_settings({"SIGNAL_JWT_PUBLIC_KEY": rsa_pem}).jwt_algorithms == ("RS256",)
    jwks = {"SIGNAL_JWT_JWKS_URL": "https://keys.example/jwks.json", "SIGNAL_JWT_AUDIENCE": "a"}
    assert load_settings(jwks).jwt_algorithms == ("RS256",)
    both = {"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_JWT_PUBLIC_KEY": rsa_pem}
    assert load_settings(both).jwt_algorithms == ("HS256", "RS256")
    # An EC key gets the algorithm that can verify with it, not RS256.
    assert load_settings({"SIGNAL_JWT_PUBLIC_KEY": ec_pem}).jwt_algorithms == ("ES256",)


def test_public_key_from_file(tmp_path: Path, rsa_pem: str) -> None:
    path = tmp_path / "key.pem"
    path.write_text(rsa_pem)
    s = load_settings({"SIGNAL_JWT_PUBLIC_KEY": str(path)})
    assert s.jwt_public_key == Secret(rsa_pem)


def test_public_key_with_escaped_newlines(rsa_pem: str) -> None:
    s = load_settings({"SIGNAL_JWT_PUBLIC_KEY": rsa_pem.strip().replace("\n", "\\n")})
    assert s.jwt_public_key == Secret(rsa_pem.strip())


def test_missing_key_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.pem")
    err = _error({"SIGNAL_JWT_PUBLIC_KEY": path})
    assert err.setting == "SIGNAL_JWT_PUBLIC_KEY"
    assert path not in str(err)


def test_private_key_is_not_a_public_key() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    err = _error({"SIGNAL_JWT_PUBLIC_KEY": pem})
    assert err.setting == "SIGNAL_JWT_PUBLIC_KEY"
    assert pem.splitlines()[1] not in str(err)


# --- invalid values name the variable ---------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "setting"),
    [
        ({**DEV, "PORT": "http"}, "PORT"),
        ({**DEV, "PORT": "70000"}, "PORT"),
        ({**DEV, "PORT": "-1"}, "PORT"),
        ({**DEV, "PORT": "80.5"}, "PORT"),
        ({**DEV, "PORT": "1_000"}, "PORT"),
        ({"SIGNAL_DEV": "maybe"}, "SIGNAL_DEV"),
        ({**DEV, "SIGNAL_LOG_JSON": "2"}, "SIGNAL_LOG_JSON"),
        ({**DEV, "SIGNAL_PING_INTERVAL_S": "nan"}, "SIGNAL_PING_INTERVAL_S"),
        ({**DEV, "SIGNAL_DRAIN_S": "inf"}, "SIGNAL_DRAIN_S"),
        ({**DEV, "SIGNAL_DRAIN_S": "301"}, "SIGNAL_DRAIN_S"),
        ({**DEV, "SIGNAL_PONG_TIMEOUT_S": "25"}, "SIGNAL_PONG_TIMEOUT_S"),
        ({**DEV, "SIGNAL_PING_INTERVAL_S": "5"}, "SIGNAL_PONG_TIMEOUT_S"),
        ({**DEV, "SIGNAL_PONG_TIMEOUT_S": "0"}, "SIGNAL_PONG_TIMEOUT_S"),
        ({**DEV, "SIGNAL_JWT_ALGORITHMS": "none"}, "SIGNAL_JWT_ALGORITHMS"),
        (
            {"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_JWT_ALGORITHMS": "HS256,NoNe"},
            "SIGNAL_JWT_ALGORITHMS",
        ),
        ({**DEV, "SIGNAL_JWT_ALGORITHMS": "HS256"}, "SIGNAL_JWT_ALGORITHMS"),
        ({"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_JWT_ALGORITHMS": "RS256"}, "SIGNAL_JWT_ALGORITHMS"),
        ({"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_JWT_ALGORITHMS": "XS999"}, "SIGNAL_JWT_ALGORITHMS"),
        ({"SIGNAL_JWT_SECRET": "short"}, "SIGNAL_JWT_SECRET"),
        ({"SIGNAL_JWT_SECRET": "x" * 32, "SIGNAL_JWT_ALGORITHMS": "HS512"}, "SIGNAL_JWT_SECRET"),
        ({}, "SIGNAL_JWT_SECRET"),
        ({"SIGNAL_JWT_JWKS_URL": "ftp://keys.example/jwks"}, "SIGNAL_JWT_JWKS_URL"),
        # Keys that anyone on the path could replace, and keys that also sign other
        # applications' tokens (Firebase, Auth0) without an audience to tell them apart.
        (
            {"SIGNAL_JWT_JWKS_URL": "http://keys.example/jwks", "SIGNAL_JWT_AUDIENCE": "a"},
            "SIGNAL_JWT_JWKS_URL",
        ),
        ({"SIGNAL_JWT_JWKS_URL": "https://keys.example/jwks"}, "SIGNAL_JWT_AUDIENCE"),
        ({**DEV, "SIGNAL_JWT_LEEWAY_S": "301"}, "SIGNAL_JWT_LEEWAY_S"),
        ({**DEV, "SIGNAL_JWKS_CACHE_S": "0"}, "SIGNAL_JWKS_CACHE_S"),
        ({**DEV, "WEB_CONCURRENCY": "2"}, "WEB_CONCURRENCY"),
        ({**DEV, "WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({**DEV, "SIGNAL_REDIS_CLUSTER": "1"}, "SIGNAL_REDIS_CLUSTER"),
        ({**DEV, "REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
        ({**DEV, "SIGNAL_MAX_FRAME_BYTES": "1023"}, "SIGNAL_MAX_FRAME_BYTES"),
        ({**DEV, "SIGNAL_MAX_PUBLICATION_BYTES": "65536"}, "SIGNAL_MAX_PUBLICATION_BYTES"),
        ({**DEV, "SIGNAL_SEND_BUFFER_MAX_BYTES": "1000"}, "SIGNAL_SEND_BUFFER_MAX_BYTES"),
        ({**DEV, "SIGNAL_COMMAND_BURST": "0"}, "SIGNAL_COMMAND_BURST"),
        ({**DEV, "SIGNAL_MAX_SUBSCRIPTIONS": "0"}, "SIGNAL_MAX_SUBSCRIPTIONS"),
        ({**DEV, "SIGNAL_HISTORY_SIZE": "-1"}, "SIGNAL_HISTORY_SIZE"),
        ({**DEV, "SIGNAL_HISTORY_TTL_S": "0"}, "SIGNAL_HISTORY_TTL_S"),
        ({**DEV, "SIGNAL_LOG_LEVEL": "verbose"}, "SIGNAL_LOG_LEVEL"),
        ({**DEV, "SIGNAL_ALLOWED_ORIGINS": "*,https://a.example"}, "SIGNAL_ALLOWED_ORIGINS"),
        ({**DEV, "SIGNAL_ALLOWED_ORIGINS": "a.example"}, "SIGNAL_ALLOWED_ORIGINS"),
        ({**DEV, "AGORA_APP_CERTIFICATE": "cert"}, "AGORA_APP_CERTIFICATE"),
    ],
)
def test_invalid_setting_is_named(environ: dict[str, str], setting: str) -> None:
    err = _error(environ)
    assert err.setting == setting
    assert str(err) == f"{setting}: {err.message}"
    assert "\n" not in str(err)


def test_bad_values_are_shown() -> None:
    assert "'maybe'" in str(_error({"SIGNAL_DEV": "maybe"}))
    assert "'http'" in str(_error({**DEV, "PORT": "http"}))


def test_no_key_message() -> None:
    assert _error({}).message == (
        "no JWT key configured: set SIGNAL_JWT_SECRET, SIGNAL_JWT_PUBLIC_KEY or "
        "SIGNAL_JWT_JWKS_URL (or run with --dev)"
    )


def test_workers_message() -> None:
    err = _error({**DEV, "WEB_CONCURRENCY": "3"})
    assert err.message == "several workers need a shared broker: set REDIS_URL"


def test_workers_need_a_port_of_their_own_to_share() -> None:
    env = {**DEV, "WEB_CONCURRENCY": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    err = _error({**env, "PORT": "0"})
    assert err.setting == "WEB_CONCURRENCY"
    assert "PORT=0" in err.message


def test_secret_values_are_never_echoed() -> None:
    secret = "hunter2-is-my-password"
    err = _error({"SIGNAL_JWT_SECRET": secret})
    assert err.setting == "SIGNAL_JWT_SECRET"
    assert secret not in str(err) and secret not in repr(err)
    fake_pem = "-----BEGIN PUBLIC KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PUBLIC KEY-----"
    err = _error({"SIGNAL_JWT_PUBLIC_KEY": fake_pem})
    assert err.setting == "SIGNAL_JWT_PUBLIC_KEY"
    assert "c2VjcmV0LWtleS1tYXRlcmlhbA" not in str(err)
    err = _error(DEV, {"agora_app_certificate": 12345})
    assert err.setting == "AGORA_APP_CERTIFICATE" and "12345" not in str(err)


def test_redis_password_not_echoed() -> None:
    err = _error({**DEV, "REDIS_URL": "http://:topsecret@host:6379"})
    assert "topsecret" not in str(err)


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(Settings(dev=True), port=65536)
    assert info.value.setting == "PORT"


# --- secrets stay hidden ----------------------------------------------------------------


def test_secret_hides_its_value() -> None:
    secret = Secret("hunter2")
    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert secret.value == "hunter2"
    assert secret == Secret("hunter2") and secret != Secret("hunter3")
    assert hash(secret) == hash(Secret("hunter2"))
    s = load_settings(
        {"SIGNAL_JWT_SECRET": SECRET, "AGORA_APP_ID": "a", "AGORA_APP_CERTIFICATE": "c0ffee"}
    )
    assert SECRET not in repr(s) and "c0ffee" not in repr(s)


def test_describe_hides_secrets(rsa_pem: str) -> None:
    s = load_settings(
        {
            "SIGNAL_JWT_SECRET": SECRET,
            "SIGNAL_JWT_PUBLIC_KEY": rsa_pem,
            "AGORA_APP_ID": "app",
            "AGORA_APP_CERTIFICATE": "c0ffee",
            "REDIS_URL": "redis://user:topsecret@redis.example:6379/0",
        }
    )
    summary = describe(s)
    assert set(summary) == set(ENV_NAMES)
    assert summary["jwt_secret"] == summary["jwt_public_key"] == "***"
    assert summary["agora_app_certificate"] == "***"
    assert summary["redis_url"] == "redis://user:***@redis.example:6379/0"
    assert summary["port"] == "8000" and summary["allowed_origins"] == "*"
    assert summary["jwt_algorithms"] == "HS256,RS256"
    text = repr(summary)
    for leaked in (SECRET, "c0ffee", "topsecret", rsa_pem.splitlines()[1]):
        assert leaked not in text
    assert describe(Settings(dev=True))["jwt_secret"] == "None"
