"""The rows of one forward step: which KV slot and position each row has, which rows return logits.

A step's hidden states (T, hidden) are runs of rows, one run per sequence: run i has counts[i]
rows at positions starts[i].., cached in KV slot slots[i], and its last outputs[i] rows return
logits (1 for a decode row or a prompt's last chunk, 0 for an earlier chunk, all of them for a
speculative check). Every slot is a KV region of its own on every rank: a row attends to its own
slot's keys at positions up to its own (so a run is causal inside) and never to another slot's.
The same step costs the same two allreduces per layer whatever its number of rows.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tpi.errors import ShapeError


@dataclass(frozen=True)
class Rows:
    """Runs of rows (one per sequence) as (slot, first position, count, trailing rows with logits)."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    outputs: tuple[int, ...]
    exact: bool = False  # verify runs computed as their one-row decode steps would, bit for bit (exact_runs)

    def __post_init__(self) -> None:
        n = len(self.slots)
        if not (n and len(self.starts) == len(self.counts) == len(self.outputs) == n):
            raise ShapeError(f"a step needs one slot, start, count and output count per sequence, got "
                             f"{len(self.slots)}, {len(self.starts)}, {len(self.counts)}, {len(self.outputs)}")
        if len(set(self.slots)) != n:
            raise ShapeError(f"a step lists a KV slot twice ({list(self.slots)}); give each sequence one run")
        for slot, start, count, out in zip(self.slots, self.starts, self.counts, self.outputs):
            if min(slot, start) < 0 or count < 1 or not 0 <= out <= count:
                raise ShapeError(f"sequence in slot {slot}: {count} rows from position {start} with {out} "
                                 "logits rows; counts must be >= 1 and logits rows 0..count")

    @classmethod
    def sequence(cls, start: int, count: int, all_logits: bool = False, slot: int = 0, exact: bool = False) -> "Rows":
        """One sequence's rows: the last one's logits, or every row's."""
        return cls((int(slot),), (int(start),), (int(count),), (int(count) if all_logits else 1,), exact)

    @classmethod
    def of_runs(cls, slots, starts, counts, all_logits: bool = False, exact: bool = False) -> "Rows":
        """A step's runs (a protocol Step's slots, starts, counts): each run's last row's logits, or every row's."""
        counts = tuple(int(c) for c in counts)
        return cls(tuple(int(s) for s in slots), tuple(int(s) for s in starts), counts,
                   counts if all_logits else (1,) * len(counts), exact)

    @cached_property
    def exact_runs(self) -> tuple[bool, ...]:
        """Per run, whether an exact step computes its rows as one-row decode steps: the runs whose every
        row returns logits (a verify run of k+1 rows, a decode row). A prompt chunk stays a batched
        prefill, as its lone run computes it, and keeps the step from splitting its attention per row."""
        return tuple(self.exact and o == c for o, c in zip(self.outputs, self.counts))

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def n_outputs(self) -> int:
        return sum(self.outputs)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(s + c for s, c in zip(self.starts, self.counts))

    @cached_property
    def positions(self) -> np.ndarray:
        """int32 [T]: each row's position in its slot."""
        return np.concatenate([np.arange(s, s + c, dtype=np.int32) for s, c in zip(self.starts, self.counts)])

    @cached_property
    def row_slots(self) -> np.ndarray:
        """int32 [T]: each row's KV slot."""
        return np.repeat(np.asarray(self.slots, dtype=np.int32), self.counts)

    @cached_property
    def first_rows(self) -> tuple[int, ...]:
        """Index of each run's first row in the step."""
        return tuple(int(v) for v in np.cumsum((0,) + self.counts[:-1]))

    @cached_property
    def output_rows(self) -> np.ndarray:
        """int32 [n_outputs]: the rows whose logits the step returns, in order."""
        ends = np.cumsum(self.counts)
        return np.concatenate([np.arange(e - o, e, dtype=np.int32) for e, o in zip(ends, self.outputs)])

    def check(self, slots: int, context: int) -> None:
        """ShapeError unless every slot exists and every position fits the context."""
        for slot, start, end in zip(self.slots, self.starts, self.ends):
            if slot >= slots:
                raise ShapeError(f"KV slot {slot} does not exist: this group runs {slots} slot(s) "
                                 "(tpi serve --parallel)")
            if end > context:
                raise ShapeError(f"positions {start}..{end - 1} are outside the KV cache of {context}; "
                                 "raise --context or start a new conversation")


def as_rows(rows: "Rows | int", tokens: int, all_logits: bool = False) -> Rows:
    """A step's Rows from Rows, or from the start position of one sequence in slot 0."""
    if isinstance(rows, Rows):
        if rows.tokens != tokens:
            raise ShapeError(f"the step lists {rows.tokens} rows but carries {tokens} hidden states")
        return rows
    return Rows.sequence(int(rows), tokens, all_logits)


class KVSlots:
    """How many leading positions of each KV slot hold computed keys/values (the same on every rank).

    A step may extend a slot or rewrite its tail, never leave a hole: a row at position p needs
    positions 0..p-1 of its slot computed (or in the same run). Truncating keeps positions < keep.
    """

    def __init__(self, slots: int, context: int):
        if slots < 1:
            raise ShapeError(f"{slots} KV slots; a model needs at least 1")
        self.context = context
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def admit(self, rows: Rows) -> None:
        """ShapeError unless the step fits: slots exist, positions in the context, no hole."""
        rows.check(self.slots, self.context)
        for slot, start in zip(rows.slots, rows.starts):
            if start > self.lengths[slot]:
                raise ShapeError(f"KV slot {slot} holds {self.lengths[slot]} positions; a step cannot start at "
                                 f"{start} (it would attend to positions never computed)")

    def advance(self, rows: Rows) -> None:
        """Record a computed step: each slot now ends where its run ends (a rewritten tail is dropped)."""
        for slot, end in zip(rows.slots, rows.ends):
            self.lengths[slot] = end

    def truncate(self, slot: int, keep: int) -> None:
        """Forget positions keep.. of a slot (keep 0: the slot is free)."""
        if not 0 <= slot < self.slots or keep < 0:
            raise ShapeError(f"cannot truncate KV slot {slot} to {keep} positions: this group runs "
                             f"{self.slots} slot(s)")
        self.lengths[slot] = min(self.lengths[slot], keep)


def slots_refusal(error: Exception, plan: Callable[[int], object], slots: int) -> Exception:
    """The error to raise when `slots` KV caches do not fit: error itself, extended with the largest
    number of slots that does fit (plan(n) plans with n slots, raising an error of error's type when
    they do not fit), or saying that not even one does."""
    if slots <= 1:
        return error
    for n in range(slots - 1, 0, -1):
        try:
            plan(n)
        except type(error):
            continue
        else:
            # the fix first: the memory figures after it are for the N asked for, and suggest other fixes
            return type(error)(f"{slots} KV caches (--parallel {slots}) do not fit: the most that fit are {n}, "
                               f"use --parallel {n} (with {slots}: {error})")
    return type(error)(f"not even one KV cache fits (--parallel 1): {error}")


MADV_NOHUGEPAGE = 15  # linux/mman.h
PAGE = 4096


def kv_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros for a KV cache whose pages become resident only as positions are written.

    numpy asks Linux for transparent huge pages on arrays of 4 MiB and more; a KV cache of several
    slots is that large, and one written row would then make a whole 2 MiB page resident in every
    layer's cache (measured: +120 MiB for a slot's first 30 positions of SmolLM2 at context 4096).
    """
    a = np.zeros(shape, dtype)
    if sys.platform.startswith("linux") and a.nbytes >= 2 * PAGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            start = a.ctypes.data // PAGE * PAGE
            libc.madvise(start, a.ctypes.data + a.nbytes - start, MADV_NOHUGEPAGE)  # best effort: only RSS differs
        except (OSError, AttributeError):
            pass
    return a
