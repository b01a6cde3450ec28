"""The benchmark's upstream: a fast JSON-RPC echo node on picows (``python -m bench.upstream``).

Every request is answered at once with ``{"jsonrpc":"2.0","id":<id>,"result":"0x<64 hex>"}``
(a fixed block hash). The benchmark's own method takes a fast path of byte searches with
no JSON parsing; anything else is parsed, and the relay's health probes get plausible
answers (``system_health`` not syncing, ``chain_getHeader`` with a block number that
advances on every probe), so the relay keeps the node healthy.

Prints ``PORT <n>`` on stdout once listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from .procfs import raise_nofile

__all__ = ["BENCH_METHOD", "RESULT", "EchoNode"]

#: The method the load generator calls (allowed by the relay's default ``safe`` policy).
BENCH_METHOD = "chain_getBlockHash"
RESULT = "0x" + "ab" * 32

_TEXT = WSMsgType.TEXT
_FAST = b'"method":"' + BENCH_METHOD.encode() + b'"'
_HEAD = b'{"jsonrpc":"2.0","id":'
_TAIL = b',"result":"' + RESULT.encode() + b'"}'


class EchoNode(WSListener):
    """One upstream connection: answer every request immediately."""

    block = 0  # shared: advances on every chain_getHeader, so probes see a live chain

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is _TEXT and frame.fin:
            data = frame.get_payload_as_bytes()
            if _FAST in data:
                start = data.find(b'"id":') + 5
                end = data.find(b",", start)
                if start > 4 and end > start and data[start] != 0x22:  # an integer id
                    transport.send(_TEXT, _HEAD + data[start:end] + _TAIL)
                    return
            self._slow(transport, data)
        elif msg_type is WSMsgType.CLOSE:
            code = frame.get_close_code()
            transport.send_close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()

    def _slow(self, transport: WSTransport, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(msg, list):
            answers = [a for a in (self._answer(m) for m in msg) if a is not None]
            if answers:
                transport.send(_TEXT, orjson.dumps(answers))
            return
        answer = self._answer(msg)
        if answer is not None:
            transport.send(_TEXT, orjson.dumps(answer))

    def _answer(self, req: Any) -> dict[str, Any] | None:
        if not isinstance(req, dict) or "id" not in req:
            return None
        method = req.get("method")
        result: Any = RESULT
        if method == "system_health":
            result = {"peers": 0, "isSyncing": False, "shouldHavePeers": False}
        elif method == "chain_getHeader":
            EchoNode.block += 1
            result = {"number": hex(EchoNode.block), "parentHash": RESULT}
        return {"jsonrpc": "2.0", "id": req["id"], "result": result}


async def serve(host: str, port: int, backlog: int) -> None:
    server = await ws_create_server(
        lambda _request: EchoNode(),
        host,
        port,
        backlog=backlog,
        read_buffer_init_size=1024,
        websocket_handshake_timeout=30,
        logger_name="bench.upstream",
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--cpu", type=int, action="append", help="pin to this CPU (repeatable)")
    args = parser.parse_args()
    raise_nofile()
    if args.cpu:
        os.sched_setaffinity(0, set(args.cpu))
    import uvloop

    uvloop.run(serve(args.host, args.port, args.backlog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
