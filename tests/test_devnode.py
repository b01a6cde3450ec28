"""The dev node (a development tool) over real sockets, with `websockets` as an
independent client. Nodes run with a one-hour block time unless a test is about the
timer, so blocks appear only when a test calls ``produce_block()``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ghostcloak_relay import devnode
from ghostcloak_relay.devnode import DEFAULT_BLOCK_TIME, DevNode, start_devnode

HASH = re.compile(r"0x[0-9a-f]{64}")
MANUAL = 3600.0  # block time long enough that the timer never fires during a test
TIMEOUT = 5.0


@pytest.fixture
async def node() -> AsyncIterator[DevNode]:
    dev = await start_devnode(block_time=MANUAL)
    yield dev
    await asyncio.wait_for(dev.aclose(), 3 * TIMEOUT)


@pytest.fixture
async def ws(node: DevNode) -> AsyncIterator[ClientConnection]:
    async with connect(node.url) as client:
        yield client


async def recv(ws: ClientConnection) -> Any:
    return orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def send(ws: ClientConnection, message: Any) -> None:
    await ws.send(orjson.dumps(message).decode())


async def call(ws: ClientConnection, method: str, *params: Any, rid: int = 1) -> Any:
    """Send one request and return its whole answer object."""
    await send(ws, {"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)})
    answer = await recv(ws)
    assert answer["id"] == rid, answer
    return answer


async def result(ws: ClientConnection, method: str, *params: Any) -> Any:
    answer = await call(ws, method, *params)
    assert "error" not in answer, answer
    return answer["result"]


async def error_code(ws: ClientConnection, method: str, *params: Any) -> int:
    answer = await call(ws, method, *params)
    assert "result" not in answer, answer
    code: int = answer["error"]["code"]
    return code


async def assert_nothing_pending(ws: ClientConnection) -> None:
    """The next message is the answer to a fresh request, so nothing else was queued."""
    answer = await call(ws, "system_name", rid=424242)
    assert answer["result"] == "ghostcloak-devnode"


async def notification(ws: ClientConnection, sub_id: str, method: str) -> Any:
    message = await recv(ws)
    assert message["jsonrpc"] == "2.0"
    assert message["method"] == method
    assert message["params"]["subscription"] == sub_id
    assert "id" not in message
    return message["params"]["result"]


async def eventually(condition: Callable[[], bool], within: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def assert_header(header: Any, number: int) -> None:
    assert set(header) == {"parentHash", "number", "stateRoot", "extrinsicsRoot", "digest"}
    assert header["number"] == hex(number)
    assert HASH.fullmatch(header["parentHash"])
    assert HASH.fullmatch(header["stateRoot"])
    assert HASH.fullmatch(header["extrinsicsRoot"])
    assert header["digest"] == {"logs": []}


# -- lifecycle -----------------------------------------------------------------


async def test_start_picks_a_free_port_and_url() -> None:
    dev = await start_devnode()
    try:
        assert dev.host == "127.0.0.1"
        assert dev.port > 0
        assert dev.url == f"ws://127.0.0.1:{dev.port}"
        assert dev.best_block == 0
        assert (dev.active_connections, dev.total_connections, dev.active_subscriptions) == (
            0,
            0,
            0,
        )
    finally:
        await dev.aclose()
    assert DEFAULT_BLOCK_TIME == 6.0


@pytest.mark.parametrize("block_time", [0.0, -1.0, float("nan"), float("inf")])
async def test_bad_block_time_is_refused(block_time: float) -> None:
    with pytest.raises(ValueError, match="block_time"):
        await start_devnode(block_time=block_time)


async def test_aclose_closes_clients_with_1001_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    dev = await start_devnode(block_time=0.05)
    clients = [await connect(dev.url) for _ in range(3)]
    await send(clients[0], {"jsonrpc": "2.0", "id": 1, "method": "chain_subscribeNewHeads"})
    assert (await recv(clients[0]))["id"] == 1
    await asyncio.wait_for(dev.aclose(), 3 * TIMEOUT)
    assert dev.active_connections == 0
    assert dev.active_subscriptions == 0
    for client in clients:
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert client.close_code == 1001
    await eventually(lambda: asyncio.all_tasks() <= before)
    with pytest.raises(ConnectionRefusedError):
        await connect(dev.url, open_timeout=TIMEOUT)
    await dev.aclose()  # idempotent


async def test_client_close_is_answered_and_counters_return_to_zero(node: DevNode) -> None:
    first, second = await connect(node.url), await connect(node.url)
    await send(first, {"jsonrpc": "2.0", "id": 1, "method": "chain_subscribeNewHeads"})
    await send(second, {"jsonrpc": "2.0", "id": 1, "method": "chain_subscribeFinalizedHeads"})
    await send(second, {"jsonrpc": "2.0", "id": 2, "method": "chain_subscribeNewHeads"})
    assert (await recv(first))["id"] == 1
    assert (await recv(second))["id"] == 1
    await eventually(lambda: node.active_subscriptions == 3)
    assert node.active_connections == 2
    assert node.total_connections == 2

    await asyncio.wait_for(first.close(), TIMEOUT)
    assert first.close_code == 1000  # the node answered our CLOSE with a CLOSE
    await eventually(lambda: node.active_connections == 1 and node.active_subscriptions == 2)
    await asyncio.wait_for(second.close(), TIMEOUT)
    await eventually(lambda: node.active_connections == 0 and node.active_subscriptions == 0)
    assert node.total_connections == 2


async def test_ping_is_answered(ws: ClientConnection) -> None:
    pong = await ws.ping(b"hello")
    latency = await asyncio.wait_for(pong, TIMEOUT)
    assert latency >= 0


# -- methods -----------------------------------------------------------------------


async def test_system_methods(ws: ClientConnection) -> None:
    health = await result(ws, "system_health")
    assert health == {"peers": 0, "isSyncing": False, "shouldHavePeers": False}
    assert await result(ws, "system_chain") == "GhostCloak Dev"
    assert await result(ws, "system_name") == "ghostcloak-devnode"
    assert isinstance(await result(ws, "system_version"), str)
    properties = await result(ws, "system_properties")
    assert properties == {"ss58Format": 42, "tokenDecimals": 12, "tokenSymbol": "DUST"}
    assert await result(ws, "midnight_apiVersions") == [2]
    assert await result(ws, "midnight_ledgerVersion") == "ledger-4.0.0"
    version = await result(ws, "state_getRuntimeVersion")
    assert version["specName"] == "midnight"
    assert version["implName"] == "ghostcloak-devnode"
    assert isinstance(version["specVersion"], int)
    assert isinstance(version["transactionVersion"], int)
    assert version["apis"] == []


async def test_rpc_methods_lists_every_method(ws: ClientConnection) -> None:
    methods = (await result(ws, "rpc_methods"))["methods"]
    assert set(methods) == {
        "system_health",
        "system_chain",
        "system_name",
        "system_version",
        "system_properties",
        "rpc_methods",
        "chain_getBlockHash",
        "chain_getHeader",
        "chain_getBlock",
        "chain_getFinalizedHead",
        "chain_subscribeNewHeads",
        "chain_unsubscribeNewHeads",
        "chain_subscribeFinalizedHeads",
        "chain_unsubscribeFinalizedHeads",
        "state_getRuntimeVersion",
        "author_submitExtrinsic",
        "author_submitAndWatchExtrinsic",
        "author_unwatchExtrinsic",
        "midnight_apiVersions",
        "midnight_ledgerVersion",
        "author_rotateKeys",
        "author_insertKey",
        "system_addReservedPeer",
    }
    # Every listed method is served; a batch answer comes before any notification.
    await send(ws, [{"jsonrpc": "2.0", "id": i, "method": m} for i, m in enumerate(methods)])
    answers = await recv(ws)
    assert len(answers) == len(methods)
    assert all(a.get("error", {}).get("code") != -32601 for a in answers), answers


async def test_unsafe_methods_exist(ws: ClientConnection) -> None:
    keys = await result(ws, "author_rotateKeys")
    assert re.fullmatch(r"0x(?:[0-9a-f]{2})+", keys)
    assert await result(ws, "author_rotateKeys") != keys
    assert await result(ws, "author_insertKey", "aura", "//Alice", "0x" + "11" * 32) is None
    assert await result(ws, "system_addReservedPeer", "/ip4/127.0.0.1/tcp/30333/p2p/x") is None


async def test_blocks_hashes_and_headers(node: DevNode, ws: ClientConnection) -> None:
    genesis = await result(ws, "chain_getBlockHash", 0)
    assert HASH.fullmatch(genesis)
    assert await result(ws, "chain_getBlockHash") == genesis
    assert await result(ws, "chain_getBlockHash", "0x0") == genesis
    header = await result(ws, "chain_getHeader")
    assert_header(header, 0)
    assert header["parentHash"] == "0x" + "00" * 32
    assert await result(ws, "chain_getFinalizedHead") == genesis

    for _ in range(3):
        node.produce_block()
    assert node.best_block == 3
    hashes = await result(ws, "chain_getBlockHash", [0, 1, 2, 3, 4])
    assert hashes[0] == genesis
    assert hashes[4] is None
    assert len(set(hashes[:4])) == 4
    assert await result(ws, "chain_getBlockHash", "0x3") == hashes[3]
    assert await result(ws, "chain_getBlockHash", 99) is None
    assert await result(ws, "chain_getBlockHash") == hashes[3]
    best = await result(ws, "chain_getHeader")
    assert_header(best, 3)
    assert best["parentHash"] == hashes[2]
    assert await result(ws, "chain_getHeader", hashes[2].upper().replace("0X", "0x")) == (
        await result(ws, "chain_getHeader", hashes[2])
    )
    assert (await result(ws, "chain_getHeader", hashes[1]))["number"] == "0x1"
    assert await result(ws, "chain_getHeader", "0x" + "ab" * 32) is None
    assert await result(ws, "chain_getFinalizedHead") == hashes[1]  # best - 2

    block = await result(ws, "chain_getBlock", hashes[2])
    assert set(block) == {"block", "justifications"}
    assert block["justifications"] is None
    assert block["block"]["extrinsics"] == []
    assert_header(block["block"]["header"], 2)
    assert await result(ws, "chain_getBlock", "0x" + "ab" * 32) is None
    assert (await result(ws, "chain_getBlock"))["block"]["header"] == best


async def test_hashes_are_deterministic_across_nodes(node: DevNode, ws: ClientConnection) -> None:
    other = await start_devnode(block_time=MANUAL)
    try:
        node.produce_block()
        other.produce_block()
        async with connect(other.url) as other_ws:
            for number in (0, 1):
                mine = await result(ws, "chain_getBlockHash", number)
                assert await result(other_ws, "chain_getBlockHash", number) == mine
    finally:
        await other.aclose()


async def test_submitted_extrinsic_goes_into_the_next_block(
    node: DevNode, ws: ClientConnection
) -> None:
    tx_hash = await result(ws, "author_submitExtrinsic", "0x0102AB")
    assert HASH.fullmatch(tx_hash)
    assert await result(ws, "author_submitExtrinsic", "0xff") != tx_hash
    node.produce_block()
    block = await result(ws, "chain_getBlock")
    assert block["block"]["extrinsics"] == ["0x0102ab", "0xff"]
    assert block["block"]["header"]["number"] == "0x1"
    node.produce_block()
    assert (await result(ws, "chain_getBlock"))["block"]["extrinsics"] == []


# -- subscriptions ---------------------------------------------------------------


async def test_new_heads_after_produce_block_and_unsubscribe(
    node: DevNode, ws: ClientConnection
) -> None:
    sub_id = await result(ws, "chain_subscribeNewHeads")
    assert isinstance(sub_id, str)
    assert node.active_subscriptions == 1
    assert_header(await notification(ws, sub_id, "chain_newHead"), 0)  # the current head
    node.produce_block()
    head = await notification(ws, sub_id, "chain_newHead")
    assert_header(head, 1)
    assert head["parentHash"] == await result(ws, "chain_getBlockHash", 0)

    assert await result(ws, "chain_unsubscribeNewHeads", sub_id) is True
    assert node.active_subscriptions == 0
    node.produce_block()
    await assert_nothing_pending(ws)
    assert await result(ws, "chain_unsubscribeNewHeads", sub_id) is False
    assert await result(ws, "chain_unsubscribeNewHeads", "no-such-id") is False


async def test_new_heads_from_the_block_timer() -> None:
    dev = await start_devnode(block_time=0.05)
    try:
        async with connect(dev.url) as client:
            sub_id = await result(client, "chain_subscribeNewHeads")
            numbers = [int((await notification(client, sub_id, "chain_newHead"))["number"], 16)]
            while numbers[-1] < 3:  # each recv is bounded by TIMEOUT
                head = await notification(client, sub_id, "chain_newHead")
                numbers.append(int(head["number"], 16))
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
            assert dev.best_block >= 3
    finally:
        await dev.aclose()


async def test_finalized_heads_trail_by_two(node: DevNode, ws: ClientConnection) -> None:
    sub_id = await result(ws, "chain_subscribeFinalizedHeads")
    assert_header(await notification(ws, sub_id, "chain_finalizedHead"), 0)
    node.produce_block()
    node.produce_block()
    await assert_nothing_pending(ws)  # best 2, finalized still 0
    node.produce_block()
    assert_header(await notification(ws, sub_id, "chain_finalizedHead"), 1)
    node.produce_block()
    assert_header(await notification(ws, sub_id, "chain_finalizedHead"), 2)
    assert await result(ws, "chain_unsubscribeNewHeads", sub_id) is False  # wrong kind
    assert await result(ws, "chain_unsubscribeFinalizedHeads", sub_id) is True
    node.produce_block()
    await assert_nothing_pending(ws)


async def test_submit_and_watch_ready_in_block_finalized(
    node: DevNode, ws: ClientConnection
) -> None:
    sub_id = await result(ws, "author_submitAndWatchExtrinsic", "0xdeadbeef")
    assert await notification(ws, sub_id, "author_extrinsicUpdate") == "ready"
    node.produce_block()
    update = await notification(ws, sub_id, "author_extrinsicUpdate")
    block_hash = await result(ws, "chain_getBlockHash", 1)
    assert update == {"inBlock": block_hash}
    assert (await result(ws, "chain_getBlock", block_hash))["block"]["extrinsics"] == ["0xdeadbeef"]
    node.produce_block()
    await assert_nothing_pending(ws)
    node.produce_block()
    assert await notification(ws, sub_id, "author_extrinsicUpdate") == {"finalized": block_hash}
    assert node.active_subscriptions == 0  # the watch ends once finalized
    assert await result(ws, "author_unwatchExtrinsic", sub_id) is False


async def test_unwatch_stops_extrinsic_updates(node: DevNode, ws: ClientConnection) -> None:
    sub_id = await result(ws, "author_submitAndWatchExtrinsic", "0x01")
    assert await notification(ws, sub_id, "author_extrinsicUpdate") == "ready"
    assert await result(ws, "author_unwatchExtrinsic", sub_id) is True
    node.produce_block()
    await assert_nothing_pending(ws)
    block = await result(ws, "chain_getBlock")
    assert block["block"]["extrinsics"] == ["0x01"]  # still included


async def test_subscription_ids_are_unique_and_owned_by_their_connection(
    node: DevNode, ws: ClientConnection
) -> None:
    async with connect(node.url) as other:
        mine = await result(ws, "chain_subscribeNewHeads")
        theirs = await result(other, "chain_subscribeNewHeads")
        assert mine != theirs
        assert_header(await notification(other, theirs, "chain_newHead"), 0)
        assert await result(other, "chain_unsubscribeNewHeads", mine) is False
        assert node.active_subscriptions == 2


async def test_subscriptions_per_connection_are_capped(node: DevNode, ws: ClientConnection) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "chain_subscribeNewHeads"} for i in range(1025)]
    await send(ws, batch)
    answers = await recv(ws)
    assert sum("result" in a for a in answers) == 1024
    assert [a["error"]["code"] for a in answers if "error" in a] == [-32006]
    assert node.active_subscriptions == 1024
    heads = {(await recv(ws))["params"]["subscription"] for _ in range(1024)}
    assert heads == {a["result"] for a in answers if "result" in a}


async def test_pool_is_bounded(
    node: DevNode, ws: ClientConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devnode, "MAX_POOL_BYTES", 10)
    await result(ws, "author_submitExtrinsic", "0x01020304")  # 10 characters
    assert await error_code(ws, "author_submitExtrinsic", "0x01") == 1016
    node.produce_block()
    await result(ws, "author_submitExtrinsic", "0x01")  # room again


# -- JSON-RPC framing and errors ---------------------------------------------------


async def test_batch_is_answered_as_an_array(ws: ClientConnection) -> None:
    await send(
        ws,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "system_chain"},
            {"jsonrpc": "2.0", "method": "system_name"},  # notification: no answer
            {"jsonrpc": "2.0", "id": "two", "method": "no_such_method"},
            {"jsonrpc": "2.0", "id": 3, "method": "chain_getBlockHash", "params": [0]},
            7,
        ],
    )
    answers = await recv(ws)
    assert isinstance(answers, list)
    by_id = {answer["id"]: answer for answer in answers}
    assert len(answers) == 4
    assert by_id[1]["result"] == "GhostCloak Dev"
    assert by_id["two"]["error"]["code"] == -32601
    assert HASH.fullmatch(by_id[3]["result"])
    assert by_id[None]["error"]["code"] == -32600


async def test_empty_batch_is_one_invalid_request(ws: ClientConnection) -> None:
    await ws.send("[]")
    answer = await recv(ws)
    assert isinstance(answer, dict)
    assert answer["id"] is None
    assert answer["error"]["code"] == -32600


async def test_batch_of_notifications_gets_no_answer(ws: ClientConnection) -> None:
    await send(ws, [{"jsonrpc": "2.0", "method": "system_chain"}] * 3)
    await assert_nothing_pending(ws)


async def test_notification_gets_no_answer(node: DevNode, ws: ClientConnection) -> None:
    await send(ws, {"jsonrpc": "2.0", "method": "system_chain"})
    await send(ws, {"jsonrpc": "2.0", "method": "no_such_method"})
    await send(ws, {"jsonrpc": "2.0", "method": "chain_subscribeNewHeads"})
    await assert_nothing_pending(ws)
    node.produce_block()  # notifications are not executed, as on a jsonrpsee server
    await assert_nothing_pending(ws)
    assert node.active_subscriptions == 0


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        '{"jsonrpc":"2.0","id":1,"method":"system_chain"',
        "\ufeff{}",
        "[1,]",
        "[" * 2000 + "]" * 2000,  # deeper than the parser allows
        "1e999999",
    ],
)
async def test_parse_error(ws: ClientConnection, text: str) -> None:
    await ws.send(text)
    answer = await recv(ws)
    assert answer == {"jsonrpc": "2.0", "id": None, "error": answer["error"]}
    assert answer["error"]["code"] == -32700
    await assert_nothing_pending(ws)  # the connection still works


@pytest.mark.parametrize(
    ("request_", "rid"),
    [
        (1, None),
        ("system_chain", None),
        ({"jsonrpc": "1.0", "id": 1, "method": "system_chain"}, 1),
        ({"id": 1, "method": "system_chain"}, 1),
        ({"jsonrpc": "2.0", "id": 1}, 1),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, 1),
        ({"jsonrpc": "2.0", "id": 1, "method": "system_chain", "params": "x"}, 1),
        ({"jsonrpc": "2.0", "id": [1], "method": "system_chain"}, None),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "system_chain"}, None),
        ({"jsonrpc": "2.0", "method": 5}, None),
    ],
)
async def test_invalid_request(ws: ClientConnection, request_: Any, rid: Any) -> None:
    await send(ws, request_)
    answer = await recv(ws)
    assert answer["id"] == rid
    assert answer["error"]["code"] == -32600


async def test_method_not_found(ws: ClientConnection) -> None:
    assert await error_code(ws, "state_getMetadataX") == -32601
    assert await error_code(ws, "") == -32601


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("chain_getBlockHash", ["abc"]),
        ("chain_getBlockHash", [True]),
        ("chain_getBlockHash", [-1]),
        ("chain_getBlockHash", [1.5]),
        ("chain_getBlockHash", [2**32]),
        ("chain_getBlockHash", ["0x"]),
        ("chain_getBlockHash", [{"n": 1}]),
        ("chain_getHeader", ["0x12"]),
        ("chain_getHeader", [1]),
        ("chain_getBlock", ["0x" + "zz" * 32]),
        ("author_submitExtrinsic", []),
        ("author_submitExtrinsic", ["0xzz"]),
        ("author_submitExtrinsic", ["0x123"]),
        ("author_submitExtrinsic", ["0x"]),
        ("author_submitExtrinsic", ["0x12 34"]),
        ("author_submitExtrinsic", [5]),
        ("author_submitAndWatchExtrinsic", ["nothex"]),
        ("chain_unsubscribeNewHeads", [5]),
        ("chain_unsubscribeNewHeads", []),
        ("author_unwatchExtrinsic", [None]),
    ],
)
async def test_invalid_params(
    node: DevNode, ws: ClientConnection, method: str, params: list[Any]
) -> None:
    assert await error_code(ws, method, *params) == -32602
    assert node.active_subscriptions == 0


async def test_extra_params_are_ignored_as_on_substrate(ws: ClientConnection) -> None:
    assert await result(ws, "system_chain", "extra") == "GhostCloak Dev"
    assert await result(ws, "chain_getBlockHash", 0, "extra") == await result(
        ws, "chain_getBlockHash", 0
    )


async def test_named_params_are_invalid_params(ws: ClientConnection) -> None:
    await send(ws, {"jsonrpc": "2.0", "id": 9, "method": "chain_getBlockHash", "params": {}})
    answer = await recv(ws)
    assert answer["id"] == 9
    assert answer["error"]["code"] == -32602


async def test_garbage_never_breaks_the_node(node: DevNode, ws: ClientConnection) -> None:
    garbage = ["null", "true", "[[]]", "[[1]]", '{"jsonrpc":"2.0"}', '"x"', "{}", "[null]"]
    for text in garbage:
        await ws.send(text)
        answer = await recv(ws)
        assert "error" in (answer[0] if isinstance(answer, list) else answer), text
    await assert_nothing_pending(ws)
    async with connect(node.url) as fresh:
        assert await result(fresh, "system_chain") == "GhostCloak Dev"


# -- WebSocket framing -------------------------------------------------------------


async def test_binary_frames(ws: ClientConnection) -> None:
    request = {"jsonrpc": "2.0", "id": 4, "method": "system_chain"}
    await ws.send(orjson.dumps(request))
    answer = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(answer, str)  # answered as text
    assert orjson.loads(answer)["result"] == "GhostCloak Dev"
    await ws.send(b"\xff\xfe{")
    assert (await recv(ws))["error"]["code"] == -32700
    await assert_nothing_pending(ws)


async def test_fragmented_message_is_reassembled(ws: ClientConnection) -> None:
    fragments = ['{"jsonrpc":"2.0",', '"id":5,"method":', '"system_', 'chain"}']
    await ws.send(fragments)
    assert await recv(ws) == {"jsonrpc": "2.0", "id": 5, "result": "GhostCloak Dev"}
    await ws.send([b'{"jsonrpc":"2.0","id":6,', b'"method":"system_name"}'])
    assert (await recv(ws))["result"] == "ghostcloak-devnode"


async def test_oversized_fragmented_message_closes_with_1009(ws: ClientConnection) -> None:
    chunk = " " * (1024 * 1024)
    with contextlib.suppress(ConnectionClosed):  # the node may close before we are done
        await ws.send(['{"jsonrpc":"2.0","id":1,"method":"system_chain"}', *[chunk] * 17])
    await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
    assert ws.close_code == 1009


class _RawClient(WSListener):
    """A picows client, to send frames that `websockets` will not send."""

    def __init__(self) -> None:
        super().__init__()
        self.close_codes: list[int] = []

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_codes.append(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()


@pytest.mark.parametrize(
    "frames",
    [
        [(WSMsgType.CONTINUATION, b"{}", True)],  # nothing to continue
        [(WSMsgType.TEXT, b"{", False), (WSMsgType.TEXT, b"}", True)],  # message in a message
    ],
)
async def test_bad_fragmentation_closes_with_1002(
    node: DevNode, frames: list[tuple[WSMsgType, bytes, bool]]
) -> None:
    transport, client = await ws_connect(_RawClient, node.url)
    assert isinstance(client, _RawClient)
    for msg_type, payload, fin in frames:
        transport.send(msg_type, payload, fin)
    await asyncio.wait_for(transport.wait_disconnected(), TIMEOUT)
    assert client.close_codes == [1002]
    await eventually(lambda: node.active_connections == 0)


async def test_logs_hold_no_client_address(
    node: DevNode, ws: ClientConnection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_port = str(ws.local_address[1])
    await result(ws, "chain_subscribeNewHeads")
    await ws.send("{bad")
    await ws.close()
    await eventually(lambda: node.active_connections == 0)
    await node.aclose()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("ghostcloak_relay")]
    assert ours  # the node does log (start/stop); just never a client's address
    assert not any(client_port in message for message in ours)


async def test_invalid_utf8_text_closes_with_1007(node: DevNode, ws: ClientConnection) -> None:
    await ws.send(b'{"x":"\xff"}', text=True)
    await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
    assert ws.close_code == 1007
    await eventually(lambda: node.active_connections == 0)
