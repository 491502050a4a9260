"""Drafters propose the next k tokens cheaply; the target verifies them in one forward.

All of them are a Drafter, one small interface:
    catch_up(tokens, chunk, stop)    prefill draft state for the committed tokens (False: interrupted)
    observe(row)                     the target's last forward chose the newest token from this row
    propose(tokens, k) -> Proposal   tokens: the committed sequence so far
    rollback(length)                 forget draft state beyond `length` committed positions
    reset()
and what the engine may ask of some, declared rather than probed:
    looks_up                         lookup(tokens, k) proposes a chain first (ngram+head)
    ranks_candidates                 propose_tree(tokens, shape) proposes a candidate tree, its
                                     rank acceptance starting from rank_prior (the draft head)
    forward, store                   a draft model's own forward and KV store (else None)
"""

from dataclasses import dataclass

import torch

from specmemo.decoding.sampling import SamplingConfig
from specmemo.memory.kvstore import KVStore


@dataclass(frozen=True)
class Proposal:
    tokens: torch.Tensor          # [k'] with k' ≤ k, possibly empty
    q: torch.Tensor | None        # [k', V] draft probabilities; None: deterministic (point mass)


class Drafter:
    """The interface every drafter has (see the module docstring); the defaults draft nothing."""
    name = "none"
    looks_up = False
    ranks_candidates = False
    rank_prior: tuple[float, ...] = ()
    forward = None
    store: KVStore | None = None

    def catch_up(self, tokens: list[int], chunk: int, should_stop=lambda: False) -> bool:
        return True

    def propose(self, tokens: list[int], k: int) -> Proposal:
        raise NotImplementedError

    def lookup(self, tokens: list[int], k: int) -> Proposal:
        raise NotImplementedError(f"the {self.name} drafter has no lookup")

    def propose_tree(self, tokens: list[int], shape):
        raise NotImplementedError(f"the {self.name} drafter proposes no trees")

    def observe(self, row: int) -> None:
        pass

    def rollback(self, length: int) -> None:
        pass

    def reset(self) -> None:
        pass


class NoDrafter(Drafter):
    """Plain autoregressive decoding through the same engine: never proposes."""
    name = "none"

    def __init__(self, device):
        self._empty = torch.empty(0, dtype=torch.long, device=device)

    def propose(self, tokens: list[int], k: int) -> Proposal:
        return Proposal(self._empty, None)


class NgramDrafter(NoDrafter):
    """Prompt lookup: find the longest suffix (up to `max_ngram` tokens) of the conversation that
    occurred earlier, and propose what followed its most recent occurrence. No weights, and an
    index of n-gram -> continuation start, so each lookup costs a few dict probes.

    Single-token matches are not used (min_ngram = 2): on a CPU, verifying even one extra token
    costs about 40% of a step, and one-token matches were accepted too rarely to pay for it
    (MT-Bench, 4 two-turn conversations: 36.4 tok/s with min 2 vs 32.0 with min 1)."""
    name = "ngram"

    def __init__(self, device, max_ngram: int = 3, min_ngram: int = 2):
        super().__init__(device)
        self.device, self.max_ngram, self.min_ngram = device, max_ngram, min_ngram
        self.reset()

    def reset(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0           # n-grams ending before this position are in the index
        self._seen: list[int] = []  # the sequence the index was built from

    def _sync(self, tokens: list[int]) -> None:
        # Index every n-gram whose continuation is known: those ending before the last token.
        if self._seen[: self._indexed] != tokens[: self._indexed]:
            self.reset()  # the conversation was rewritten (eviction, /reset)
        # A copy, not the engine's live list: otherwise the check above compares a list with itself.
        del self._seen[len(tokens):]
        self._seen[self._indexed:] = tokens[self._indexed:]
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(1, self.max_ngram + 1):
                if end - n + 1 < 0:
                    break
                self._index[tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(tokens) - 1)

    def propose(self, tokens: list[int], k: int) -> Proposal:
        self._sync(tokens)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self._index.get(tuple(tokens[-n:]))
            if start is not None:
                cont = tokens[start : start + k]
                return Proposal(torch.tensor(cont, dtype=torch.long, device=self.device), None)
        return Proposal(self._empty, None)


class ModelDrafter(Drafter):
    """A small causal LM with the target's vocabulary, with its own KV store (optionally a window
    of the W most recent tokens). Draws each draft token from q, the same processed distribution
    that verification uses."""
    name = "model"

    def __init__(self, forward, store: KVStore, sampling: SamplingConfig, window: int, generator=None,
                 prefill_chunk: int = 256):
        """forward: as the engine's (our decoder, or a transformers model behind the adapter)."""
        self.forward, self.store, self.sampling = forward, store, sampling
        self.window, self.generator, self.prefill_chunk = window, generator, prefill_chunk

    def reset(self) -> None:
        self.store.reset()

    def rollback(self, length: int) -> None:
        self.store.trim(length)

    def observe(self, row: int) -> None:
        pass

    def _feed(self, ids: list[int], chunk: int, should_stop=lambda: False) -> torch.Tensor | None:
        """Feed committed tokens not yet in the draft cache, at most `chunk` per forward (the
        plan's prefill chunk); return logits for the last one, None if stopped between chunks."""
        store, device = self.store, self.store.keys.device
        if store.window and len(ids) > self.window:
            # Older tokens would fall out of the window anyway: skip them, keep positions.
            store.jump(store.length + len(ids) - self.window)
            ids = ids[-self.window:]
        logits, i = None, 0
        while i < len(ids):
            if should_stop():
                return None
            step = min(chunk, len(ids) - i)
            if store.window:
                step = min(step, store.safe_chunk(self.window))
            piece = torch.tensor([ids[i : i + step]], dtype=torch.long, device=device)
            logits = self.forward(store, piece, 1)
            i += step
        return None if logits is None else logits[0, -1]

    def catch_up(self, tokens: list[int], chunk: int, should_stop=lambda: False) -> bool:
        """Prefill all committed tokens but the last (fed with the next proposal)."""
        behind = tokens[self.store.length : len(tokens) - 1]
        return not behind or self._feed(behind, chunk, should_stop) is not None

    def propose(self, tokens: list[int], k: int) -> Proposal:
        if k <= 0:
            return Proposal(torch.empty(0, dtype=torch.long, device=self.store.keys.device), None)
        logits = self._feed(tokens[self.store.length :], self.prefill_chunk)
        drafted, qs = [], []
        for i in range(k):
            if self.sampling.greedy:
                tok = int(logits.argmax())
            else:
                q = self.sampling.probs(logits[None])[0]
                tok = int(torch.multinomial(q, 1, generator=self.generator))
                qs.append(q)
            drafted.append(tok)
            if i + 1 < k:
                ids = torch.tensor([[tok]], dtype=torch.long, device=logits.device)
                logits = self.forward(self.store, ids, 1)[0, -1]
        q = torch.stack(qs) if qs else None
        return Proposal(torch.tensor(drafted, dtype=torch.long, device=logits.device), q)


class HeadDrafter(NoDrafter):
    """The target's trained draft head (models/draft_head.py): drafts from the hidden state the
    target's last forward left at the row that chose the newest token, regressively, one small
    block per draft token. No KV and nothing to roll back: each step starts from the target."""
    name = "head"

    # The engine's tree shape starts from the pair profile's rank acceptance (measured, or the
    # head's card); this prior only serves an engine built without one (tests).
    ranks_candidates = True
    rank_prior = (0.6, 0.1, 0.04)

    def __init__(self, model, running, sampling: SamplingConfig, generator=None):
        """model: the target, our decoder (it keeps `last_hidden`); running: the head as it drafts
        (models/draft_head.RunningHead), one for every drafter that shares it (a batch's rows)."""
        super().__init__(model.device)
        self.device = model.device
        self.model, self.running, self.sampling, self.generator = model, running, sampling, generator
        self.vocab = running.vocab.to(model.device)
        self.hidden: torch.Tensor | None = None   # [E]: the target's state behind the newest token

    def observe(self, row: int) -> None:
        self.hidden = self.model.last_hidden[0, row]

    def reset(self) -> None:
        self.hidden = None

    def _step(self, h: torch.Tensor, token) -> tuple[torch.Tensor, torch.Tensor]:
        """One head step from state h [E] and a token: (predicted state [E], logits [Vh])."""
        f, logits = self.running.step(h[None], torch.tensor([int(token)], device=self.device))
        return f[0], logits[0]

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int) -> Proposal:
        if k <= 0 or self.hidden is None:
            return Proposal(self._empty, None)
        h, x = self.hidden, torch.tensor([tokens[-1]], device=self.device)
        drafted, qs = [], []
        for _ in range(k):
            h, logits = self._step(h, x)
            if self.sampling.greedy:
                x = self.vocab[logits.argmax()].reshape(1)
            else:
                full = torch.full((self.model.cfg.vocab_size,), float("-inf"), device=self.device)
                full[self.vocab] = logits
                q = self.sampling.probs(full[None])[0]                           # [V]: zero off the head's vocabulary
                x = torch.multinomial(q, 1, generator=self.generator)
                qs.append(q)
            drafted.append(x)
        return Proposal(torch.cat(drafted), torch.stack(qs) if qs else None)

    @torch.inference_mode()
    def propose_tree(self, tokens: list[int], shape):
        """Fill a candidate tree's shape (memory/attention.CandidateTree): each node with children
        runs one head step from its own predicted state, and its children are the head's top
        candidates in rank order. Returns (tree, node tokens without the root); no nodes when the
        head has no target state yet."""
        if self.hidden is None or len(shape) < 2:
            return shape, []
        node_tokens = [tokens[-1]] + [0] * (len(shape) - 1)
        states = {0: self.hidden}
        for node in range(len(shape)):
            kids = shape.children(node)
            if not kids:
                continue
            f, logits = self._step(states[node], node_tokens[node])
            top = logits.topk(len(kids)).indices                                 # [children]
            for kid, i in zip(kids, top.tolist()):
                node_tokens[kid], states[kid] = int(self.vocab[i]), f
        return shape, node_tokens[1:]


class LookupHeadDrafter(HeadDrafter):
    """Both drafters, each where it is strong: where the conversation repeats itself, n-gram lookup
    proposes a chain (no cost, accepted often: MT-Bench, 0.64 per drafted token on the Zen 4 host);
    elsewhere (most steps: lookup found a match in 27% of them) the head proposes a candidate
    tree. The engine asks `lookup` first and falls back to the tree (decoding/engine.py)."""
    name = "ngram+head"
    looks_up = True

    def __init__(self, model, running, sampling: SamplingConfig, generator=None):
        super().__init__(model, running, sampling, generator)
        self.ngram = NgramDrafter(model.device)

    def lookup(self, tokens: list[int], k: int) -> Proposal:
        return self.ngram.propose(tokens, k)

    def propose(self, tokens: list[int], k: int) -> Proposal:
        """A chain (the batch engine drafts chains): the lookup's where it finds one, else the head's."""
        found = self.lookup(tokens, k) if k > 0 else None
        return found if found is not None and len(found.tokens) else super().propose(tokens, k)

    def reset(self) -> None:
        super().reset()
        self.ngram.reset()
