"""The Communicator: what the model and the master's engine see of the group (no sockets here).

The model calls `allreduce` (sum of every rank's partial) and `gather` (every rank's logits slice);
rank 0's engine also starts steps on the workers and ends them. Implementations: `NullCommunicator`
(a group of one), tpi.transport.allreduce.StarMaster (rank 0) and star_worker.StarWorker (ranks > 0), and
tpi.master.recovery.UnavailableCommunicator (a group that is recovering).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class CommStats:
    """Counters since creation."""

    allreduce_count: int = 0
    allreduce_seconds: float = 0.0
    gather_count: int = 0
    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Communicator(Protocol):
    """What a rank's forward pass needs of the group."""

    rank: int
    world: int
    stats: CommStats

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """The sum of x over every rank (float32, identical bits on every rank)."""

    def gather(self, x: np.ndarray) -> list[np.ndarray] | None:
        """Every rank's x in rank order on rank 0; None on the others."""


class MasterCommunicator(Communicator, Protocol):
    """Rank 0's side: it starts each step on the workers, and ends or rolls back what they hold."""

    def broadcast_step(self, step) -> None:
        """Send a tpi.transport.protocol.Step (its hidden states included) to every worker."""

    def broadcast_truncate(self, slot: int, keep: int) -> None:
        """Tell every reachable worker to forget positions keep.. of a KV slot (and leave a step in flight)."""

    def broadcast_stop(self, reason: str, rejoin: bool = False) -> None:
        """Tell every reachable worker to leave its step loop (and to join again, with rejoin)."""


class NullCommunicator:
    """A group of one: allreduce is the identity, gather returns the only slice, broadcasts go nowhere."""

    rank, world = 0, 1
    wire_dtype = "f32"
    seq = 0

    def __init__(self) -> None:
        self.stats = CommStats()

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def gather(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]

    def broadcast_step(self, step) -> None:
        self.stats.steps += 1

    def broadcast_truncate(self, slot: int, keep: int) -> None:
        pass

    def broadcast_stop(self, reason: str, rejoin: bool = False) -> None:
        pass
