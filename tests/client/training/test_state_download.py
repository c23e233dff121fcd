"""State download from several donors (session/state.py): chunks spread over the donors, each hash-checked,
a failing donor's chunks taken over by the others.

The donors and the joiner talk through in-memory links that still pass every control record through the
real ControlCodec (schema checks) and hand payloads over as the bulk channel would, one per send.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Collection
from typing import Any

import pytest

from hivewire.mesh import ControlCodec, ControlRecordError
from hivewire.session import state
from hivewire.session.state import STATE_SCHEMAS, StateError, StateExchange

CODEC = ControlCodec(STATE_SCHEMAS)
CHUNK = 1000  # bytes per chunk in these tests, so a small blob makes many chunks


class Link:
    """Our end of a link to ``peer``: control records and payloads go to the peer's mesh."""

    def __init__(self, me: Mesh, peer: Mesh) -> None:
        self.me, self.peer_mesh, self.peer = me, peer, peer.name
        self.payloads: asyncio.Queue[bytes] = asyncio.Queue()  # what the peer sent us
        self.corrupt = False  # flips a byte of every payload we send

    def send_control(self, record: dict[str, Any]) -> None:
        decoded = CODEC.decode(CODEC.encode(record))
        asyncio.get_running_loop().call_soon(self.peer_mesh.deliver, self.me.name, decoded)

    async def send_payload(self, data: bytes) -> int:
        if self.corrupt:
            data = bytes([data[0] ^ 1]) + bytes(data[1:])
        self.peer_mesh.link(self.me.name).payloads.put_nowait(bytes(data))  # type: ignore[union-attr]
        return len(data)

    async def recv_payload(self) -> tuple[int, bytearray]:
        return 0, bytearray(await self.payloads.get())


class Mesh:
    def __init__(self, name: str, network: dict[str, Mesh]) -> None:
        self.name, self.network = name, network
        self.handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {}
        self.links: dict[str, Link] = {}
        network[name] = self

    def on_records(self, types: Collection[str], handler: Callable[[str, dict[str, Any]], None]) -> None:
        self.handlers.update(dict.fromkeys(types, handler))

    def link(self, peer: str) -> Link | None:
        if peer not in self.network:
            return None
        return self.links.setdefault(peer, Link(self, self.network[peer]))

    async def connect(self, peer: str) -> Link:
        link = self.link(peer)
        assert link is not None
        return link

    def deliver(self, sender: str, record: dict[str, Any]) -> None:
        self.handlers[record["type"]](sender, record)


RUN_EPOCH = 5  # the run's epoch as most peers gossip it, unless a test says otherwise


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(state, "CHUNK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(state, "OFFER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(state, "LINK_TIMEOUT_S", 0.5)


def swarm(donors: int) -> tuple[StateExchange, dict[str, StateExchange], dict[str, Mesh]]:
    network: dict[str, Mesh] = {}
    joiner = StateExchange(Mesh("joiner", network))  # type: ignore[arg-type]
    exchanges = {f"donor{n}": StateExchange(Mesh(f"donor{n}", network)) for n in range(donors)}  # type: ignore[arg-type]
    return joiner, exchanges, network


async def test_the_chunks_come_from_every_donor_and_assemble_to_the_snapshot() -> None:
    joiner, donors, _ = swarm(3)
    blob = os.urandom(20 * CHUNK + 123)
    for exchange in donors.values():
        exchange.offer(5, blob)
    epoch, downloaded, served = await joiner.download(list(donors), max_epoch=RUN_EPOCH)
    assert (epoch, downloaded) == (5, blob)
    assert len(served) >= 2 and set(served) <= set(donors)


async def test_a_donor_sending_wrong_chunks_is_dropped_and_the_others_finish() -> None:
    joiner, donors, network = swarm(3)
    blob = os.urandom(12 * CHUNK)
    for exchange in donors.values():
        exchange.offer(2, blob)
    network["donor0"].link("joiner").corrupt = True  # type: ignore[union-attr]
    _, downloaded, served = await joiner.download(list(donors), max_epoch=RUN_EPOCH)
    assert downloaded == blob and "donor0" not in served


async def test_a_silent_donor_is_dropped_after_the_chunk_deadline() -> None:
    joiner, donors, network = swarm(2)
    blob = os.urandom(6 * CHUNK)
    for exchange in donors.values():
        exchange.offer(1, blob)

    async def silent(data: bytes) -> int:
        return len(data)  # accepted, never delivered

    network["donor1"].link("joiner").send_payload = silent  # type: ignore[method-assign,union-attr]
    _, downloaded, served = await joiner.download(["donor1", "donor0"], max_epoch=RUN_EPOCH)
    assert downloaded == blob and served == ("donor0",)


async def test_a_donor_that_cannot_be_linked_is_dropped_after_the_link_deadline() -> None:
    """A donor that left (the mesh keeps retrying it) holds the download up to LINK_TIMEOUT_S, not forever."""
    joiner, donors, network = swarm(2)
    blob = os.urandom(3 * CHUNK)
    for exchange in donors.values():
        exchange.offer(1, blob)
    mesh = network["joiner"]
    linked = mesh.connect

    async def connect(peer: str) -> Link:
        if peer == "donor1":
            await asyncio.Event().wait()  # never linked
        return await linked(peer)

    mesh.connect = connect  # type: ignore[method-assign]
    _, downloaded, served = await asyncio.wait_for(joiner.download(["donor1", "donor0"], max_epoch=RUN_EPOCH), 5)
    assert downloaded == blob and served == ("donor0",)


async def test_a_donor_that_moved_on_still_serves_the_snapshot_it_offered() -> None:
    joiner, donors, _ = swarm(1)
    old, new = os.urandom(5 * CHUNK), os.urandom(5 * CHUNK)
    donors["donor0"].offer(3, old)
    offer = await joiner._ask_offer("donor0")
    donors["donor0"].offer(4, new)  # the next epoch's snapshot, mid-download
    assert offer is not None
    chunk = await joiner._chunk(joiner._mesh.link("donor0"), offer, 2)  # type: ignore[arg-type]
    assert chunk == old[2 * CHUNK : 3 * CHUNK]


async def test_no_donor_delivering_every_chunk_is_a_state_error() -> None:
    joiner, donors, network = swarm(2)
    blob = os.urandom(4 * CHUNK)
    for exchange in donors.values():
        exchange.offer(1, blob)
    for name in donors:
        network[name].link("joiner").corrupt = True  # type: ignore[union-attr]
    with pytest.raises(StateError, match="chunks of the state could not be had"):
        await joiner.download(list(donors), max_epoch=RUN_EPOCH)


async def test_donors_without_a_snapshot_refuse_and_that_is_a_state_error() -> None:
    joiner, donors, _ = swarm(2)
    with pytest.raises(StateError, match="no state offer"):
        await joiner.download(list(donors), max_epoch=RUN_EPOCH)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chunks": ["0" * 64]}, "1 hashes for 3 chunks"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"size": 2**40}, "out of range"),
        ({"chunks": ["0" * 63 + "G"] * 3}, "64 lowercase hex"),
    ],
)
def test_inconsistent_offers_are_refused_by_the_codec(change: dict[str, Any], message: str) -> None:
    offer = {"type": "state_offer", "epoch": 1, "size": 2500, "sha256": "a" * 64, "chunk_size": 1000}
    offer["chunks"] = ["b" * 64] * 3
    with pytest.raises(ControlRecordError, match=message):
        CODEC.validate({**offer, **change})


async def test_the_newest_offer_wins_and_only_its_holders_serve_it() -> None:
    joiner, donors, _ = swarm(3)
    old, new = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    donors["donor0"].offer(1, old)  # a fellow joiner still at an older epoch
    donors["donor1"].offer(2, new)
    donors["donor2"].offer(2, new)
    epoch, downloaded, served = await joiner.download(list(donors), max_epoch=RUN_EPOCH)
    assert (epoch, downloaded) == (2, new) and "donor0" not in served


async def test_an_offer_past_the_run_epoch_is_not_believed() -> None:
    """One certified donor claiming a later epoch than the run's (with a matching hash in its own gossip) loses."""
    joiner, donors, _ = swarm(2)
    honest, forged = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    donors["donor0"].offer(RUN_EPOCH + 7, forged)
    donors["donor1"].offer(RUN_EPOCH, honest)
    epoch, downloaded, served = await joiner.download(list(donors), max_epoch=RUN_EPOCH)
    assert (epoch, downloaded, served) == (RUN_EPOCH, honest, ("donor1",))
