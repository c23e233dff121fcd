"""Averaging inside a group: throughput-proportional partition, compression, fault-tolerant butterfly all-reduce."""

from hivewire.averaging.butterfly import (
    ButterflySettings,
    Cause,
    Exclusion,
    RoundReport,
    butterfly_allreduce,
)
from hivewire.averaging.compression import (
    BlockwiseInt8Compression,
    Codec,
    Float16Compression,
    NoCompression,
    get_codec,
)
from hivewire.averaging.errors import AveragingError, PartRejected, PeerUnreachable
from hivewire.averaging.partition import Partition, plan_partition
from hivewire.averaging.transport import GroupTransport, InProcessHub, InProcessTransport, LinkGroupTransport

__all__ = [
    "AveragingError",
    "BlockwiseInt8Compression",
    "ButterflySettings",
    "Cause",
    "Codec",
    "Exclusion",
    "Float16Compression",
    "GroupTransport",
    "InProcessHub",
    "InProcessTransport",
    "LinkGroupTransport",
    "NoCompression",
    "PartRejected",
    "Partition",
    "PeerUnreachable",
    "RoundReport",
    "butterfly_allreduce",
    "get_codec",
    "plan_partition",
]
