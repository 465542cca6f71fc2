"""Packing encoded conversations into fixed-length rows for supervised fine-tuning (`train.sft`).

Several conversations share a row and attention never crosses between them (segment ids; positions restart per
conversation); the loss falls only on the tokens `chat_format.encode_dialog` marks as trained. Batch k of an epoch
is a pure function of (seed, epoch, k), so a resumed run reads the same rows.
"""
from __future__ import annotations

import bisect
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from llama_jax.chat_format import EncodedDialog, Message, read_conversations
from llama_jax.data import PathLike, resolve_sources
from llama_jax.errors import DataError


def read_chat_sources(sources: PathLike | Sequence[PathLike]) -> Iterator[list[Message]]:
    """The conversations of a chat JSONL file, or of every *.jsonl file under a folder or matching a glob (sorted),
    in order; errors name the file and line."""
    for path in resolve_sources(sources, suffixes=(".jsonl",)):
        yield from read_conversations(path)

# ---------------------------------------------------------------------------------------------------------------
# Packing encoded conversations into fixed-length rows for supervised fine-tuning
#
# A conversation of n tokens fills n - 1 slots (input tokens[i], target tokens[i + 1]); several conversations
# share a row, none is split across rows. One longer than seq_len + 1 tokens is truncated to its first
# seq_len + 1 tokens with a warning (so it fills a row alone), and dropped, also with a warning, if what is left
# has no trained target (e.g. a long system prompt that leaves no room for an answer).


@dataclass(frozen=True)
class PackedRows:
    """[rows, seq_len] arrays. Padding: token/target pad_id, loss_mask False, segment 0, position 0."""

    tokens: np.ndarray  # int32 inputs
    targets: np.ndarray  # int32, the next token of the same conversation
    loss_mask: np.ndarray  # bool, True where the target is a trained assistant token
    segment_ids: np.ndarray  # int32, 1, 2, ... per conversation within a row; attention must not cross them
    positions: np.ndarray  # int32, restarting at 0 for each conversation (RoPE positions)


def pack_dialogs(dialogs: Sequence[EncodedDialog], seq_len: int, pad_id: int) -> PackedRows:
    """Pack conversations in the given order into rows (next-fit: a new row when the next one does not fit)."""
    slot_counts = packable_slot_counts(dialogs, seq_len)
    rows = plan_rows(slot_counts, range(len(dialogs)), seq_len)
    return fill_rows(dialogs, slot_counts, rows, seq_len, pad_id)


def packable_slot_counts(dialogs: Sequence[EncodedDialog], seq_len: int) -> np.ndarray:
    """Slots each conversation fills (n - 1, capped at seq_len); 0 for one that is dropped. Warns about both."""
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    counts = np.zeros(len(dialogs), dtype=np.int64)
    truncated = dropped = 0
    for index, dialog in enumerate(dialogs):
        slots = min(len(dialog.tokens) - 1, seq_len)
        truncated += len(dialog.tokens) - 1 > seq_len
        if slots < 1 or not any(dialog.loss_mask[1 : slots + 1]):
            dropped += 1
            continue
        counts[index] = slots
    if truncated:
        warnings.warn(f"{truncated} of {len(dialogs)} conversations are longer than seq_len + 1 = {seq_len + 1} "
                      f"tokens and were truncated", stacklevel=3)
    if dropped:
        warnings.warn(f"{dropped} of {len(dialogs)} conversations have no trained target within seq_len + 1 = "
                      f"{seq_len + 1} tokens and were dropped", stacklevel=3)
    if not counts.any():
        raise DataError(f"none of the {len(dialogs)} conversations has a trained target to pack")
    return counts


def plan_rows(
    slot_counts: Sequence[int] | np.ndarray, order: Sequence[int] | np.ndarray, seq_len: int
) -> list[list[int]]:
    """Conversation indices per row, visiting `order` and skipping those with 0 slots. Next-fit keeps the
    visiting order (so a shuffle stays a shuffle) and runs in linear time."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        slots = int(slot_counts[index])
        if slots == 0:
            continue
        if used + slots > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(index))
        used += slots
    if current:
        rows.append(current)
    return rows


def fill_rows(
    dialogs: Sequence[EncodedDialog], slot_counts: np.ndarray, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> PackedRows:
    """Materialise planned rows into arrays."""
    shape = (len(rows), seq_len)
    packed = PackedRows(
        tokens=np.full(shape, pad_id, dtype=np.int32),
        targets=np.full(shape, pad_id, dtype=np.int32),
        loss_mask=np.zeros(shape, dtype=bool),
        segment_ids=np.zeros(shape, dtype=np.int32),
        positions=np.zeros(shape, dtype=np.int32),
    )
    for row, indices in enumerate(rows):
        start = 0
        for segment, index in enumerate(indices, start=1):
            slots = int(slot_counts[index])
            tokens = np.asarray(dialogs[index].tokens[: slots + 1], dtype=np.int32)
            span = slice(start, start + slots)
            packed.tokens[row, span] = tokens[:-1]
            packed.targets[row, span] = tokens[1:]
            packed.loss_mask[row, span] = dialogs[index].loss_mask[1 : slots + 1]
            packed.segment_ids[row, span] = segment
            packed.positions[row, span] = np.arange(slots)
            start += slots
    return packed


@dataclass
class PackedSFTBatches:
    """Batches of packed rows where batch(step) is a pure function of (dialogs, seed, step).

    Each epoch visits the conversations in a permutation drawn from np.random.default_rng((seed, epoch)) and
    packs them next-fit; the epochs' rows are concatenated and step k takes rows [k * batch_size, (k + 1) *
    batch_size), so a batch may straddle two epochs. Resuming needs only the step. The caches below only
    avoid recomputing epoch layouts; they never change a result.
    """

    dialogs: Sequence[EncodedDialog]
    seq_len: int
    batch_size: int
    pad_id: int
    seed: int
    _slot_counts: np.ndarray = field(init=False, repr=False)
    _epoch_starts: list[int] = field(init=False, repr=False)  # first global row of each epoch planned so far
    _recent_plans: dict[int, list[list[int]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        self._slot_counts = packable_slot_counts(self.dialogs, self.seq_len)
        self._epoch_starts = [0]
        self._recent_plans = {}

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> PackedRows:
        """This process's contiguous share of the global batch for `step`."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        if self.batch_size % process_count or not 0 <= process_index < process_count:
            raise DataError(f"cannot split batch_size {self.batch_size} over {process_count} processes "
                            f"(process_index {process_index})")
        share = self.batch_size // process_count
        first = step * self.batch_size + process_index * share
        rows = [self._row(global_row) for global_row in range(first, first + share)]
        return fill_rows(self.dialogs, self._slot_counts, rows, self.seq_len, self.pad_id)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Conversation indices per row in `epoch`."""
        if epoch not in self._recent_plans:
            if len(self._recent_plans) >= 2:  # a batch spans two epochs at most, unless an epoch is tiny
                del self._recent_plans[min(self._recent_plans)]
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dialogs))
            self._recent_plans[epoch] = plan_rows(self._slot_counts, order, self.seq_len)
        return self._recent_plans[epoch]

    def epoch_of_row(self, global_row: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of a global row index."""
        while self._epoch_starts[-1] <= global_row:
            planned_epochs = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_rows(planned_epochs)))
        epoch = bisect.bisect_right(self._epoch_starts, global_row) - 1
        return epoch, global_row - self._epoch_starts[epoch]

    def _row(self, global_row: int) -> list[int]:
        epoch, row = self.epoch_of_row(global_row)
        return self.epoch_rows(epoch)[row]
