"""Batched speculative decoding: several sequences, one target forward per step (engine.py is the
single-sequence loop; the notation is the same: p = target, q = draft, k = draft length).

Sequences in a batch accept different numbers of drafts (EQSPEC's ragged-tensor problem). Here
each sequence owns a row of one batch KV store (allocated once from the plan) with its own
length, as a vLLM request owns its slots: a rejection is that row's pointer move
(`num_computed_tokens -= rejected`), nothing is re-padded or realigned. A step packs every
row's new tokens into one forward (models/llama.LlamaModel.forward_rows): a prefill chunk for a
row that just took a slot, or its newest token and drafts for a row that is decoding; every
matmul covers all rows and each row attends over its own keys only.

Continuous pool (EXSPEC's idea, with per-row slots): when a sequence finishes, the next request
takes its row and prefills in the very next step, beside the rows still decoding.
"""

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from specmemo.budget.speedup import DEFAULT_MODEL_ALPHA, PairProfile, batch_draft_counts, step_cost
from specmemo.decoding.engine import DraftLength
from specmemo.decoding.events import GenerationStats, Step
from specmemo.decoding.sampling import SamplingConfig
from specmemo.decoding.step import settle, verify_chain
from specmemo.errors import BadInput
from specmemo.memory.kvstore import KVStore
from specmemo.memory.malloc import trim_heap


@dataclass(frozen=True)
class SequenceDone:
    """One request finished: its new tokens and stats (decode_seconds: from its first new token
    to its last, while it shared the batch; prefill_seconds: from taking a row to its first token)."""
    index: int
    tokens: list[int]
    stats: GenerationStats
    row: int                      # the batch row (KV slots) it ran in
    admitted_seconds: float       # from the start of the run until it took its row
    latency_seconds: float        # from the start of the run to this sequence's last token


@dataclass
class BatchStats:
    sequences: int = 0
    new_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    largest_forward: int = 0      # most tokens one packed forward ran

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class ForwardCost:
    """The batch's forward time as a function of its token count, measured while decoding: a
    least-squares line t(T) = a + b·T over the recent forwards (weights decay by `decay` per
    forward). A packed forward's cost grows with its rows' tokens far more gently than one
    sequence's cost curve does (one sequence: 8 tokens cost 2.9× one on the Zen 4 host in fp32;
    8 rows of one token, 2.2× one row's; 8 rows of two, 2.7×), so the pair's single-sequence
    curve only serves until the line is measured."""

    def __init__(self, curve: tuple[float, ...], decay: float = 0.97, warmup: int = 8):
        self.curve, self.decay, self.warmup = curve, decay, warmup
        self.n = self.sw = self.st = self.stt = self.sy = self.sty = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.n += 1
        self.sw, self.st, self.stt = d * self.sw + 1, d * self.st + tokens, d * self.stt + tokens * tokens
        self.sy, self.sty = d * self.sy + seconds, d * self.sty + tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b) once enough forwards of different widths were seen; None before."""
        var = self.sw * self.stt - self.st ** 2
        if self.n < self.warmup or var <= 1e-9 * self.sw * self.stt:
            return None
        b = (self.sw * self.sty - self.st * self.sy) / var
        a = (self.sy - b * self.st) / self.sw
        return (a, b) if a > 0 and b >= 0 else None

    def __call__(self, tokens: int) -> float:
        fit = self.line()
        if fit is None:
            return step_cost(self.curve, tokens)
        return fit[0] + fit[1] * tokens


@dataclass
class _Slot:
    """A request in flight: the row it holds and its decoding state."""
    index: int
    store: KVStore
    drafter: object
    lengths: DraftLength
    tokens: list[int]                        # S: prompt, then committed new tokens
    new: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    started: float = 0.0
    first_token_at: float = 0.0
    proposal: object = None

    @property
    def prefilling(self) -> bool:
        return not self.new


class BatchEngine:
    def __init__(self, forward_rows, store: KVStore, make_drafter: Callable[[], object], sampling: SamplingConfig, *,
                 draft_len: int, prefill_chunk: int, context: int, generator=None, pair: PairProfile | None = None,
                 measure_cost: bool = True):
        """forward_rows(stores, segments, keep) -> logits per row (LlamaModel.forward_rows); store:
        the batch KV store (one row per sequence in flight); make_drafter(): a fresh drafter for
        one sequence (the n-gram index is per row); draft_len: the plan's k; context: each row's
        capacity (a prompt plus its new tokens must fit). measure_cost: price drafts with the
        forward cost measured in the run (ForwardCost); False keeps the pair's curve, so which
        drafts run does not depend on timing (tests)."""
        self.forward_rows, self.sampling, self.generator = forward_rows, sampling, generator
        self.rows = [store.row(b) for b in range(store.shape.batch)]
        self.make_drafter = make_drafter
        self.max_draft_len = draft_len
        self.pair = pair or PairProfile(DEFAULT_MODEL_ALPHA, 0.0, "default")
        self.prefill_chunk, self.context = prefill_chunk, context
        self.cost = ForwardCost(self.pair.curve, warmup=8 if measure_cost else float("inf"))

    @property
    def batch(self) -> int:
        return len(self.rows)

    def _admit(self, index: int, prompt: list[int], store: KVStore) -> _Slot:
        if not prompt:
            raise BadInput(f"prompt {index + 1} is empty")
        if len(prompt) >= self.context:
            raise BadInput(f"prompt {index + 1} has {len(prompt)} tokens, which leaves no room to generate "
                           f"within the planned context of {self.context} tokens")
        store.reset()
        drafter = self.make_drafter()
        k = self.max_draft_len if drafter.name != "none" else 0
        return _Slot(index, store, drafter, DraftLength(self.pair, k), list(prompt), started=time.perf_counter())

    def run(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int] = frozenset(),
            should_stop: Callable[[], bool] = lambda: False, on_step: Callable[[Step, int], None] | None = None
            ) -> Iterator:
        """Yield each row's Step as it commits (Step.sequence: its prompt's index), SequenceDone for
        each prompt as it finishes (not in input order), then BatchStats. on_step(step, row): called
        while the forward that chose the step's tokens is the model's last, its token j chosen by
        the forward's kept row `row + j` (what a corpus reads the target's hidden states from)."""
        queue = deque(enumerate(prompts))
        slots: list[_Slot | None] = [None] * self.batch
        totals = BatchStats(sequences=len(prompts))
        start = time.perf_counter()
        while queue or any(slots):
            for b, slot in enumerate(slots):
                if slot is None and queue:
                    slots[b] = self._admit(*queue.popleft(), self.rows[b])
            if should_stop():
                break
            active, segments, keep = self._segments(slots, max_new_tokens)
            width = sum(len(seg) for seg in segments)
            t0 = time.perf_counter()
            logits = self.forward_rows([s.store for s in active], segments, keep)
            self.cost.record(width, time.perf_counter() - t0)
            totals.forwards += 1
            totals.largest_forward = max(totals.largest_forward, width)
            offset = 0   # where each row's kept rows start in the forward's (a draft head reads them)
            for slot, seg, rows in zip(active, segments, logits):
                step, reason = self._advance(slot, seg, rows, max_new_tokens, stop_ids, offset)
                if step is not None:
                    if on_step:
                        on_step(step, offset)
                    yield step
                offset += rows.shape[0]
                if reason:
                    slot.stats.stop_reason = reason
                    slot.stats.decode_seconds = time.perf_counter() - slot.first_token_at
                    totals.new_tokens += len(slot.new)
                    b = slots.index(slot)
                    slots[b] = None
                    if self.rows[b].keys.device.type == "cpu":
                        trim_heap()   # as after each single-sequence generation: holes would pile up
                    yield SequenceDone(slot.index, slot.new, slot.stats, b, slot.started - start,
                                       time.perf_counter() - start)
        totals.seconds = time.perf_counter() - start
        yield totals

    def _segments(self, slots: list[_Slot | None], max_new: int) -> tuple[list[_Slot], list[list[int]], list[int]]:
        """Each row's tokens for the next forward. A prefilling row feeds its next chunk of the
        prompt, cut at the same boundaries as the single-sequence engine (so it rounds alike);
        prefill chunks share one chunk's worth of tokens per forward (the plan's workspace), so
        a row may wait a step. A decoding row feeds its newest token and the drafts the batch
        can afford: every row proposes, and of all rows' drafts the forward carries those that
        pay for the wider forward (budget/speedup.batch_draft_counts, from each row's running
        acceptance and the forward cost measured in this run, ForwardCost)."""
        active, segments, keep = [], [], []
        prefill_room = self.prefill_chunk
        decoding = []
        for slot in slots:
            if slot is None:
                continue
            if slot.prefilling:
                done = slot.store.length
                chunk = slot.tokens[done : done + self.prefill_chunk]
                if len(chunk) > prefill_room:
                    continue
                prefill_room -= len(chunk)
                active.append(slot)
                segments.append(chunk)
                keep.append(1)
                continue
            # At most budget − 1 drafts: with the bonus token a step commits ≤ budget tokens, so
            # candidates stay inside the row's planned context.
            budget = min(max_new - len(slot.new), self.context - len(slot.tokens))
            t0 = time.perf_counter()
            slot.proposal = slot.drafter.propose(slot.tokens, min(slot.lengths.max_k, budget - 1))
            slot.stats.draft_seconds += time.perf_counter() - t0
            decoding.append(slot)
        fixed = sum(len(seg) for seg in segments) + len(decoding)
        counts = batch_draft_counts([s.lengths.alpha for s in decoding],
                                    [int(s.proposal.tokens.shape[0]) for s in decoding], fixed, self.cost)
        for slot, n in zip(decoding, counts):
            p = slot.proposal
            slot.proposal = type(p)(p.tokens[:n], None if p.q is None else p.q[:n])
            seg = [slot.tokens[-1], *slot.proposal.tokens.tolist()]
            active.append(slot)
            segments.append(seg)
            keep.append(len(seg))
        return active, segments, keep

    def _advance(self, slot: _Slot, seg: list[int], logits: torch.Tensor, max_new: int, stop_ids,
                 offset: int) -> tuple[Step | None, str]:
        """Take one row's logits [keep, V] (rows offset.. of the forward's kept rows): finish its
        prefill chunk, or verify its drafts and commit. Returns the committed step (None while the
        prompt has chunks to go) and why the sequence finished, or ""."""
        if slot.prefilling:
            if slot.store.length < len(slot.tokens):
                return None, ""                                       # more prompt chunks to go
            slot.stats.prefilled_tokens = len(slot.tokens)
            slot.drafter.catch_up(slot.tokens, self.prefill_chunk)
            slot.drafter.observe(offset)                              # its one kept row chose the token
            tokens = [self.sampling.choose(logits, self.generator)]
            slot.first_token_at = time.perf_counter()
            slot.stats.prefill_seconds = slot.first_token_at - slot.started
            step = Step(tokens, drafted=0, accepted=0, sequence=slot.index)
        else:
            draft = slot.proposal.tokens
            a, nxt = verify_chain(logits, slot.proposal, self.sampling, self.generator)
            slot.drafter.observe(offset + a)                          # row a chose nxt
            step = Step(draft[:a].tolist() + [nxt], drafted=len(seg) - 1, accepted=a, sequence=slot.index)
            slot.lengths.after(step)
        budget = min(max_new - len(slot.new), self.context - len(slot.tokens))
        step, reason = settle(step, budget, stop_ids, slot.tokens, slot.store, slot.drafter)
        slot.stats.record(step)
        slot.new.extend(step.tokens)
        if not reason and len(slot.new) >= max_new:
            reason = "max_new_tokens"
        elif not reason and len(slot.tokens) >= self.context:
            reason = "context_full"
        return step, reason
