"""What the engine yields. The terminal, the JSON log and the profiler render these."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prefilled:
    tokens: int
    seconds: float


@dataclass(frozen=True)
class Step:
    """One draft-and-verify step: `tokens` are committed, the first `accepted` of them came from the draft."""
    tokens: list[int]
    drafted: int
    accepted: int
    # A tree step: at each node of the kept branch with children, (rank the target took or -1, children offered).
    ranks: tuple[tuple[int, int], ...] = ()
    lookup: bool = False   # a lookup chain's step (ngram+head), not the head's
    sequence: int = -1     # the batch engine's request (its index in the prompts); -1: the one sequence


def clip(tokens: list[int], budget: int, stop_ids) -> tuple[list[int], str]:
    """A step's tokens cut to the `budget` left and after the first stop token, and "stop_token"
    when one ended it (else "")."""
    tokens = tokens[:budget]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], "stop_token"
    return tokens, ""


@dataclass
class GenerationStats:
    prefilled_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    steps: int = 0
    decode_seconds: float = 0.0         # from the first new token on; prefill excluded
    draft_seconds: float = 0.0          # time spent proposing (the drafter's cost, for c)
    accepted_histogram: dict[int, int] = field(default_factory=dict)  # accepted -> steps that drafted
    rank_hits: list[int] = field(default_factory=lambda: [0] * 4)    # tree steps: the target took rank r
    rank_visits: list[int] = field(default_factory=lambda: [0] * 4)  # ... at nodes offering ≥ r candidates
    lookup: list = field(default_factory=lambda: [0, 0, 0, 0.0])    # lookup chains: steps, drafted, accepted, seconds
    stop_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed, prefill excluded."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def to_json(self) -> dict:
        """The fields every renderer shows (generate --json, chat's --json-log, profile's turns)."""
        return {"new_tokens": self.new_tokens, "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens, "steps": self.steps, "tokens_per_s": self.tokens_per_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "prefill_seconds": self.prefill_seconds,
                "acceptance_rate": self.acceptance_rate, "stop_reason": self.stop_reason,
                "accepted_histogram": dict(sorted(self.accepted_histogram.items()))}

    def record(self, step: Step) -> None:
        self.steps += 1
        self.new_tokens += len(step.tokens)
        self.drafted_tokens += step.drafted
        self.accepted_tokens += step.accepted
        if step.drafted:  # steps where the drafter had nothing to propose are not rejections
            self.accepted_histogram[step.accepted] = self.accepted_histogram.get(step.accepted, 0) + 1
        if step.lookup:
            self.lookup[:3] = [self.lookup[0] + 1, self.lookup[1] + step.drafted, self.lookup[2] + step.accepted]
        for taken, offered in step.ranks:
            for r in range(min(offered, len(self.rank_visits))):
                self.rank_visits[r] += 1
            if 0 <= taken < len(self.rank_hits):
                self.rank_hits[taken] += 1


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats


def collect(events) -> tuple[list[int], GenerationStats | None]:
    """Run an engine's event stream to its end: (committed new tokens, final stats)."""
    tokens, stats = [], None
    for ev in events:
        if isinstance(ev, Step):
            tokens.extend(ev.tokens)
        elif isinstance(ev, Finished):
            stats = ev.stats
    return tokens, stats
