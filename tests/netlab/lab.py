"""A NAT lab in network namespaces: a "public" bridge with coturn, home networks behind NAT routers.

Topology (shared/notes/webrtc-field-notes.md, "NAT lab recipe")::

    home-a (10.0.1.2) -- nat-a (10.0.1.1 | wan 203.0.113.11) --+
                                                              br0 in pub (203.0.113.1, coturn)
    home-b (10.0.2.2) -- nat-b (10.0.2.1 | wan 203.0.113.12) --+

Every interface is created inside the namespaces (``ip link add ... netns``), so nothing is added to the
host's own namespace and nothing in the lab can reach the host's interfaces: traffic stays on the
documentation ranges inside namespaces this run made. Namespace names carry the creating process id and a
random tag (``hwlab-<pid>-<tag>-<role>``), so runs never collide and :func:`sweep_stale` can remove what a
crashed run left behind without touching a live run's lab.
"""

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from hivewire_server.turn import ice_servers

logger = logging.getLogger(__name__)

PREFIX = "hwlab-"
PUB_NET = "203.0.113"  # TEST-NET-3: the lab's "internet"
PUB_IP = f"{PUB_NET}.1"  # coturn listens and relays here
# coturn opens its alternate port (RFC 5780) only with a second listening address; the NAT mapping check
# needs that second port.
PUB_ALT_IP = f"{PUB_NET}.2"
TURN_PORT = 3478
TURN_ALT_PORT = 3479
TURN_REALM = "hivewire.test"
COMMAND_TIMEOUT_S = 20.0  # one ip/iptables/sysctl command; they take milliseconds unless the box is stuck
TURN_START_TIMEOUT_S = 15.0  # until coturn has bound its UDP listeners
STOP_TIMEOUT_S = 5.0  # a lab process gets this long to exit on SIGTERM before SIGKILL
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


class NatKind(StrEnum):
    """How a home's router translates: the behaviours ICE has to cope with."""

    CONE = "cone"  # MASQUERADE keeps the source port: endpoint-independent mapping, hole punching works
    SYMMETRIC = "symmetric"  # --random-fully: a new port per destination, only a TURN relay gets through
    UDP_BLOCKED = "udp-blocked"  # cone NAT that forwards no UDP at all: neither STUN, TURN/UDP nor ICE


class LabError(RuntimeError):
    """A lab command failed; the message names the command, its namespace and what it printed."""


@dataclass(frozen=True)
class Home:
    """One home network: a host namespace behind its own NAT router namespace."""

    label: str
    nat: NatKind
    ns: str  # where the peer runs
    router_ns: str
    lan_ip: str  # the peer's own address (its host candidate)
    wan_ip: str  # the router's public address (the peer's server-reflexive address)


@dataclass(frozen=True)
class Turn:
    """coturn running in pub with the shared-secret scheme the Hivewire server hands out credentials for."""

    secret: str
    log_path: Path

    @property
    def stun_url(self) -> str:
        return f"stun:{PUB_IP}:{TURN_PORT}"

    @property
    def turn_url(self) -> str:
        return f"turn:{PUB_IP}:{TURN_PORT}?transport=udp"

    def ice_servers(self, user_id: int, *, valid_s: int = 3600) -> list[dict[str, Any]]:
        """The ICE server list exactly as the Hivewire server builds it, credentials from its TURN secret."""
        return ice_servers(
            stun_urls=[self.stun_url],
            turn_urls=[self.turn_url],
            secret=self.secret,
            user_id=user_id,
            expires_at_unix=int(time.time()) + valid_s,
        )


def netlab_unavailable() -> str | None:
    """Why this machine cannot build the lab, or None when it can (tests skip with this reason)."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns, iptables); run the netlab tests as root, as CI does"
    for tool, package in (("ip", "iproute2"), ("iptables-restore", "iptables"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return f"{tool} not found: install Debian's {package} (scripts/setup.sh --test)"
    probe = f"{PREFIX}probe-{os.getpid()}-{secrets.token_hex(2)}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if created.returncode != 0:
        return f"ip netns add failed (no CAP_SYS_ADMIN in this container?): {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def run(argv: Sequence[str], *, ns: str | None = None, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run one command (inside ``ns`` when given); LabError with its output when it fails."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    try:
        done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(full)}: no exit after {COMMAND_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(full)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list`` prints 'name (id: N)')."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a crashed or killed run); return their names."""
    removed = []
    for name in list_namespaces():
        match = _NAME.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        _delete_namespace(name)
        removed.append(name)
    if removed:
        logger.warning("removed %d namespace(s) left by earlier lab runs: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # PermissionError too: the process exists


def _delete_namespace(name: str) -> None:
    """Stop what still runs in a lab namespace (only lab processes run there), then delete it.

    Deleting the namespace deletes its veth ends, and with them their peers in the other namespaces.
    """
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        logger.error("could not delete namespace %s: %s", name, done.stderr.strip())


class Lab:
    """Builds the lab on entry and removes every namespace (and so every veth) it made on exit."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.pub = f"{self.tag}-pub"
        self.homes: dict[str, Home] = {}
        self.turn: Turn | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))  # logs, signaling files, coturn pidfile
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "Lab":
        try:
            self._add_namespace(self.pub)
            self._ip(
                self.pub,
                "link add br0 type bridge",
                "link set br0 up",
                f"addr add {PUB_IP}/24 dev br0",
                f"addr add {PUB_ALT_IP}/24 dev br0",
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_home(self, label: str, nat: NatKind) -> Home:
        """Add a home namespace behind a new NAT router of the given kind; label is one short word."""
        index = len(self.homes) + 1
        home = Home(
            label=label,
            nat=nat,
            ns=f"{self.tag}-home-{label}",
            router_ns=f"{self.tag}-nat-{label}",
            lan_ip=f"10.0.{index}.2",
            wan_ip=f"{PUB_NET}.{10 + index}",
        )
        self._add_namespace(home.router_ns)
        self._add_namespace(home.ns)
        bridge_port = f"wan-{index}"
        self._ip(
            home.router_ns,
            f"link add wan type veth peer name {bridge_port} netns {self.pub}",
            f"link add lan type veth peer name eth0 netns {home.ns}",
            f"addr add {home.wan_ip}/24 dev wan",
            f"addr add 10.0.{index}.1/24 dev lan",
            "link set wan up",
            "link set lan up",
        )
        self._ip(self.pub, f"link set {bridge_port} master br0", f"link set {bridge_port} up")
        self._ip(
            home.ns,
            f"addr add {home.lan_ip}/24 dev eth0",
            "link set eth0 up",
            f"route add default via 10.0.{index}.1",
        )
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=home.router_ns)
        run(["iptables-restore"], ns=home.router_ns, stdin=_router_rules(nat))
        self.homes[label] = home
        logger.info("home %s: %s behind %s NAT %s (wan %s)", label, home.lan_ip, nat, home.router_ns, home.wan_ip)
        return home

    def start_turn(self, secret: str) -> Turn:
        """Start coturn in pub (UDP listeners on TURN_PORT and TURN_ALT_PORT) and wait until it is bound."""
        log_path = self.workdir / "turnserver.log"
        argv = [
            "turnserver",
            "-n",  # no configuration file: everything is on this command line
            f"--listening-ip={PUB_IP}",
            f"--listening-ip={PUB_ALT_IP}",
            f"--relay-ip={PUB_IP}",
            f"--listening-port={TURN_PORT}",
            f"--alt-listening-port={TURN_ALT_PORT}",
            "--min-port=49152",
            "--max-port=49999",
            "--use-auth-secret",
            f"--static-auth-secret={secret}",
            f"--realm={TURN_REALM}",
            "--fingerprint",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            f"--pidfile={self.workdir / 'turnserver.pid'}",
            f"--log-file={log_path}",
            "--simple-log",
        ]
        self.popen(self.pub, argv, log_path.with_suffix(".out"))
        self.turn = Turn(secret=secret, log_path=log_path)
        wait_for(
            lambda: _udp_ports_bound(self.pub) >= {TURN_PORT, TURN_ALT_PORT},
            TURN_START_TIMEOUT_S,
            f"coturn bound to UDP {PUB_IP}:{TURN_PORT} and :{TURN_ALT_PORT} (log: {log_path})",
        )
        logger.info("coturn listening on %s:%d and :%d in %s", PUB_IP, TURN_PORT, TURN_ALT_PORT, self.pub)
        return self.turn

    def popen(self, ns: str, argv: Sequence[str], output: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a process in ``ns`` with stdout and stderr to ``output``; the lab kills it on close."""
        with output.open("wb") as sink:
            process = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdout=sink, stderr=subprocess.STDOUT, cwd=cwd
            )
        self._processes.append(process)
        return process

    def conntrack(self, home: Home) -> str:
        """The router's UDP conntrack table: which mappings the NAT made (for failure messages)."""
        if shutil.which("conntrack") is None:
            return "(conntrack not installed)"
        try:
            return run(["conntrack", "-L", "-p", "udp"], ns=home.router_ns)
        except LabError as exc:
            return str(exc)

    def close(self) -> None:
        """Kill the lab's processes and delete its namespaces; safe to call twice and after a failed build."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM for %s s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        self._processes.clear()
        for name in reversed(self._namespaces):
            _delete_namespace(name)
        self._namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _add_namespace(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        # The veths would otherwise get IPv6 link-local addresses that aioice offers as candidates.
        run(
            [
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            ns=name,
        )
        self._ip(name, "link set lo up")

    def _ip(self, ns: str, *commands: str) -> None:
        """Run ip commands in ``ns`` in one batch (one process instead of one per command)."""
        run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def _router_rules(nat: NatKind) -> str:
    """iptables-restore input for a NAT router of the given kind.

    The INPUT/FORWARD pairs are what make hole punching behave (notes): without dropping unsolicited
    packets on wan, conntrack records the peer's early check, MASQUERADE picks a new port for our own
    packets, and a cone NAT turns symmetric.
    """
    masquerade = "-A POSTROUTING -o wan -j MASQUERADE" + (" --random-fully" if nat is NatKind.SYMMETRIC else "")
    block_udp = ["-A FORWARD -p udp -j DROP"] if nat is NatKind.UDP_BLOCKED else []
    return "\n".join(
        [
            "*nat",
            masquerade,
            "COMMIT",
            "*filter",
            *block_udp,
            "-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A INPUT -i wan -j DROP",
            "-A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A FORWARD -i wan -j DROP",
            "COMMIT",
            "",
        ]
    )


def _udp_ports_bound(ns: str) -> set[int]:
    """Local UDP ports with a listening socket in ``ns`` (from ss)."""
    ports = set()
    for line in run(["ss", "-H", "-u", "-l", "-n"], ns=ns).splitlines():
        fields = line.split()
        if len(fields) >= 4 and ":" in fields[3]:
            ports.add(int(fields[3].rsplit(":", 1)[1]))
    return ports


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, *, interval_s: float = 0.05) -> None:
    """Poll ``condition`` until it holds; LabError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
