"""A one-way delay line for forwarded packets, run inside the WAN lab's router namespace (bench/_wan.py).

This kernel has no ``sch_netem`` (and no ``fq``, so no BPF departure times either), so the propagation
delay of the emulated WAN is made in user space: iptables sends every forwarded packet to NFQUEUE, this
process notes when each one arrived (metadata only: the packet bytes stay in the kernel) and accepts it
``--delay-ms`` later. Packets leave in arrival order, so one batch verdict ("accept every id up to N")
releases all that are due at once. GSO packets are queued whole (``NFQA_CFG_F_GSO``), so a TCP burst of
64 KiB costs one message, not 45. Rates are shaped by the kernel's tbf qdiscs, not here.

Speaks nfnetlink_queue directly over a netlink socket (no library is needed for the handful of messages:
bind, parameters, packet, batch verdict). Prints ``ready`` once bound; stops on SIGTERM or SIGINT and
prints how many packets it delayed. Usage (as root, in the namespace):
``python bench/_delay.py --delay-ms 20 [--queue 0]``.
"""

import argparse
import collections
import errno
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 1 << 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NFGEN_HEADER = struct.Struct("!BBH")  # family, version, resource id (the queue number, big-endian)
NLATTR = struct.Struct("=HH")
QUEUE_MAXLEN = 65_536  # packets held at once; at 4 x 100 Mbit/s and 20 ms a few thousand at most
SOCKET_BUFFER_BYTES = 32 * 2**20  # netlink notifications queued for us before the kernel drops (ENOBUFS)
RECV_BYTES = 65_536  # one notification carries metadata only: a few hundred bytes


def _attr(kind: int, data: bytes) -> bytes:
    body = NLATTR.pack(NLATTR.size + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int, seq: int) -> bytes:
    payload = NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + payload


class DelayLine:
    """One bound nfnetlink queue whose packets are each accepted ``delay_s`` after they arrived."""

    def __init__(self, queue: int, delay_s: float) -> None:
        self.queue = queue
        self.delay_s = delay_s
        self.delayed = 0
        self.late_s = 0.0  # summed over packets: how much later than due each was accepted
        self.max_late_s = 0.0
        self.overruns = 0  # times the socket buffer overflowed (ENOBUFS)
        self._seq = 0
        self._pending: collections.deque[tuple[float, int]] = collections.deque()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER_BYTES)
        self.sock.bind((0, 0))
        self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
        self._configure(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
        )
        self.sock.setblocking(False)

    def _configure(self, attrs: bytes) -> None:
        """Send one config message and wait for the kernel's acknowledgement (an error message with code 0)."""
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, self._seq))
        reply = self.sock.recv(RECV_BYTES)
        _, kind, _, _, _ = NLMSG_HEADER.unpack_from(reply)
        code = struct.unpack_from("=i", reply, NLMSG_HEADER.size)[0] if kind == NLMSG_ERROR else -errno.EPROTO
        if code != 0:
            raise OSError(-code, f"nfqueue {self.queue} configuration refused: {errno.errorcode.get(-code, code)}")

    def _receive(self) -> None:
        """Note every queued packet's id and arrival time until the socket has nothing more."""
        now = time.monotonic()
        while True:
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped notifications: those packets stay queued, and the next batch verdict
                # (every id up to N) releases them with the others, a little late.
                self.overruns += 1
                continue
            offset = 0
            while offset + NLMSG_HEADER.size <= len(data):
                length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
                if length < NLMSG_HEADER.size:
                    return
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    self._packet(data[offset + NLMSG_HEADER.size + NFGEN_HEADER.size : offset + length], now)
                offset += (length + 3) & ~3

    def _packet(self, attrs: bytes, now: float) -> None:
        position = 0
        while position + NLATTR.size <= len(attrs):
            length, kind = NLATTR.unpack_from(attrs, position)
            if length < NLATTR.size:
                return
            if kind & 0x7FFF == NFQA_PACKET_HDR:
                (packet_id,) = struct.unpack_from("!I", attrs, position + NLATTR.size)
                self._pending.append((now + self.delay_s, packet_id))
                return
            position += (length + 3) & ~3

    def _release(self) -> float | None:
        """Accept every packet now due in one batch verdict; return seconds until the next is due."""
        now = time.monotonic()
        last = None
        while self._pending and self._pending[0][0] <= now:
            due, last = self._pending.popleft()
            self.delayed += 1
            self.late_s += now - due
            self.max_late_s = max(self.max_late_s, now - due)
        if last is not None:
            self._seq += 1
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.queue, verdict, NLM_F_REQUEST, self._seq))
        return self._pending[0][0] - now if self._pending else None

    def serve(self, stop: list[bool]) -> None:
        """Delay packets until ``stop[0]`` is set (by a signal handler)."""
        while not stop[0]:
            wait = self._release()
            try:
                readable, _, _ = select.select([self.sock], [], [], 0.5 if wait is None else max(wait, 0.0))
            except InterruptedError:
                continue
            if readable:
                self._receive()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every packet")
    parser.add_argument("--queue", type=int, default=0, help="the NFQUEUE number iptables sends packets to")
    args = parser.parse_args()
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    line = DelayLine(args.queue, args.delay_ms / 1000)
    print("ready", flush=True)
    line.serve(stop)
    mean_late_ms = 1000 * line.late_s / max(line.delayed, 1)
    print(
        f"delay line: {line.delayed} packets delayed {args.delay_ms:g} ms, released late by "
        f"{mean_late_ms:.2f} ms on average, {1000 * line.max_late_s:.1f} ms at most; "
        f"{time.process_time():.1f} s of CPU, {line.overruns} notification overruns",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
