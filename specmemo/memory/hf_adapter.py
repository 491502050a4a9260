"""Every contact with transformers' internal API (Cache, layers, masks) lives here.

transformers 5.x models call `cache.update(k, v, layer_idx)` in each attention layer and ask
`get_seq_length` / `get_mask_sizes` / `get_query_offset` to build the causal mask. We answer
from a KVStore, so the model writes straight into preallocated memory. The next transformers
release that changes this contract should need a fix in this file only.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from specmemo.memory.kvstore import KVStore


class _StoreLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, store: KVStore, index: int):
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # storage exists from the start
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.store.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.length

    def get_max_length(self) -> int:
        return self.store.capacity


class StoreCache(Cache):
    """A transformers Cache view over one KVStore."""

    def __init__(self, store: KVStore):
        super().__init__(layers=[_StoreLayer(store, i) for i in range(store.shape.layers)])
        self.store = store


def forward(model, store: KVStore, cache: StoreCache, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Run `input_ids` [B, n] at positions store.length.. and commit them to the store.

    Returns fp32 logits [B, logits_to_keep, V] for the last positions only.
    """
    n = input_ids.shape[1]
    positions = torch.arange(store.length, store.length + n, device=input_ids.device)[None]
    # The ring layout (draft window) gets its own mask; the full layout uses transformers' causal mask.
    mask = store.window_mask(n) if store.window else None
    out = model(input_ids=input_ids, position_ids=positions, cache=cache, attention_mask=mask,
                use_cache=True, logits_to_keep=logits_to_keep)
    store.advance()
    return out.logits.float()


def attention_implementation() -> str:
    """SDPA: fused kernels on CPU and CUDA, and it accepts our boolean window masks."""
    return "sdpa"
