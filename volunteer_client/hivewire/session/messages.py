"""What the trainer and the network process tell each other over their Pipe: small, picklable records.

Tensors never ride the Pipe: the flat buffer a round averages lives in shared memory (`share_memory_()`),
so a message only says "average the buffer for epoch e with weight w" and "done". The only large message
is a state snapshot (a late joiner's download, a few MB), sent once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NetworkConfig:
    """Everything the network process needs, resolved by the CLI (it reads no environment or file itself)."""

    server: str  # coordinator base URL, for the certificate keys (JWKS)
    run: str  # run slug
    key_path: Path  # this machine's Ed25519 peer key (already created by the join)
    certificate: str  # our peer certificate (JWT) from the join
    signaling_url: str
    ice_servers: list[dict[str, Any]]  # from the join answer; [] means host candidates only
    initial_peers: list[str]
    target_batch_size: int  # samples per epoch, the whole run together
    group_size: int
    compression: str  # none, fp16, int8
    host_addresses: tuple[str, ...] | None = None  # restrict ICE host candidates to these (None: all)
    sctp_tuning: bool = True  # mesh/tuning.py's faster SCTP (off: aiortc as shipped; HIVEWIRE_SCTP_TUNING=off too)
    direct_path: bool = True  # try a direct TLS connection for bulk payloads (mesh/direct.py)
    startup_wait_s: float = 20.0  # a joiner with initial peers waits this long to hear their progress
    view_interval_s: float = 0.2  # the trainer gets a fresh view of the run this often
    log_level: int = 30  # logging.WARNING


# ------------------------------------------------------------------ trainer -> network


@dataclass(frozen=True)
class Report:
    """Our progress as of now: gossiped to the run."""

    epoch: int
    samples_accumulated: int
    samples_per_second: float
    param_hash: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Our state at the start of ``epoch`` (torch.save bytes), served to late joiners."""

    epoch: int
    blob: bytes
    param_hash: str


@dataclass(frozen=True)
class Average:
    """Average the shared buffer with the group of ``epoch``; our part weighs ``weight`` samples."""

    epoch: int
    weight: float


@dataclass(frozen=True)
class Renewed:
    """The trainer renewed our certificate: sign offers, progress and receipts with this one from now on."""

    certificate: str  # the JWT, verified by the trainer for our key and run


@dataclass(frozen=True)
class Leave:
    """Abandon any round, close the mesh, say goodbye, exit."""


# ------------------------------------------------------------------ network -> trainer


@dataclass(frozen=True)
class View:
    """The run as the network process sees it now, for the trainer's decisions and its progress line."""

    epoch: int  # the run's epoch (most peers)
    ready: bool  # the run reached the target batch of ``epoch``
    estimated_samples: float
    target_batch_size: int
    samples_per_second: float  # of every peer at ``epoch``
    num_peers: int  # live peers, ourselves included
    links: dict[str, int] = field(default_factory=dict)  # link kind (host, reflexive, relay, direct) -> count
    link_rates: tuple[tuple[str, float], ...] = ()  # per neighbour: (kind, measured bytes/s; 0 = not yet)


@dataclass(frozen=True)
class Started:
    """Training may begin: from ``state`` (downloaded from a neighbour) or, when None, from the seed."""

    state: StateBlob | None


@dataclass(frozen=True)
class StateBlob:
    """A run state downloaded from ``donor``: SHA-256 checked against its offer, hash against its gossip."""

    epoch: int
    blob: bytes
    donor: str
    param_hash: str | None  # what the donor gossiped for this epoch; the trainer checks the loaded model


@dataclass(frozen=True)
class Averaged:
    """The round of ``epoch`` finished; the buffer holds the result (our own values where ``ok`` is False)."""

    epoch: int
    ok: bool
    members: tuple[str, ...]
    excluded: dict[str, str]  # member -> why
    averaged_fraction: float
    detail: str = ""
    round_id: str = ""  # the round's receipt id (session/receipts.py), "" when no round ran
    weight: float = 0.0  # the samples we averaged with; our own line of the round's receipt
    bytes_sent: int = 0  # what this member sent in the round (after compression)


@dataclass(frozen=True)
class Receipt:
    """A round receipt every member signed, ready for `POST /api/runs/{run}/receipts` (protocol.md)."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """The network side cannot go on (no signaling, bad certificate); the trainer stops with this reason."""

    reason: str
    advice: str


@dataclass(frozen=True)
class Left:
    """The network side closed the mesh and is exiting."""
