"""A chat session: one engine whose caches carry over from turn to turn, kept inside the budget.

Each turn prefills only its new tokens (template + user message). When a turn would not fit
the planned context, the oldest exchanges are dropped and what is kept is prefilled again;
the system prompt and the current user message are never dropped.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from specmemo.chat.conversation import Conversation, encode_text, render, turn_delta
from specmemo.decoding.detokenize import Detokenizer
from specmemo.decoding.events import Finished, Step
from specmemo.errors import BadInput
from specmemo.generation import stop_ids
from specmemo.memory.measure import peak_bytes, reset_peak
from specmemo.runtime import Runtime


@dataclass
class TurnRecord:
    """One line of --json-log."""
    turn: int
    context_tokens: int
    context_limit: int
    prefilled_tokens: int
    new_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    tokens_per_s: float
    peak_bytes: int
    budget_bytes: int
    evicted_tokens: int
    evicted_turns: int
    stop_reason: str
    seconds: float
    accepted_histogram: dict

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Evicted:
    turns: int
    tokens: int


class ChatSession:
    def __init__(self, runtime: Runtime, system: str | None, max_new_tokens: int, preload_rss: int):
        self.rt, self.engine, self.tok = runtime, runtime.engine, runtime.tokenizer
        self.conversation = Conversation(system)
        self.max_new_tokens = max_new_tokens
        self.preload_rss = preload_rss
        self.stops = stop_ids(runtime.tokenizer, runtime.target.model)
        self.turns: list[TurnRecord] = []

    @property
    def context(self) -> int:
        return self.engine.context

    def reply_reserve(self) -> int:
        """Room kept free for the reply when deciding whether a turn fits."""
        return min(self.max_new_tokens, self.context // 2)

    def reset(self) -> None:
        self.conversation.reset()
        self.engine.reset()

    def _plan_tokens(self, text: str) -> tuple[list[int], int, int]:
        """(tokens to feed, turns evicted, tokens evicted). Resets the engine when evicting."""
        delta = turn_delta(self.tok, self.engine.tokens, self.conversation.with_user(text))
        if delta is not None and len(self.engine.tokens) + len(delta) + self.reply_reserve() <= self.context:
            return delta, 0, 0
        # Drop the oldest exchanges until the kept conversation and a reply fit.
        for dropped in range(0, self.conversation.exchanges + 1):
            ids = encode_text(self.tok, render(self.tok, self.conversation.kept(dropped, text)))
            if len(ids) + self.reply_reserve() <= self.context or (
                    dropped == self.conversation.exchanges and len(ids) < self.context):
                evicted = max(0, len(self.engine.tokens) - len(ids))
                self.conversation.drop_oldest(dropped)
                self.engine.reset()
                return ids, dropped, evicted
        raise BadInput(
            f"this message is {len(encode_text(self.tok, text))} tokens; with the system prompt it does not fit "
            f"the {self.context}-token context this budget allows. Shorten it, or raise --budget."
        )

    def ask(self, text: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator:
        """Yield Evicted (if any), TextDelta events, and finally the TurnRecord."""
        ids, dropped, evicted = self._plan_tokens(text)
        if dropped or evicted:
            yield Evicted(dropped, evicted)
        device = self.engine.device.type
        reset_peak(device)
        start = time.perf_counter()
        detok = Detokenizer(self.tok)
        stats, new = None, []
        room = self.context - len(self.engine.tokens) - len(ids)
        try:
            for ev in self.engine.generate(ids, min(self.max_new_tokens, max(1, room)), self.stops, should_stop):
                if isinstance(ev, Step):
                    new.extend(ev.tokens)
                    delta = detok.push([t for t in ev.tokens if t not in self.stops])
                    if delta:
                        yield TextDelta(delta)
                elif isinstance(ev, Finished):
                    stats = ev.stats
        finally:
            # Whatever happened, the conversation records what the caches hold.
            reply = self.tok.decode([t for t in new if t not in self.stops], skip_special_tokens=True)
            self.conversation.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        seconds = time.perf_counter() - start
        record = TurnRecord(
            turn=len(self.turns) + 1, context_tokens=len(self.engine.tokens), context_limit=self.context,
            prefilled_tokens=stats.prefilled_tokens,
            new_tokens=stats.new_tokens, drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
            tokens_per_s=stats.new_tokens / seconds if seconds else 0.0,
            peak_bytes=peak_bytes(device) - self.preload_rss, budget_bytes=self.rt.report.budget_bytes,
            evicted_tokens=evicted, evicted_turns=dropped, stop_reason=stats.stop_reason, seconds=seconds,
            accepted_histogram=dict(sorted(stats.accepted_histogram.items())),
        )
        self.turns.append(record)
        yield record

    def transcript(self) -> dict:
        return {
            "target": self.rt.target.ref.name,
            "draft": self.rt.report.draft.name if self.rt.report.draft else self.rt.report.drafter,
            "system": self.conversation.system,
            "messages": list(self.conversation.messages),
            "turns": [t.to_json() for t in self.turns],
        }
