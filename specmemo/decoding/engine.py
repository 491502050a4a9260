"""The speculative-decoding loop (Leviathan et al. 2023; Chen et al. 2023).

Notation: p = target, q = draft, k = draft length. The committed sequence S is the whole
conversation; the target's KV store always holds S[:-1] (the last token is fed with the next
candidates). One step:

    draft   the drafter proposes d_1..d_k'            (k' ≤ k; 0 when it has nothing)
    verify  one target forward over [S[-1], d_1..d_k'] -> k'+1 rows of logits
    accept  keep d_1..d_a, plus a recovered or bonus token
    trim    move the target's (and draft's) KV length back to len(S) - 1: a pointer move
    emit    yield a Step event

The engine keeps S and both caches between calls, so a chat turn prefills only its new tokens.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from specmemo.budget.speedup import DEFAULT_MODEL_ALPHA, PairProfile, best_draft_len, best_tree
from specmemo.decoding.drafters import Proposal
from specmemo.decoding.events import Finished, GenerationStats, Prefilled, Step
from specmemo.decoding.sampling import SamplingConfig
from specmemo.decoding.step import settle, verify_chain
from specmemo.decoding.verify import verify_tree_greedy, verify_tree_sampling
from specmemo.memory.attention import CandidateTree
from specmemo.budget.units import count
from specmemo.errors import BadInput
from specmemo.memory.malloc import trim_heap
from specmemo.memory.kvstore import KVStore


class DraftLength:
    """The draft length for the next step: the k ≤ max_k with the best predicted speedup
    (budget/speedup.py) at the running acceptance, under the pair's cost of a draft step (c) and of
    verifying k + 1 tokens (the measured cost curve). α is estimated per drafted token, as the
    speedup model has it: a step that accepted a of d drafts saw a acceptances and, if a < d, one
    rejection; counts decay by `decay` per step, so α follows the conversation, and start from
    the pair's α worth `prior` observations."""

    def __init__(self, pair: PairProfile, max_k: int, decay: float = 0.9, prior: float = 2.0):
        self.pair, self.max_k, self.decay = pair, max_k, decay
        self.accepted, self.rejected = prior * pair.alpha, prior * (1 - pair.alpha)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def first(self) -> int:
        return best_draft_len(self.alpha, self.pair.c, self.pair.curve, self.max_k) if self.max_k else 0

    def after(self, step: Step) -> int:
        if step.drafted:
            self.accepted = self.decay * self.accepted + step.accepted
            self.rejected = self.decay * self.rejected + (step.accepted < step.drafted)
        return self.first()


class TreeShape:
    """The candidate tree for the next step, for a drafter that ranks its candidates (the draft
    head): the best tree under the pair's c and cost curve (budget/speedup.best_tree) for the
    running rank acceptance, i.e. how often the target's token was a node's r-th child. Counts
    decay by `decay` per step and start from `prior` (the drafter's measured ranks, worth
    `weight` observations)."""

    def __init__(self, pair: PairProfile, max_nodes: int, prior: list[float], decay: float = 0.95,
                 weight: float = 4.0):
        self.pair, self.max_nodes, self.decay = pair, max_nodes, decay
        self.hits = [weight * p for p in prior]
        self.visits = [weight] * len(prior)   # per rank: nodes that offered that many candidates
        self._cache: dict = {}

    def ranks(self) -> list[float]:
        return [h / v for h, v in zip(self.hits, self.visits)]

    def best(self, max_nodes: int) -> CandidateTree:
        key = (tuple(round(r, 2) for r in self.ranks()), min(max_nodes, self.max_nodes))
        if key not in self._cache:
            self._cache[key] = CandidateTree(best_tree(list(key[0]), self.pair.c, self.pair.curve, key[1])[0])
        return self._cache[key]

    def after(self, tree: CandidateTree, tokens: list[int], path: list[int], choice: int
              ) -> tuple[tuple[int, int], ...]:
        """Count, at each node of the accepted path that had children, which rank the target took
        (-1: none) among how many offered; returns those pairs. A rank never offered keeps its prior."""
        self.hits = [self.decay * h for h in self.hits]
        self.visits = [self.decay * v for v in self.visits]
        seen = []
        for j, node in enumerate(path):
            kids = tree.children(node)
            if not kids:
                continue
            want = tokens[path[j + 1]] if j + 1 < len(path) else choice
            rank = next((r for r, kid in enumerate(kids) if tokens[kid] == want), -1)
            seen.append((rank, len(kids)))
            for r in range(min(len(kids), len(self.visits))):
                self.visits[r] += 1
            if 0 <= rank < len(self.hits):
                self.hits[rank] += 1
        return tuple(seen)


class Engine:
    def __init__(self, forward, store: KVStore, drafter, sampling: SamplingConfig, *,
                 draft_len: int, prefill_chunk: int, context: int, generator=None, pair: PairProfile | None = None):
        """forward(store, ids [1, n], logits_to_keep) -> fp32 logits: our decoder (models/llama.py)
        or a transformers model behind memory/hf_adapter.AdapterForward. draft_len: the most
        drafts a step may verify (the plan's k); pair: α, c and the cost curve that choose each
        step's length (None: a flat curve, free drafts, so every step drafts draft_len)."""
        self.forward, self.store, self.drafter, self.sampling = forward, store, drafter, sampling
        self.max_draft_len = 0 if drafter.name == "none" else draft_len
        pair = pair or PairProfile(DEFAULT_MODEL_ALPHA, 0.0, "default")
        # A lookup's chain (ngram+head) costs microseconds: its length is chosen at c = 0, from
        # the lookup's own α where the pair has it.
        self.lengths = DraftLength(replace(pair.lookup or pair, c=0.0) if drafter.looks_up else pair,
                                   self.max_draft_len)
        self.draft_len = self.lengths.first()
        # A drafter that ranks candidates (the draft head) proposes a candidate tree; its shape
        # follows the measured rank acceptance (TreeShape).
        ranks = (pair.ranks or drafter.rank_prior) if drafter.ranks_candidates else None
        self.shapes = TreeShape(pair, self.max_draft_len, list(ranks)) if ranks and self.max_draft_len else None
        self.prefill_chunk, self.context = prefill_chunk, context
        self.generator = generator
        self.device = store.keys.device
        self.tokens: list[int] = []   # S: the committed conversation

    # -- state ------------------------------------------------------------------------------------

    def reset(self) -> None:
        self.tokens = []
        self.store.reset()
        self.drafter.reset()

    def room(self) -> int:
        """Tokens the conversation may still grow by within the planned context."""
        return self.context - len(self.tokens)

    # -- pipeline stages ----------------------------------------------------------------------------

    def prefill(self, new_tokens: list[int], should_stop: Callable[[], bool] = lambda: False
                ) -> tuple[torch.Tensor | None, Prefilled]:
        """Append tokens and run everything not yet in the KV store, in chunks; logits of the last
        only. The target goes first, then the draft model (if any) catches up, chunked the same
        way. `should_stop` is checked between chunks: an interrupted prefill returns None logits
        and leaves the stores consistent (the rest is fed by the next call)."""
        if not new_tokens and not self.tokens:
            raise BadInput("nothing to generate from: the prompt is empty")
        total = len(self.tokens) + len(new_tokens)
        if total >= self.context:
            raise BadInput(f"a prompt of {count(total, 'token')} leaves no room to generate within the planned "
                           f"context of {count(self.context, 'token')}")
        start = time.perf_counter()
        self.tokens.extend(new_tokens)
        pending = self.tokens[self.store.length :]
        logits = None
        for i in range(0, len(pending), self.prefill_chunk):
            if should_stop():
                return None, Prefilled(i, time.perf_counter() - start)
            ids = torch.tensor([pending[i : i + self.prefill_chunk]], dtype=torch.long, device=self.device)
            logits = self.forward(self.store, ids, 1)
        # The draft's own prefill belongs here too, not to drafting (its time would inflate c).
        if not self.drafter.catch_up(self.tokens, self.prefill_chunk, should_stop):
            return None, Prefilled(len(pending), time.perf_counter() - start)
        # The last token is now in the cache too; it stays there: S grows by the sampled token.
        self.drafter.observe(-1)
        return logits[0], Prefilled(len(pending), time.perf_counter() - start)

    def _tree_step(self, max_nodes: int) -> tuple[Step, float]:
        """One step over a candidate tree: verify every node in one forward, keep the branch the
        target agrees with (greedy: its argmax; sampling: multi-candidate rejection, see
        verify_tree_sampling), its K/V moved into place in the store, and emit its tokens."""
        t0 = time.perf_counter()
        tree, drafted = self.drafter.propose_tree(self.tokens, self.shapes.best(max_nodes))
        drafting = time.perf_counter() - t0
        if not drafted:
            return self._step(0)[0], drafting
        tokens = [self.tokens[-1], *drafted]
        start = self.store.length
        logits = self.forward(self.store, torch.tensor([tokens], device=self.device), len(tokens), tree=tree)[0]
        if self.sampling.greedy:
            path, nxt = verify_tree_greedy(logits, tokens, tree)
        else:
            path, nxt = verify_tree_sampling(self.sampling.probs(logits), tokens, tree, self.generator)
        self.store.keep_branch(start, path)
        ranks = self.shapes.after(tree, tokens, path, nxt)
        self.drafter.observe(path[-1])  # the last accepted node's row chose nxt
        return Step([tokens[i] for i in path[1:]] + [nxt], len(drafted), len(path) - 1, ranks), drafting

    def _lookup(self, k: int) -> tuple[Proposal, float] | None:
        """The drafter's lookup chain and its time, None where it has no lookup or found nothing."""
        if not self.drafter.looks_up:
            return None
        t0 = time.perf_counter()
        proposal = self.drafter.lookup(self.tokens, max(k, 1))
        return (proposal, time.perf_counter() - t0) if len(proposal.tokens) else None

    def _step(self, k: int, looked: tuple[Proposal, float] | None = None) -> tuple[Step, float]:
        """One chain step: k drafts proposed now, or a lookup's (looked: proposal, seconds)."""
        if looked:
            proposal, drafting = looked
        else:
            t0 = time.perf_counter()
            proposal = self.drafter.propose(self.tokens, k)
            drafting = time.perf_counter() - t0
        draft = proposal.tokens
        ids = torch.cat([torch.tensor([self.tokens[-1]], device=self.device), draft])[None]
        logits = self.forward(self.store, ids, ids.shape[1])[0]
        a, nxt = verify_chain(logits, proposal, self.sampling, self.generator)
        self.drafter.observe(a)  # row a chose nxt
        return Step(draft[:a].tolist() + [nxt], drafted=int(draft.shape[0]), accepted=a), drafting

    def generate(self, new_tokens: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator:
        """Yield Prefilled, then Step events, then Finished(stats). decode_seconds excludes the prefill."""
        stats = GenerationStats()
        logits, prefilled = self.prefill(new_tokens, should_stop)
        stats.prefilled_tokens, stats.prefill_seconds = prefilled.tokens, prefilled.seconds
        yield prefilled
        if logits is None:
            stats.stop_reason = "interrupted"
            yield Finished(stats)
            return
        t0 = time.perf_counter()
        first = Step([self.sampling.choose(logits, self.generator)], drafted=0, accepted=0)
        self.tokens.append(first.tokens[0])
        stats.record(first)
        yield first
        reason = "stop_token" if first.tokens[0] in stop_ids else ""
        while not reason:
            if stats.new_tokens >= max_new_tokens:
                reason = "max_new_tokens"
            elif self.room() <= 0:
                reason = "context_full"
            elif should_stop():
                reason = "interrupted"
            if reason:
                break
            budget = min(max_new_tokens - stats.new_tokens, self.room())
            # At most budget − 1 draft tokens: with the bonus token a step commits ≤ budget, so
            # candidates stay inside the planned context (the store's capacity).
            # A drafter with a lookup (ngram+head) proposes its chain where it finds one; its
            # length follows the chain steps' acceptance alone, and trees the ranks alone.
            trees = self.shapes and budget > 1
            looked = self._lookup(min(self.draft_len, budget - 1)) if trees else None
            if trees and looked is None:
                step, drafting = self._tree_step(min(self.max_draft_len, budget - 1))
            else:
                step, drafting = self._step(min(self.draft_len, budget - 1), looked)
                self.draft_len = self.lengths.after(step)
                if looked:
                    step = replace(step, lookup=True)
                    stats.lookup[3] += drafting
            stats.draft_seconds += drafting
            step, reason = settle(step, budget, stop_ids, self.tokens, self.store, self.drafter)
            stats.record(step)
            yield step
        stats.decode_seconds = time.perf_counter() - t0
        stats.stop_reason = reason
        if self.device.type == "cpu":
            trim_heap()  # freed temporaries would otherwise stay resident between turns
        yield Finished(stats)
