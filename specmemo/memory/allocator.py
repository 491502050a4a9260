"""The allocator: turns a Plan into KV stores, once. Nothing else allocates KV memory."""

import torch

from specmemo.budget.arch import Arch
from specmemo.budget.plan import Plan
from specmemo.memory.kvstore import KVShape, KVStore


def _shape(arch: Arch, batch: int, capacity: int) -> KVShape:
    return KVShape(arch.num_layers, batch, arch.num_kv_heads, arch.head_dim, capacity)


def allocate_target(plan: Plan, dtype: torch.dtype, device) -> KVStore:
    """Capacity = the context: the engine drafts at most room − 1 tokens, so candidates fit inside it."""
    req = plan.request
    return KVStore(_shape(req.target, req.batch, plan.target_capacity), dtype, device)


def allocate_draft(plan: Plan, dtype: torch.dtype, device) -> KVStore:
    """Capacity = W + k + 1. A window smaller than the context becomes a ring (see KVStore)."""
    req = plan.request
    windowed = req.draft_window < req.context
    return KVStore(_shape(req.draft, req.batch, plan.draft_capacity), dtype, device, window=windowed)
