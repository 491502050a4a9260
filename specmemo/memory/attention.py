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
