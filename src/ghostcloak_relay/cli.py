"""``ghostcloak-relay``: ``serve``, ``devnode``, ``demo`` and ``check``.

``serve`` flags are generated from :data:`~.config.OPTIONS`, so every environment
variable has its flag and ``--help`` text, and the flag wins. A bad value exits with
status 2 and one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import __version__
from .config import OPTIONS, ConfigError, Settings, load_settings
from .logs import configure_logging

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghostcloak-relay",
        description="GhostCloak Relay: a privacy WebSocket relay in front of Midnight nodes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Every option also reads an environment variable "
        "(named in brackets); the flag wins over the variable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for opt in OPTIONS:
        default = opt.default if opt.default is not None else "unset"
        serve.add_argument(
            opt.flag,
            dest=opt.name,
            metavar=opt.env,
            default=None,
            help=f"{opt.help} [env {opt.env}; {opt.allowed}; default {default}]",
        )

    dev = sub.add_parser("devnode", help="run the embedded development node alone")
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dev.add_argument("--port", type=int, default=9944, help="port (0 picks a free one)")
    dev.add_argument("--block-time", type=float, default=6.0, help="seconds between blocks")

    demo = sub.add_parser(
        "demo", help="dev node + relay in one process, with a scripted wallet session"
    )
    demo.add_argument("--port", type=int, default=8443, help="relay port (0: a free one)")
    demo.add_argument("--node-port", type=int, default=0, help="dev node port (0: a free one)")
    demo.add_argument("--block-time", type=float, default=2.0, help="dev node block time")
    demo.add_argument(
        "--exit-after-script",
        action="store_true",
        help="stop after the scripted session instead of serving on",
    )

    check = sub.add_parser("check", help="probe a relay: /health, then one session")
    check.add_argument("url", help="relay base URL, e.g. wss://relay.example:8443")
    check.add_argument("--cafile", help="CA bundle to verify the relay's certificate")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = load_settings(os.environ, {o.name: getattr(args, o.name) for o in OPTIONS})
        except ConfigError as exc:
            print(f"ghostcloak-relay: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings.log_level, settings.log_format)
        _raise_fd_limit()
        from .server import run

        if settings.workers == 1:
            return _run(run(settings))
        from .workers import run_workers

        return run_workers(settings, lambda s, board, i: _run(run(s, board=board, worker=i)))
    if args.command == "devnode":
        configure_logging(os.environ.get("RELAY_LOG_LEVEL", "info"))
        return _run(_devnode(args.host, args.port, args.block_time))
    if args.command == "demo":
        configure_logging(os.environ.get("RELAY_LOG_LEVEL", "warning"))
        return _run(_demo(args.port, args.node_port, args.block_time, args.exit_after_script))
    return _run(_check(args.url, args.cafile, args.timeout))


def _raise_fd_limit() -> None:
    """Every session holds two sockets: raise the soft open-file limit to the hard one."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logging.getLogger("ghostcloak_relay").warning(
                "open-file limit stays at %d (could not raise it to %d)", soft, hard
            )
            return
        logging.getLogger("ghostcloak_relay").info(
            "raised the open-file limit from %d to %d (two per session)", soft, hard
        )


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _devnode(host: str, port: int, block_time: float) -> int:
    from .devnode import start_devnode

    node = await start_devnode(host, port, block_time=block_time)
    print(f"dev node (a development tool, not a real Midnight node) on {node.url}", flush=True)
    try:
        await _until_signal()
    finally:
        await node.aclose()
    return 0


async def _demo(port: int, node_port: int, block_time: float, exit_after: bool) -> int:
    from .client import RelayClient
    from .devnode import start_devnode
    from .server import RelayServer

    node = await start_devnode("127.0.0.1", node_port, block_time=block_time)
    settings = Settings(port=port, host="127.0.0.1", node=(node.url,))
    relay = RelayServer(settings)
    try:
        await relay.start()
        base = f"ws://127.0.0.1:{relay.port}"
        print(f"dev node : {node.url}   (development tool standing in for a Midnight node)")
        print(f"relay    : {base}/relay   health: http://127.0.0.1:{relay.port}/health")
        print("\nscripted wallet session through the relay:")
        async with RelayClient(f"{base}/relay") as client, client.session() as s:
            print(f"  -> session_start                 <- session_started {s.session_id[:8]}...")
            chain = await s.request("system_chain")
            print(f"  -> system_chain                  <- {chain!r}")
            version = await s.request("state_getRuntimeVersion")
            print(f"  -> state_getRuntimeVersion       <- specName={version['specName']!r}")
            async with s.subscribe(
                "chain_subscribeNewHeads", unsubscribe="chain_unsubscribeNewHeads"
            ) as heads:
                current = await asyncio.wait_for(anext(heads), 30)
                print(
                    "  -> chain_subscribeNewHeads       <- notification: current head "
                    f"#{int(current['number'], 16)}"
                )
                node.produce_block()
                header = await asyncio.wait_for(anext(heads), 30)
                print(
                    f"     (a block is made)             <- notification: new head "
                    f"#{int(header['number'], 16)}"
                )
            print("  -> session_end                   <- session_ended (client)")
        if exit_after:
            return 0
        print("\nserving; press Ctrl-C to stop", flush=True)
        await _until_signal()
    finally:
        await relay.shutdown()
        await node.aclose()
    return 0


def _urls(url: str) -> tuple[str, str]:
    """Map a relay base URL to its (health URL, /relay WebSocket URL)."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    secure = parts.scheme in ("wss", "https")
    http = urlunsplit(("https" if secure else "http", parts.netloc, "/health", "", ""))
    ws = urlunsplit(("wss" if secure else "ws", parts.netloc, "/relay", "", ""))
    return http, ws


async def _check(url: str, cafile: str | None, timeout: float) -> int:
    from .client import RelayClient, RelayError

    health_url, ws_url = _urls(url)
    ctx = ssl.create_default_context(cafile=cafile) if health_url.startswith("https") else None
    ok = True
    try:
        body = await asyncio.to_thread(_http_get, health_url, ctx, timeout)
        health = json.loads(body)
        print(f"health  {health_url}: {json.dumps(health)}")
        ok = health.get("status") == "ok"
    except (OSError, ValueError) as exc:
        print(f"health  {health_url}: FAILED ({exc})")
        ok = False
    try:
        async with (
            asyncio.timeout(timeout * 2),
            RelayClient(ws_url, ssl_context=ctx, timeout=timeout) as client,
            client.session() as s,
        ):
            result = await s.request("system_health", timeout=timeout)
        print(f"session {ws_url}: started, system_health -> {json.dumps(result)}, ended")
    except (RelayError, TimeoutError, OSError) as exc:
        print(f"session {ws_url}: FAILED ({type(exc).__name__}: {exc})")
        ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _http_get(url: str, ctx: ssl.SSLContext | None, timeout: float) -> bytes:
    with contextlib.closing(urllib.request.urlopen(url, timeout=timeout, context=ctx)) as resp:
        data: bytes = resp.read()
        return data
