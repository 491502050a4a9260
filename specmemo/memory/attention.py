"""Attention masks over KV-store views: boolean, True = attend, shaped [n, S] for n queries and
the S keys attention sees after the forward's own keys are written (broadcast over batch/heads).

The one place masks are built, for our decoder and for the transformers adapter alike.
"""

import torch

from specmemo.memory.kvstore import KVStore


def causal_mask(n: int, keys: int, device) -> torch.Tensor | None:
    """The queries are the last n of `keys` positions (bottom-right aligned). None for one query:
    it attends to every key, and SDPA's unmasked path is faster."""
    if n == 1:
        return None
    return torch.ones(n, keys, dtype=torch.bool, device=device).tril(keys - n)


def attention_mask(store: KVStore, n: int) -> torch.Tensor | None:
    """The mask for n new tokens at positions store.length.. : causal over the full layout, by
    the position each slot holds over a ring window."""
    if store.window:
        return store.window_mask(n)[0, 0]
    return causal_mask(n, store.length + n, store.keys.device)


class CandidateTree:
    """One verification's candidates as a tree (SpecInfer, Sequoia): node 0 is the root, the
    newest committed token; every other node i is a draft token whose parent is parents[i] < i.
    A node sits at the root's position plus its depth and sees the committed prefix, its
    ancestors and itself. A chain (parents 0, 1, 2, ...) is the plain causal case."""

    def __init__(self, parents: list[int]):
        if parents[:1] != [-1] or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError(f"not a candidate tree (parents must precede children): {parents}")
        self.parents = list(parents)
        self.paths: list[list[int]] = []          # root .. node, for each node
        for i, p in enumerate(self.parents):
            self.paths.append([0] if i == 0 else self.paths[p] + [i])

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def chain(cls, n: int) -> "CandidateTree":
        return cls([-1] + list(range(n - 1)))

    def depths(self) -> list[int]:
        return [len(path) - 1 for path in self.paths]

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def positions(self, start: int, device) -> torch.Tensor:
        """[n] each node's position: the root's (`start`) plus its depth."""
        return torch.tensor(self.depths(), device=device) + start

    def mask(self, prefix: int, device) -> torch.Tensor:
        """[n, prefix + n] boolean: node i sees the prefix and the nodes on its path."""
        n = len(self)
        m = torch.zeros(n, prefix + n, dtype=torch.bool, device=device)
        m[:, :prefix] = True
        for i, path in enumerate(self.paths):
            m[i, [prefix + j for j in path]] = True
        return m
