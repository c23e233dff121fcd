"""Optimizer strategies, the local side: what a peer does before and after the group averages.

The averaging itself is injected (`average(tensors, weight) -> tensors`, sync or async; diloco's overlap takes
`start(tensors, weight) -> Pending`), so these classes know nothing of the network; `state_dict()` and
`load_state_dict()` are what a late joiner downloads.
"""

from hivewire.optim.dedloc import Dedloc, DedlocConfig
from hivewire.optim.diloco import Diloco, DilocoConfig
from hivewire.optim.errors import AveragedTensorsRejected, StateRejected, StrategyError
from hivewire.optim.state import parameter_hash, state_hash
from hivewire.optim.strategy import AverageFn, Pending, StartFn, Strategy

__all__ = [
    "AverageFn",
    "AveragedTensorsRejected",
    "Dedloc",
    "DedlocConfig",
    "Diloco",
    "DilocoConfig",
    "Pending",
    "StartFn",
    "StateRejected",
    "Strategy",
    "StrategyError",
    "parameter_hash",
    "state_hash",
]
