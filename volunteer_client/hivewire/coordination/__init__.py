"""Coordination of a run: signed progress gossip, the global epoch view, and group formation for rounds."""

from hivewire.coordination.errors import CoordinationError, RecordRefused, RoundAbandoned
from hivewire.coordination.grouping import form_groups, group_of
from hivewire.coordination.matchmaking import Group, Matchmaker, MatchmakingSettings, part_weights
from hivewire.coordination.progress import (
    GlobalProgress,
    ProgressSettings,
    ProgressStats,
    ProgressTracker,
    announce_interval_s,
    estimate_global_progress,
)
from hivewire.coordination.records import (
    COORDINATION_SCHEMAS,
    Farewell,
    Progress,
    ProgressVerifier,
    round_id,
    sign_farewell,
    sign_progress,
)
from hivewire.coordination.transport import GossipTransport, RecordHandler, measured_throughput

__all__ = [
    "COORDINATION_SCHEMAS",
    "CoordinationError",
    "Farewell",
    "GlobalProgress",
    "GossipTransport",
    "Group",
    "Matchmaker",
    "MatchmakingSettings",
    "Progress",
    "ProgressSettings",
    "ProgressStats",
    "ProgressTracker",
    "ProgressVerifier",
    "RecordHandler",
    "RecordRefused",
    "RoundAbandoned",
    "announce_interval_s",
    "estimate_global_progress",
    "form_groups",
    "group_of",
    "measured_throughput",
    "part_weights",
    "round_id",
    "sign_farewell",
    "sign_progress",
]
