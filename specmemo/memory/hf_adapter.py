"""Every contact with transformers' internal API (Cache, layers, masks) lives here.

transformers 5.x models call `cache.update(k, v, layer_idx)` in each attention layer and ask
`get_seq_length` / `get_mask_sizes` / `get_query_offset` to build the causal mask. We answer
from a KVStore, so the model writes straight into preallocated memory. The next transformers
release that changes this contract should need a fix in this file only.
"""

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import sdpa_mask

from specmemo.errors import UnsupportedModel
from specmemo.memory.attention import causal_mask
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


@torch.inference_mode()
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


class AdapterForward:
    """A transformers model behind the same call as our own decoder:
    forward(store, ids [B, n], logits_to_keep) -> fp32 logits [B, keep, V]."""

    name = "transformers"

    def __init__(self, model):
        self.model = model
        self.caches: dict[int, StoreCache] = {}
        prepare(model)

    def __call__(self, store: KVStore, ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        cache = self.caches.get(id(store))
        if cache is None or cache.store is not store:
            cache = self.caches[id(store)] = StoreCache(store)
        return forward(self.model, store, cache, ids, logits_to_keep)


ATTENTION = "specmemo_sdpa"


def _gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA path expands grouped-query K/V to every head (repeat_kv) whenever a mask
    is present, i.e. in every chunked prefill and every verification: 2·heads·context·head_dim
    bytes per layer, 17 MiB at 4k tokens on SmolLM2, and twice the time. torch's SDPA does GQA
    natively with enable_gqa, so we call it directly. query: [B, H, q, D]; key/value: [B, Hkv, kv, D]."""
    if key.dtype != query.dtype:  # a KV store narrower than the compute dtype (--kv-dtype): widen per layer
        key, value = key.to(query.dtype), value.to(query.dtype)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = False
    if attention_mask is None and q_len > 1:
        if kv_len == q_len:
            causal = True
        else:  # queries are the last q_len positions: bottom-right aligned causal mask
            attention_mask = causal_mask(q_len, kv_len, query.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _gqa_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def unsupported_reason(config) -> str | None:
    """Attention features our attention function does not implement. transformers would pass them
    as keyword arguments that `_gqa_sdpa` ignores, silently changing the model's output."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False \
            and window < getattr(config, "max_position_embeddings", window + 1):
        return f"sliding-window attention ({window} tokens)"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "sliding-window attention in some layers"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            return f"logit soft-capping ({name} = {getattr(config, name)})"
    if getattr(config, "model_type", "") == "gpt_oss" or getattr(config, "attention_sinks", None):
        return "attention sinks"
    return None


def check_supported(config, name: str) -> None:
    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModel(f"{name} uses {reason}, which specmemo's attention does not implement yet")


def attention_implementation() -> str:
    return ATTENTION


def prepare(model) -> None:
    """Route the model's attention through `_gqa_sdpa` (fused, no K/V expansion; accepts our
    boolean window masks)."""
    if getattr(model.config, "_attn_implementation", None) != ATTENTION:
        model.set_attn_implementation(ATTENTION)
