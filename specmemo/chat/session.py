"""A chat session: one engine whose caches carry over from turn to turn, kept inside the budget.

Each turn prefills only its new tokens (template + user message). When a turn would not fit the
planned context, the oldest exchanges are dropped down to half the context, so the next several
turns append again instead of re-prefilling everything; the system prompt and the current user
message are never dropped. Every turn's whole-process peak is checked against the budget: a turn
over it is reported, and the context is lowered (and its KV pages released) before the next turn.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from specmemo.budget import footprint
from specmemo.chat.conversation import Conversation
from specmemo.decoding.events import Finished, GenerationStats, Step
from specmemo.errors import BadInput
from specmemo.memory.measure import PeakMeter
from specmemo.models.text import StreamDecoder, decode_reply, encode_messages, encode_text, stop_ids, turn_delta
from specmemo.pipeline import Pipeline


@dataclass
class TurnRecord:
    """One line of --json-log."""
    turn: int
    context_tokens: int
    context_limit: int
    stats: GenerationStats       # the engine's: tokens, acceptance, speeds (decoding only), stop reason
    reprefilled_tokens: int      # earlier conversation prefilled again (after eviction or a template re-render)
    reprefill_reason: str        # "", "eviction", "template" or "budget"
    peak_bytes: int              # the whole process during this turn
    generation_peak_bytes: int   # this turn's peak above the process once loaded (against the plan's generation memory)
    predicted_generation_bytes: int   # the plan's generation memory
    plan_total_bytes: int        # the plan's whole process
    budget_bytes: int
    over_budget: bool
    evicted_tokens: int          # tokens of the dropped exchanges
    evicted_turns: int
    seconds: float               # the whole turn, streaming included
    forward: str                 # "specmemo" (our decoder) or "transformers" (the adapter)
    attention: str | None = None  # half precision: "native" (compiled kernel) or "torch" (LoadedModel.attention)
    products: str | None = None   # "compiled" (models/kernels/row_matmul.c) or "torch" (LoadedModel.products)

    @property
    def prefilled_tokens(self) -> int:
        return self.stats.prefilled_tokens

    def to_json(self) -> dict:
        own = {k: v for k, v in self.__dict__.items() if k != "stats"}
        return {**own, **self.stats.to_json(), "prefilled_tokens": self.stats.prefilled_tokens}


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Evicted:
    turns: int
    tokens: int


@dataclass(frozen=True)
class Reprefilled:
    tokens: int
    reason: str


@dataclass(frozen=True)
class Prepared:
    """What a turn feeds the engine, and why."""
    ids: list[int]
    evicted_turns: int = 0
    evicted_tokens: int = 0
    reprefill_reason: str = ""


SHORTEST_EXCHANGE = 64   # tokens beyond the template's own: a short message and a short reply


def smallest_context(tokenizer, system: str | None) -> int:
    """The least context a chat can work in: the template around a system prompt and one user
    turn, plus SHORTEST_EXCHANGE. A budget that holds less is refused at startup."""
    return len(encode_messages(tokenizer, Conversation(system).with_user(""))) + SHORTEST_EXCHANGE


class ChatSession:
    def __init__(self, pipeline: Pipeline, system: str | None, max_new_tokens: int):
        self.rt, self.engine, self.tok = pipeline, pipeline.engine, pipeline.tokenizer
        self.conversation = Conversation(system)
        self.max_new_tokens = max_new_tokens
        self.stops = stop_ids(pipeline.tokenizer, pipeline.target.model)
        self.turns: list[TurnRecord] = []
        self.context_cap = self.engine.context  # lowered when a turn overran the budget
        self.meter = PeakMeter(pipeline.meter.device, pipeline.meter.fixed_bytes)

    @property
    def budget_bytes(self) -> int:
        return self.rt.report.budget_bytes

    def reply_reserve(self) -> int:
        """Room kept free for the reply when deciding whether a turn fits."""
        return min(self.max_new_tokens, self.context_cap // 2)

    def reset(self) -> None:
        self.conversation.reset()
        self.engine.reset()
        self.turns.clear()

    def too_long(self, text: str) -> BadInput:
        limit = self.rt.report.plan.request.target.max_position
        where = (f"the model's maximum context of {limit} tokens" if self.context_cap >= limit
                 else f"the {self.context_cap}-token context this budget allows (raise --budget for more)")
        return BadInput(f"this message is {len(encode_text(self.tok, text))} tokens; with the system prompt and "
                        f"a reply it does not fit {where}. Shorten it.")

    def prepare(self, text: str) -> Prepared:
        """The tokens this turn feeds; evicts (and resets the engine) when the turn does not fit."""
        messages = self.conversation.with_user(text)
        limit, reserve = self.context_cap, self.reply_reserve()
        delta = turn_delta(self.tok, self.engine.tokens, messages)
        if delta is not None and len(self.engine.tokens) + len(delta) + reserve <= limit:
            # Caches emptied after a budget overrun hold nothing of the conversation: all of it is again.
            again = "budget" if not self.engine.tokens and self.conversation.messages else ""
            return Prepared(delta, reprefill_reason=again)
        whole = encode_messages(self.tok, messages)
        if delta is None and len(whole) + reserve <= limit:
            # The template renders earlier turns differently now (e.g. it strips past reasoning).
            self.engine.reset()
            return Prepared(whole, reprefill_reason="template")
        # Evict down to half the context: headroom, so the next turns append instead of re-prefilling.
        kept, dropped = whole, 0
        while dropped < self.conversation.exchanges and len(kept) + reserve > limit // 2:
            dropped += 1
            kept = encode_messages(self.tok, self.conversation.kept(dropped, text))
        if len(kept) >= limit:
            raise self.too_long(text)
        self.conversation.drop_oldest(dropped)
        self.engine.reset()
        return Prepared(kept, dropped, len(whole) - len(kept), "eviction")

    def ask(self, text: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator:
        """Yield Evicted/Reprefilled (if any), TextDelta events, and finally the TurnRecord."""
        prep = self.prepare(text)
        if prep.evicted_turns:
            yield Evicted(prep.evicted_turns, prep.evicted_tokens)
        elif prep.reprefill_reason:
            yield Reprefilled(len(prep.ids), prep.reprefill_reason)
        self.meter.reset()
        start = time.perf_counter()
        stream = StreamDecoder(self.tok)
        stats, new = None, []
        room = self.context_cap - len(self.engine.tokens) - len(prep.ids)
        try:
            for ev in self.engine.generate(prep.ids, min(self.max_new_tokens, max(1, room)), self.stops, should_stop):
                if isinstance(ev, Step):
                    new.extend(ev.tokens)
                    delta = stream.push([t for t in ev.tokens if t not in self.stops])
                    if delta:
                        yield TextDelta(delta)
                elif isinstance(ev, Finished):
                    stats = ev.stats
        finally:
            # Whatever happened, the conversation records what the caches hold.
            reply = decode_reply(self.tok, [t for t in new if t not in self.stops])
            self.conversation.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        peak = self.meter.peak()
        record = TurnRecord(
            turn=len(self.turns) + 1, context_tokens=len(self.engine.tokens), context_limit=self.context_cap,
            stats=stats, reprefilled_tokens=len(prep.ids) if prep.reprefill_reason else 0,
            reprefill_reason=prep.reprefill_reason, peak_bytes=peak,
            generation_peak_bytes=max(0, peak - self.rt.meter.baseline),
            predicted_generation_bytes=self.rt.report.plan.generation_bytes,
            plan_total_bytes=self.rt.report.plan.total_bytes, budget_bytes=self.budget_bytes,
            over_budget=peak > self.budget_bytes, evicted_tokens=prep.evicted_tokens,
            evicted_turns=prep.evicted_turns, seconds=time.perf_counter() - start,
            forward=self.rt.target.forward_path, attention=self.rt.target.attention, products=self.rt.target.products,
        )
        self.turns.append(record)
        self.rt.calibrate()
        if record.over_budget:
            self.shrink(peak - self.budget_bytes)
        yield record

    def shrink(self, excess: int) -> None:
        """Lower the context by the KV bytes of the overrun (at least a quarter of it), and give
        the KV pages above the new limit back, so the next turn evicts into the budget."""
        req = self.rt.report.plan.request
        per_token = footprint.kv_bytes_per_token(req.target, req.kv)
        cut = max(-(-excess // per_token), self.context_cap // 4)
        self.context_cap = max(2, self.context_cap - cut)
        if len(self.engine.tokens) > self.context_cap // 2:
            self.engine.reset()  # the next turn re-prefills what is kept, within the new limit
        self.engine.store.release(max(self.context_cap, self.engine.store.length))

    def transcript(self) -> dict:
        return {
            "target": self.rt.report.target_name,
            "draft": self.rt.report.draft_name,
            "system": self.conversation.system,
            "messages": list(self.conversation.messages),
            "turns": [t.to_json() for t in self.turns],
        }
