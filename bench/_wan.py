"""An emulated WAN for benchmarks: peers in network namespaces behind one router with delay and rate limits.

Topology, for ``n`` peers (addresses from 10.78.0.0/16, all inside namespaces this run creates)::

    peer i (10.78.i.2, eth0: tbf uplink rate) -- veth -- (p<i>: 10.78.i.1, tbf downlink rate) router

The router forwards between peers; every forwarded packet goes through NFQUEUE to bench/_delay.py, which
holds it for the one-way delay (this kernel has no netem). So a packet from peer a to peer b waits behind
a's uplink (``rate``), then ``delay``, then b's downlink (``rate``): RTT = 2 x delay, each peer has
``rate`` each way, full duplex, which is what the bound 2(n-1)/n * size / rate assumes.

Namespace names carry the creating process id and a random tag (``hwbench-<pid>-<tag>-<role>``): runs
never collide, and :func:`sweep_stale` removes what a killed run left (its process is gone) without
touching a live one. Nothing is added to the host's own namespace; IPv6 is off in every namespace so aioice
offers no link-local candidates. A process joins a peer's namespace with :func:`enter_namespace`.
"""

import contextlib
import ctypes
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "hwbench-"
NET = "10.78"
COMMAND_TIMEOUT_S = 20.0  # one ip/tc/iptables command; milliseconds unless the machine is stuck
DELAY_READY_TIMEOUT_S = 15.0  # until the delay line has bound its queue
STOP_TIMEOUT_S = 5.0
CLONE_NEWNET = 0x40000000
# tbf: the bucket holds one GSO burst (TCP hands 64 KiB segments to a veth), the queue ~ one BDP at 40 ms.
TBF_BURST_BYTES = 64 * 1024
TBF_QUEUE_S = 0.05
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


class WanError(RuntimeError):
    """A lab command failed; the message names the command and what it printed."""


def unavailable() -> str | None:
    """Why this machine cannot build the WAN lab, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc, iptables)"
    for tool in ("ip", "tc", "iptables"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode != 0:
            return f"{tool} not found"
    return None


def _run(argv: Sequence[str], *, ns: str | None = None) -> str:
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WanError(f"{' '.join(full)}: no exit after {COMMAND_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise WanError(f"{' '.join(full)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _ip_batch(ns: str, commands: Sequence[str]) -> None:
    done = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise WanError(f"ip -n {ns} -batch exited {done.returncode}: {done.stderr.strip()}")


def _delete_namespace(name: str) -> None:
    """Kill what still runs in one of our namespaces (only bench processes run there), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        logger.error("could not delete namespace %s: %s", name, done.stderr.strip())


def sweep_stale() -> list[str]:
    """Delete bench namespaces whose creating process is gone; return their names."""
    removed = []
    for line in _run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAME.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete_namespace(name)
        removed.append(name)
    if removed:
        logger.warning("removed %d namespace(s) left by earlier benchmark runs: %s", len(removed), removed)
    return removed


def enter_namespace(name: str) -> None:
    """Move the calling process (one thread: call it first thing) into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns into {name}: {os.strerror(code)}")
    finally:
        os.close(fd)


class WanLab:
    """``peers`` namespaces joined through a router namespace with ``delay_ms`` one way and ``rate_mbit``
    per peer each way; built on entry, every namespace (and so every veth) deleted on exit."""

    def __init__(self, peers: int, *, delay_ms: float, rate_mbit: float) -> None:
        self.peers = peers
        self.delay_ms = delay_ms
        self.rate_mbit = rate_mbit
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.router = f"{self.tag}-router"
        self.namespaces = [f"{self.tag}-p{i}" for i in range(peers)]
        self.addresses = [f"{NET}.{i}.2" for i in range(peers)]
        self._created: list[str] = []
        self._delay: subprocess.Popen[str] | None = None
        self.delay_report = ""  # the delay line's last word (packets, lateness), once closed

    def __enter__(self) -> "WanLab":
        try:
            sweep_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], ns=name)
        _ip_batch(name, ["link set lo up"])

    def _shape(self, ns: str, device: str) -> None:
        rate_bytes_s = self.rate_mbit * 1e6 / 8
        limit = int(rate_bytes_s * TBF_QUEUE_S) + TBF_BURST_BYTES
        _run(
            [
                "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{self.rate_mbit:g}mbit",
                "burst", str(TBF_BURST_BYTES), "limit", str(limit),
            ],
            ns=ns,
        )  # fmt: skip

    def _build(self) -> None:
        self._add_namespace(self.router)
        _run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=self.router)
        for i, ns in enumerate(self.namespaces):
            self._add_namespace(ns)
            _ip_batch(
                self.router,
                [
                    f"link add p{i} type veth peer name eth0 netns {ns}",
                    f"addr add {NET}.{i}.1/24 dev p{i}",
                    f"link set p{i} up",
                ],
            )
            _ip_batch(
                ns,
                [f"addr add {self.addresses[i]}/24 dev eth0", "link set eth0 up", f"route add default via {NET}.{i}.1"],
            )
            self._shape(ns, "eth0")
            self._shape(self.router, f"p{i}")
        if self.delay_ms > 0:  # without delay, rates alone: the delay line stays out of the path
            self._start_delay()
            _run(["iptables", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0"], ns=self.router)
        logger.info(
            "WAN lab %s: %d peers, %g ms one way, %g Mbit/s each way per peer",
            self.tag,
            self.peers,
            self.delay_ms,
            self.rate_mbit,
        )

    def _start_delay(self) -> None:
        script = Path(__file__).with_name("_delay.py")
        argv = ["ip", "netns", "exec", self.router, sys.executable, str(script), "--delay-ms", f"{self.delay_ms:g}"]
        self._delay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._delay.stdout is not None
        try:
            line = _read_line(self._delay, DELAY_READY_TIMEOUT_S)
        except TimeoutError as exc:
            raise WanError(f"the delay line did not start within {DELAY_READY_TIMEOUT_S} s") from exc
        if line.strip() != "ready":
            raise WanError(f"the delay line did not start (exit {self._delay.poll()}): {line!r}")

    def drops(self) -> dict[str, int]:
        """Packets dropped so far: by the uplink and downlink rate limiters (queue full) and the delay line.

        Rate-limiter drops are the congestion signal a real bottleneck gives; UDP socket drops are a peer
        process reading too slowly (aiortc on a busy CPU); delay-line drops would be a fault of the
        emulation (its queue or socket overflowed) and make a row meaningless.
        """
        uplinks = sum(_drops(_run(["tc", "-s", "qdisc", "show", "dev", "eth0"], ns=ns)) for ns in self.namespaces)
        downlinks = _drops(_run(["tc", "-s", "qdisc", "show"], ns=self.router))
        delay_line = 0
        queues = _run(["cat", "/proc/net/netfilter/nfnetlink_queue"], ns=self.router) if self._delay else ""
        for line in queues.splitlines():
            fields = line.split()
            delay_line += int(fields[5]) + int(fields[6])  # queue_dropped, user_dropped
        sockets = sum(_udp_receive_buffer_errors(_run(["cat", "/proc/net/snmp"], ns=ns)) for ns in self.namespaces)
        return {"uplink": uplinks, "downlink": downlinks, "delay line": delay_line, "udp socket": sockets}

    def close(self) -> None:
        """Stop the delay line and delete every namespace; safe to call twice and after a failed build."""
        if self._delay is not None:
            if self._delay.poll() is None:
                self._delay.terminate()
            try:
                _, errors = self._delay.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._delay.kill()
                _, errors = self._delay.communicate()
            self.delay_report = errors.strip().splitlines()[-1] if errors.strip() else "delay line: no report"
            self._delay = None
        for name in reversed(self._created):
            _delete_namespace(name)
        self._created.clear()


def _read_line(process: "subprocess.Popen[str]", timeout_s: float) -> str:
    """One line of the process's stdout, or TimeoutError (select on the pipe, so a hung child cannot hang us)."""
    import select

    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not readable:
        raise TimeoutError
    return process.stdout.readline()


def _drops(text: str) -> int:
    return sum(int(n) for n in re.findall(r"dropped (\d+)", text))


def _udp_receive_buffer_errors(snmp: str) -> int:
    """RcvbufErrors from /proc/net/snmp's two "Udp:" lines (names, then values)."""
    lines = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:")]
    if len(lines) < 2:
        return 0
    return int(dict(zip(lines[0], lines[1], strict=False)).get("RcvbufErrors", 0))
