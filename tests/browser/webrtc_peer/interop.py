"""One Chromium ↔ aiortc payload exchange through a real server, run inside a network namespace of its own.

tests/browser/test_webrtc_interop.py starts it as::

    unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh \\
        .venv/bin/python -m tests.browser.webrtc_peer.interop --database DB --workdir DIR [--tuned]

and reads ``DIR/result.json``. Everything runs here, in a namespace whose only interface is ``lo``: the
server (its own process, SQLite, no STUN/TURN), chromedriver and Chromium, a tiny HTTP server for the page,
and the aiortc peer, which is the volunteer client's own Mesh (SignalingClient, signed and verified
descriptions, Link with framing). The browser peer is peer.js, written from docs/protocol.md.

Steps, each bounded in time: the browser joins signaling with a key and certificate made here; two forged
offers are sent to it (wrong receiver, altered SDP) and must be refused; the mesh links to it (aiortc
offers, Chromium answers) and payloads go both ways, more of them than the receiver's credit, so
``bulk_release`` must flow; one corrupted payload each way must be refused by the receiver's SHA-256 check;
then Chromium offers a new link, the mesh answers and replaces its old one, and payloads cross it too. Both
ends report the candidate pair they use. The result file holds what each side saw; the test judges it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import importlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from aiortc import RTCSctpTransport
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from hivewire.api import HivewireAPI, JoinResponse
from hivewire.diagnostics import nominated_pair
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import Link, LinkSettings, Mesh, MeshSettings, encode_payload, restrict_host_addresses
from hivewire.mesh.framing import HEADER
from hivewire.signaling import DescriptionVerifier, SignalingClient, SignalingSettings
from hivewire.signaling.signed import sign_description
from tests.browser.conftest import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS
from tests.client.live_server import Server
from tests.conftest import RUN, Account, new_user
from tests.support import LOOPBACK, eventually, free_port, within

logger = logging.getLogger("interop")

PAGE_DIR = Path(__file__).resolve().parent
PAGE_FILES = {"/peer.html": "text/html; charset=utf-8", "/peer.js": "text/javascript; charset=utf-8"}
SLUG = str(RUN["slug"])
SERVER_START_TIMEOUT_S = 60.0  # the server answering /healthz; ~4 s on an idle box
STEP_TIMEOUT_S = 30.0  # any one step (link opening, one batch of payloads); each takes a second or two
SCRIPT_TIMEOUT_S = STEP_TIMEOUT_S + 10.0  # WebDriver's own bound, above the page's
# Sizes of one batch of payloads: empty, one byte, exactly one full frame of body, several frames with a
# partial last one, one above the senders' 1 MiB bufferedAmount mark (so both wait for bufferedamountlow),
# and one more; six in all, more than the receiver's 4 payloads of credit, so bulk_release must flow.
PAYLOAD_SIZES = (0, 1, 262_144 - HEADER.size, 3 * (262_144 - HEADER.size) + 5, 2 * 2**20 + 3, 2**20)
SECOND_LINK_SIZES = (1, 1 * 2**20 + 1)
CORRUPT_SIZE = 100_000
CORRUPT_AT = 70_000  # inside the first chunk of a corrupt payload, after it was hashed
# Loopback is all the namespace has: Chromium leaves it out of ICE unless told, and would hide addresses behind
# mDNS names that aiortc cannot resolve. Without these two, Chromium 156's gathering never completes here. With
# them its descriptions carry no host candidate; its checks come from its any-address socket, and aiortc learns
# them as a peer-reflexive 127.0.0.1 candidate (the test checks both ends' selected pair).
WEBRTC_FLAGS = ("--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns")
TEST_SIGNALING = SignalingSettings(request_timeout_s=10.0, start_timeout_s=10.0)
TEST_MESH = MeshSettings(max_neighbours=1, answer_timeout_s=STEP_TIMEOUT_S, link=LinkSettings(open_timeout_s=20.0))


class NotIsolated(RuntimeError):
    """This process sees a network interface other than loopback: it must not send anything."""


def check_isolated() -> list[str]:
    """The interfaces this process sees; refuses to go on unless ``lo`` is the only one."""
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise NotIsolated(f"interfaces {names}: run me inside a fresh network namespace (unshare --net)")
    return names


def new_identity() -> tuple[PeerIdentity, dict[str, str]]:
    """A fresh Ed25519 peer key, and the same key as a private JWK for WebCrypto."""
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    identity = PeerIdentity(private_key=key, public_key_raw=raw)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": identity.peer_key, "d": _b64url(private)}
    return identity, jwk


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclasses.dataclass
class Volunteer:
    """One peer of the run: its key and what joining gave it."""

    identity: PeerIdentity
    jwk: dict[str, str]
    joined: JoinResponse


def join(server: Server, user: Account) -> Volunteer:
    identity, jwk = new_identity()
    with HivewireAPI(server.url, user.token) as api:
        joined = api.join(SLUG, identity.peer_key)
    if joined.ice_servers:
        raise AssertionError(f"the server handed out ICE servers {joined.ice_servers}; the test needs none")
    return Volunteer(identity, jwk, joined)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves peer.html and peer.js, nothing else (the page needs an http origin for WebCrypto)."""

    def do_GET(self) -> None:
        content_type = PAGE_FILES.get(self.path)
        if content_type is None:
            self.send_error(404)
            return
        body = (PAGE_DIR / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("page server: " + format, *args)


@contextlib.contextmanager
def page_server() -> Iterator[str]:
    """The page's URL on a loopback HTTP server, stopped on exit."""
    httpd = http.server.ThreadingHTTPServer((LOOPBACK, free_port()), _PageHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{httpd.server_address[1]}/peer.html"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, *WEBRTC_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(SCRIPT_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


class Page:
    """Calls into ``window.hivewire`` from worker threads, so the event loop (and aiortc) keeps running."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self._driver = driver

    async def call(self, method: str, *args: Any) -> Any:
        script = f"return await window.hivewire.{method}(...arguments)"
        return await asyncio.to_thread(self._driver.execute_script, script, *args)


def page_log(driver: webdriver.Chrome) -> list[str]:
    """What peer.js logged (signaling, refusals, link state), for the helper's log when a step failed."""
    try:
        lines = driver.execute_script("return window.hivewire ? window.hivewire.report().log : []")
    except WebDriverException as exc:
        return [f"(the page's log could not be read: {exc.msg})"]
    return [str(line) for line in lines]


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def forged_offers(aiortc: Volunteer, browser_id: str) -> list[str]:
    """Sends the browser two offers that a relay could forge; returns the checks they are meant to fail."""
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
    certificate = aiortc.joined.certificate
    signed = functools.partial(sign_description, aiortc.identity, certificate, sender=aiortc.identity.peer_id)
    other_receiver = aiortc.identity.peer_id  # signed for someone else, then sent to the browser
    wrong_receiver = signed(receiver=other_receiver, kind="offer", sdp=sdp, now=time.time())
    altered = signed(receiver=browser_id, kind="offer", sdp=sdp, now=time.time())
    altered["sdp"] = altered["sdp"].replace("AB:AB", "CD:CD", 1)  # a relay swapping in its own DTLS key
    async with SignalingClient(aiortc.joined.signaling_url, lambda: certificate, settings=TEST_SIGNALING) as client:
        await client.send_signal(browser_id, "offer", wrong_receiver)
        await client.send_signal(browser_id, "offer", altered)
    return ["signature", "fingerprints"]


def corrupt_to_browser(link: Link, payload_id: int, max_frame_bytes: int) -> None:
    """Frames one payload as framing.py does, then flips a byte of its first chunk, and sends it raw."""
    frames = list(encode_payload(payload_id, os.urandom(CORRUPT_SIZE), max_frame_bytes))
    chunk = bytearray(frames[1])
    chunk[HEADER.size + CORRUPT_AT] ^= 0xFF
    frames[1] = bytes(chunk)
    for frame in frames:
        link.bulk_channel.send(frame)


def ice_addresses(sctp: RTCSctpTransport) -> dict[str, list[str]]:
    """Every candidate address aioice has on either side (prflx included), not only the nominated pair."""
    connection = sctp.transport.transport._connection  # as hivewire.diagnostics.nominated_pair reads it
    return {
        "local": sorted({candidate.host for candidate in connection.local_candidates}),
        "remote": sorted({candidate.host for candidate in connection.remote_candidates}),
    }


async def payloads_both_ways(link: Link, page: Page, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Random payloads of ``sizes`` from aiortc to the browser, then as many from the browser to aiortc."""
    step_ms = STEP_TIMEOUT_S * 1000
    payloads = [os.urandom(size) for size in sizes]

    async def send_all() -> list[dict[str, Any]]:
        return [
            {"payload_id": await link.send_payload(data), "size": len(data), "sha256": digest(data)}
            for data in payloads
        ]

    started = time.perf_counter()
    sent, received = await within(
        asyncio.gather(send_all(), page.call("receive", len(sizes), step_ms)), "aiortc → browser", STEP_TIMEOUT_S
    )
    to_browser = {"sent": sent, "received": received, "seconds": time.perf_counter() - started}

    started = time.perf_counter()
    browser_sends = asyncio.ensure_future(page.call("send", list(sizes), step_ms))
    got = []
    for _ in sizes:
        payload_id, data = await within(link.recv_payload(), "a payload from the browser", STEP_TIMEOUT_S)
        got.append({"payload_id": payload_id, "size": len(data), "sha256": digest(data)})
    to_aiortc = {"sent": await browser_sends, "received": got, "seconds": time.perf_counter() - started}
    return {"to_browser": to_browser, "to_aiortc": to_aiortc}


async def corruption_both_ways(link: Link, page: Page, max_frame_bytes: int) -> dict[str, Any]:
    """A corrupted payload each way: the receiver's checksum must catch it, and the link must go on.

    Last on the link's bulk channel: the frames to the browser use the id the link would give its next payload.
    """
    step_ms = STEP_TIMEOUT_S * 1000
    refused_before = link.stats.frames_refused
    (corrupt,) = await page.call("send", [CORRUPT_SIZE], step_ms, CORRUPT_AT)  # resolves on bulk_refused
    good_sent = asyncio.ensure_future(page.call("send", [1000], step_ms))
    next_id, data = await within(link.recv_payload(), "the good payload after the corrupt one", STEP_TIMEOUT_S)
    to_aiortc = {
        "browser_sent": corrupt,
        "frames_refused": link.stats.frames_refused - refused_before,
        "next_delivered": {"payload_id": next_id, "size": len(data), "sha256": digest(data)},
        "next_sent": (await good_sent)[0],
    }
    corrupt_id = link.stats.payloads_sent + 1
    corrupt_to_browser(link, corrupt_id, max_frame_bytes)
    to_browser = {"payload_id": corrupt_id, "refusals": await page.call("refusals", 1, step_ms)}
    return {"to_aiortc": to_aiortc, "to_browser": to_browser}


async def transports(link: Link, page: Page) -> dict[str, Any]:
    """What each end says the link runs on: candidate pairs and addresses, SCTP class, bulk path."""
    sctp = link.bulk_channel.transport
    return {
        "browser": await page.call("transport"),
        "aiortc": {"selected": nominated_pair(sctp), **ice_addresses(sctp)},
        "sctp_transport": type(sctp).__name__,
        "link_path": link.path,
        "link_stats": dataclasses.asdict(link.stats),
    }


async def exchange(
    server: Server, jwks: dict[str, Any], aiortc: Volunteer, browser: Volunteer, page: Page
) -> dict[str, Any]:
    """Everything on the wire, in order; returns what both sides saw."""
    browser_id, aiortc_id = browser.identity.peer_id, aiortc.identity.peer_id
    config = {
        "signaling_url": browser.joined.signaling_url,
        "certificate": browser.joined.certificate,
        "peer_id": browser_id,
        "private_jwk": browser.jwk,
        "run": SLUG,
        "issuer": server.url,
        "jwks": jwks,
        "ice_servers": [server.model_dump(exclude_none=True) for server in browser.joined.ice_servers],
    }
    result: dict[str, Any] = {"browser_peer": browser_id, "aiortc_peer": aiortc_id}
    result["event_loop"] = type(asyncio.get_running_loop()).__module__
    result["welcome"] = await page.call("start", config)
    result["forged_offers"] = await forged_offers(aiortc, browser_id)

    certificates = CertificateVerifier(server.url)
    verifier = DescriptionVerifier(certificates, run=SLUG, self_peer_id=aiortc_id)
    signaling = SignalingClient(aiortc.joined.signaling_url, lambda: aiortc.joined.certificate, settings=TEST_SIGNALING)
    mesh = Mesh(
        aiortc.identity,
        lambda: aiortc.joined.certificate,
        verifier,
        ice_servers=aiortc.joined.ice_servers,
        signaling=signaling,
        settings=TEST_MESH,
    )
    step_ms = STEP_TIMEOUT_S * 1000
    try:
        await mesh.start([browser_id])
        # 1. The mesh offers (Chromium verifies the offer and answers), as when a volunteer links to a browser.
        link = await within(mesh.connect(browser_id), "the mesh linking to the browser", STEP_TIMEOUT_S)
        opened = await page.call("waitOpen", step_ms)
        first: dict[str, Any] = {"browser_link": opened}
        first |= await payloads_both_ways(link, page, PAYLOAD_SIZES)
        first["corrupt"] = await corruption_both_ways(link, page, opened["max_frame_bytes"])
        first |= await transports(link, page)
        result["aiortc_offers"] = first

        # 2. Chromium offers a new link (the mesh verifies it, replaces the old link and answers).
        opened = await page.call("offer", aiortc_id, step_ms)
        await eventually(
            lambda: mesh.link(browser_id) not in (None, link), "the mesh adopting the browser's link", STEP_TIMEOUT_S
        )
        second_link = mesh.link(browser_id)  # adopted once open
        assert second_link is not None
        second: dict[str, Any] = {"browser_link": opened, "first_link_closed": link.closed}
        second |= await payloads_both_ways(second_link, page, SECOND_LINK_SIZES)
        second |= await transports(second_link, page)
        result["browser_offers"] = second

        result["signals_refused_by_aiortc"] = mesh.stats.signals_refused
        result["browser_report"] = await page.call("report")
    finally:
        await mesh.close()
        certificates.close()
    return result


def _tuning_module() -> ModuleType | None:
    """hivewire.mesh.tuning where this client has it (it came with issue 8)."""
    try:
        return importlib.import_module("hivewire.mesh.tuning")
    except ModuleNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=Path, required=True, help="a migrated SQLite file for the server")
    parser.add_argument("--workdir", type=Path, required=True, help="logs, the browser profile, result.json")
    parser.add_argument("--tuned", action="store_true", help="apply hivewire.mesh.tuning and run on uvloop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    interfaces = check_isolated()
    restrict_host_addresses([LOOPBACK])
    result: dict[str, Any] = {"interfaces": interfaces, "tuned": args.tuned}
    tuning = _tuning_module()
    if args.tuned:
        if tuning is None:
            raise SystemExit("--tuned needs hivewire.mesh.tuning, which this client does not have")
        result["tuning_applied"] = tuning.apply_sctp_tuning()
    elif tuning is not None:
        tuning.apply_sctp_tuning(False)  # untuned means aiortc as shipped, whatever the environment says
    started = time.monotonic()
    server = Server(args.database, args.workdir / "server.log", start_timeout_s=SERVER_START_TIMEOUT_S)
    try:
        server.start()  # inside the try: a server that failed to answer in time is still stopped
        logger.info("server up at %s after %.1f s", server.url, time.monotonic() - started)
        with httpx.Client(base_url=server.url, timeout=10.0) as http:
            # The organizer (the first account) creates the run and volunteers the aiortc peer.
            organizer = new_user(http, "olivia")  # type: ignore[arg-type]  # has the calls new_user makes
            http.post("/api/runs", json=RUN, headers=organizer.headers).raise_for_status()
            aiortc = join(server, organizer)
            browser = join(server, new_user(http, "wendy"))  # type: ignore[arg-type]
            jwks = http.get("/.well-known/jwks.json").raise_for_status().json()  # handed to the page
        logger.info("run created and joined twice after %.1f s", time.monotonic() - started)
        with page_server() as url, chromium(args.workdir / "chromium-profile") as driver:
            driver.get(url)
            logger.info("Chromium on %s after %.1f s", url, time.monotonic() - started)
            work = exchange(server, jwks, aiortc, browser, Page(driver))
            try:
                # The tuned network process runs on uvloop (tuning.run); the untuned one on asyncio's own loop.
                result |= tuning.run(work) if args.tuned and tuning is not None else asyncio.run(work)
            except BaseException:
                logger.error("the exchange failed; the page's own log:\n%s", "\n".join(page_log(driver)))
                raise
            result["console"] = driver.get_log("browser")
    finally:
        server.stop()
        if tuning is not None:
            tuning.remove_sctp_tuning()
    (args.workdir / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("exchange done; result in %s", args.workdir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
