"""Command line: ``digis-signal serve`` and ``digis-signal token``.

``serve`` reads the environment (README § Configuration); flags override it.
A bad value stops start-up with one line naming the setting (exit code 2).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Sequence

import orjson

from signaling.auth import mint_token
from signaling.config import ConfigError, Secret, Settings, load_settings
from signaling.logs import setup_logging
from signaling.values import JSON

__all__ = ["main", "run_single"]

log = logging.getLogger("signaling.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digis-signal", description="Real-time WebSocket signaling and messaging server."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (settings from the environment)")
    serve.add_argument("--host", help="interface to bind (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="TCP port (PORT, default 8000)")
    serve.add_argument("--redis-url", help="Redis URL (REDIS_URL; unset: embedded broker)")
    serve.add_argument("--workers", type=int, help="worker processes (WEB_CONCURRENCY)")
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: run without a JWT key, with a throwaway secret",
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (SIGNAL_LOG_LEVEL)")
    serve.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines (SIGNAL_LOG_JSON)"
    )
    serve.add_argument(
        "--app",
        default="handlers.app",
        help="module providing channel_policy(settings) and install(node)",
    )

    token = sub.add_parser("token", help="mint an HS256 JWT with SIGNAL_JWT_SECRET")
    token.add_argument("user", help="user id (the sub claim)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (0: none)")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="extra claim; V is parsed as JSON when it is valid JSON, else kept as text",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        "host": args.host,
        "port": args.port,
        "redis_url": args.redis_url,
        "workers": args.workers,
        "dev": args.dev,
        "log_level": args.log_level,
        "log_json": args.log_json,
    }
    dev_secret: str | None = None
    environ = dict(os.environ)
    if (args.dev or _truthy(environ.get("SIGNAL_DEV"))) and not any(
        environ.get(k)
        for k in ("SIGNAL_JWT_SECRET", "SIGNAL_JWT_PUBLIC_KEY", "SIGNAL_JWT_JWKS_URL")
    ):
        dev_secret = secrets.token_urlsafe(32)
        overrides["jwt_secret"] = Secret(dev_secret)
    try:
        settings = load_settings(environ, overrides)
    except ConfigError as exc:
        print(f"digis-signal: invalid setting {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    if dev_secret is not None:
        _announce_dev_mode(dev_secret)
    if settings.workers > 1:
        from signaling.server import load_app
        from signaling.workers import run_workers

        try:
            # Here, once, rather than in every worker, restarted in a loop.
            load_app(args.app)
        except Exception as exc:
            print(f"digis-signal: cannot load the app {args.app!r}: {exc}", file=sys.stderr)
            return 2
        return run_workers(settings, args.app)
    return run_single(settings, args.app)


def run_single(settings: Settings, app: str, *, reuse_port: bool = False) -> int:
    """Run one server process until SIGTERM/SIGINT (also a worker's body)."""
    setup_logging(settings.log_level, settings.log_json)
    from signaling.server import run_server  # imports the whole server

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(run_server(settings, app, reuse_port=reuse_port))
    return uvloop.run(run_server(settings, app, reuse_port=reuse_port))


def _announce_dev_mode(secret: str) -> None:
    bar = "!" * 72
    log.warning(bar)
    log.warning("DEV MODE: no JWT key configured; using a throwaway HS256 secret.")
    log.warning("Never run this in production. Mint a token for user 'alice' with:")
    log.warning("  SIGNAL_JWT_SECRET=%s digis-signal token alice", secret)
    log.warning(bar)


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get("SIGNAL_JWT_SECRET", "")
    if not secret:
        print("digis-signal: invalid setting SIGNAL_JWT_SECRET: not set", file=sys.stderr)
        return 2
    claims: dict[str, JSON] = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"digis-signal: --claim expects K=V, got {item!r}", file=sys.stderr)
            return 2
        try:
            claims[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            claims[key] = value
    ttl = None if args.ttl <= 0 else args.ttl
    print(mint_token(secret, args.user, ttl_s=ttl, claims=claims))
    return 0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
