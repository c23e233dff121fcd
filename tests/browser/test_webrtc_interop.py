"""Chromium is a standard WebRTC peer of a run: it links with the volunteer client's own mesh, untuned and
tuned, through the real server's signaling, and payloads cross the data channels both ways, intact.

The browser side is tests/browser/webrtc_peer/peer.js, written from docs/protocol.md alone: it joins
signaling with a peer certificate for a key the test generated, verifies the signed offer (certificate
against the server's JWKS, Ed25519 signature with WebCrypto, fingerprints, timestamp, nonce), answers with a
description it signs itself, and speaks the link's two pre-negotiated channels (msgpack control records,
20-byte framing with a SHA-256 per payload, credit through ``bulk_release``). The aiortc side is
``hivewire.mesh.Mesh`` with the real SignalingClient and DescriptionVerifier, with
``hivewire.mesh.tuning`` applied (and uvloop) in the tuned case. tests/browser/webrtc_peer/interop.py runs
the exchange and records what each side saw; this module judges it.

Network safety, and why a namespace: every process of the exchange (the server, chromedriver and Chromium,
the page's HTTP server, the aiortc peer) runs in a fresh network namespace whose only interface is ``lo``
(``unshare --net``), so no packet can reach any address but loopback, whatever either stack gathers.
Filtering candidates in the host's namespace would not be enough: Chromium gathers on every interface
(eth0 included) and may send its connectivity checks from any of them, and aioice answers a check from an
unknown address by learning a peer-reflexive candidate there and sending to it, which no SDP filter
prevents. Inside the namespace the helper still refuses to run if it sees any interface but ``lo``, restricts
aioice's host candidates to 127.0.0.1, drops non-loopback candidates from Chromium's answer before signing
it, and this test checks from both ends (Chromium's getStats, aioice's nominated pair and candidate lists)
that the link used 127.0.0.1 and knew no other destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import needs_browser
from tests.browser.webrtc_peer.interop import CORRUPT_SIZE, PAYLOAD_SIZES, SECOND_LINK_SIZES
from tests.support import LOOPBACK

pytestmark = [pytest.mark.browser, pytest.mark.slow, needs_browser]

ROOT = Path(__file__).resolve().parents[2]
HELPER = "tests.browser.webrtc_peer.interop"
# The exchange takes ~20 s on the idle 2-core box and 30-40 s at a load average of 15 (server and Chromium
# start-up included); a helper still running after this is stuck, and its whole session is killed.
HELPER_TIMEOUT_S = 120.0
# Chromium reports its sockets bound to the any-address as local candidates; they are never a destination.
ANY_ADDRESSES = {"0.0.0.0", "::"}  # noqa: S104


def _namespace_unavailable() -> str | None:
    """Why this machine cannot give the exchange a network namespace of its own, or None."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace (unshare --net)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, timeout=10, check=False)
    if probe.returncode != 0:
        return f"unshare --net failed: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def isolated() -> None:
    """Skips, saying why, where no network namespace can be made: the exchange never runs outside one."""
    reason = _namespace_unavailable()
    if reason is not None:
        pytest.skip(reason)


def _wait_unreaped(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Waits for ``process`` to exit without reaping it (WNOWAIT); False if it still runs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_exchange(workdir: Path, sqlite_template: Path, *, tuned: bool) -> dict[str, Any]:
    """Runs the helper in a fresh namespace with only lo up; returns its result, or fails with its log."""
    database = workdir / "hivewire.db"
    shutil.copy(sqlite_template, database)
    # Warnings are errors in the helper too, as in the rest of the suite (pyproject's filterwarnings).
    helper = [sys.executable, "-W", "error", "-m", HELPER, "--database", str(database), "--workdir", str(workdir)]
    command = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *helper]
    if tuned:
        command.append("--tuned")
    log_path = workdir / "helper.log"
    with log_path.open("wb") as log:
        # Its own session, so a stuck run is killed with everything it started (server, chromedriver, Chromium).
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finished = _wait_unreaped(process, HELPER_TIMEOUT_S)
        # Whatever is left in the helper's session (a server or browser it could not stop, or all of it after
        # a timeout) goes too. The helper is not reaped yet, so its id still names this session alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
    if not finished:
        pytest.fail(f"the exchange did not finish in {HELPER_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
    assert returncode == 0, f"the exchange failed (exit {returncode}):\n{log_path.read_text()[-6000:]}"
    result: dict[str, Any] = json.loads((workdir / "result.json").read_text())
    return result


def _digests(entries: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    return [(entry["payload_id"], entry["size"], entry["sha256"]) for entry in entries]


def check_payloads(link: dict[str, Any], sizes: tuple[int, ...]) -> None:
    """Every payload arrived whole both ways, each verified by its receiver against its START digest."""
    to_browser, to_aiortc = link["to_browser"], link["to_aiortc"]
    assert [entry["size"] for entry in to_browser["sent"]] == list(sizes)
    assert _digests(to_browser["received"]) == _digests(to_browser["sent"])
    assert [entry["size"] for entry in to_aiortc["sent"]] == list(sizes)
    assert [entry["refused"] for entry in to_aiortc["sent"]] == [None] * len(sizes)
    # The aiortc side hashed the bytes it got: they are the bytes the browser hashed before sending.
    assert _digests(to_aiortc["received"]) == _digests(to_aiortc["sent"])


def check_transport(link: dict[str, Any], *, tuned: bool) -> None:
    """The link ran on the expected SCTP stack, over the data channel, with loopback at both ends."""
    assert link["sctp_transport"] == ("TunedSctpTransport" if tuned else "RTCSctpTransport")
    assert link["link_path"] == "webrtc"  # a browser offers no direct TLS path: the data channel carries all
    browser = link["browser"]
    # The payloads crossed the pair Chromium selected (its state flips to in-progress during consent checks).
    assert browser["selected"]["bytes_sent"] > 1_000_000 and browser["selected"]["bytes_received"] > 1_000_000
    assert (browser["selected"]["local"]["address"], browser["selected"]["remote"]["address"]) == (LOOPBACK, LOOPBACK)
    assert set(browser["remote"]) == {LOOPBACK}
    assert set(browser["local"]) <= {LOOPBACK, *ANY_ADDRESSES}
    assert set(browser["dropped"]) <= {"::1"}, "Chromium gathered a candidate outside loopback"
    aiortc = link["aiortc"]
    assert aiortc["selected"]["local_address"].startswith(f"{LOOPBACK}:")
    assert aiortc["selected"]["remote_address"].startswith(f"{LOOPBACK}:")
    assert aiortc["local"] == aiortc["remote"] == [LOOPBACK]


@pytest.mark.parametrize("tuned", [False, True], ids=["untuned", "tuned"])
def test_chromium_and_aiortc_exchange_verified_payloads_over_loopback(
    tuned: bool, isolated: None, sqlite_template: Path, tmp_path: Path
) -> None:
    result = run_exchange(tmp_path, sqlite_template, tuned=tuned)
    report = result["browser_report"]
    assert result["interfaces"] == ["lo"]
    assert not report["errors"], report["log"]
    if tuned:
        assert result["tuning_applied"] is True
        assert result["event_loop"].startswith("uvloop")
    else:
        assert result["event_loop"].startswith("asyncio")

    # Signed signaling: the browser refused the two forged offers and took the mesh's genuine one, and the
    # mesh verified the browser's signed answer, then its signed offer.
    assert report["refused_signals"] == result["forged_offers"] == ["signature", "fingerprints"]
    assert result["signals_refused_by_aiortc"] == 0

    # 1. The mesh offered, Chromium answered.
    first = result["aiortc_offers"]
    assert first["browser_link"] == {"peer": result["aiortc_peer"], "max_frame_bytes": 262_144}
    check_payloads(first, PAYLOAD_SIZES)
    check_transport(first, tuned=tuned)
    # One corrupted payload each way: refused by the receiver's SHA-256 check, and the link went on.
    corrupt = first["corrupt"]["to_aiortc"]
    assert corrupt["browser_sent"]["size"] == CORRUPT_SIZE
    assert "SHA-256" in corrupt["browser_sent"]["refused"]
    assert corrupt["frames_refused"] == 1
    assert corrupt["next_delivered"]["payload_id"] == corrupt["browser_sent"]["payload_id"] + 1
    assert _digests([corrupt["next_delivered"]]) == _digests([corrupt["next_sent"]])
    refused = first["corrupt"]["to_browser"]
    assert len(refused["refusals"]) == 1
    assert f"payload {refused['payload_id']} discarded: SHA-256" in refused["refusals"][0]

    # 2. Chromium offered a new link, the mesh answered and replaced the first one.
    second = result["browser_offers"]
    assert second["browser_link"] == {"peer": result["aiortc_peer"], "max_frame_bytes": 262_144}
    assert second["first_link_closed"] is True
    check_payloads(second, SECOND_LINK_SIZES)
    check_transport(second, tuned=tuned)

    # Nothing but the good payloads reached the browser's consumer.
    assert report["counters"]["payloads_received"] == len(PAYLOAD_SIZES) + len(SECOND_LINK_SIZES)
    errors = [entry for entry in result["console"] if entry["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
