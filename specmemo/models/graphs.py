"""CUDA graphs of our decoder's small steps (gpt-fast's "reduce-overhead" idea, by hand).

On a GPU a one-token step of a 1–7B model is bound by kernel launches, not by the GPU: measured
on an H200 (bench/gpu_step_profile.py), SmolLM2-1.7B spent 2.5 ms of GPU time in a 20 ms
forward. A CUDA graph replays a captured forward's ~1,000 kernels with one launch.

A graph needs fixed shapes and addresses, so graphed steps use LlamaModel.forward_static: K/V
written by index into the store's preallocated tensors, attention over every capacity slot
under a mask built on the device from the positions. One graph per (store, n) for n ≤
`max_tokens` (a decode step is n = 1, a verification n = k'+1), captured on first use into one
shared memory pool; prefill chunks and ring-window stores run eagerly. Exactness is unchanged:
the same engine decodes with and without drafts through the same graphed path.
"""

from dataclasses import dataclass

import torch

from specmemo.errors import BudgetExceeded
from specmemo.memory.kvstore import KVStore


_SIDE_STREAM = None


def _capture_stream():
    """One side stream for every warm-up and capture: cuBLAS keeps a workspace per stream (32 MiB
    on Hopper), and a stream per captured step cost that much each (measured on an H200)."""
    global _SIDE_STREAM
    if _SIDE_STREAM is None:
        _SIDE_STREAM = torch.cuda.Stream()
    return _SIDE_STREAM


@dataclass
class _Captured:
    store: KVStore         # held, so its id is never reused by another store while this lives
    graph: object          # torch.cuda.CUDAGraph, or None where capture is off (CPU tests)
    ids: torch.Tensor      # [1, n] static input
    positions: torch.Tensor  # [n] static input
    logits: torch.Tensor   # [1, n, V] static output


class GraphedForward:
    """forward(store, ids [1, n], logits_to_keep) like the model's, replaying CUDA graphs for
    n ≤ max_tokens on full-layout stores. capture=False runs forward_static without graphs (so the
    fixed-shape path is testable on a CPU)."""

    name = "specmemo"

    def __init__(self, model, max_tokens: int = 16, capture: bool = True):
        self.model, self.max_tokens, self.capture = model, max_tokens, capture
        self.steps: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0   # graphs captured so far (reported; each costs a warm-up and a capture)

    def __getattr__(self, name):  # nbytes, cfg, dtype, device...: the model's
        return getattr(self.model, name)

    def __call__(self, store: KVStore, ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        B, n = ids.shape
        if store.window or B != 1 or n > self.max_tokens:
            return self.model.forward(store, ids, logits_to_keep)
        start = store.length
        if start + n > store.capacity:
            raise BudgetExceeded(f"KV store full: {start} + {n} tokens > capacity {store.capacity}")
        step = self._step(store, ids, start)
        step.ids.copy_(ids)
        step.positions.copy_(torch.arange(start, start + n))
        if step.graph is None:
            step.logits = self.model.forward_static(store, step.ids, step.positions)
        else:
            step.graph.replay()
        store.length += n
        # A copy: the static output is overwritten by the next replay of any graph sharing the pool.
        return step.logits[:, -logits_to_keep:].clone()

    def warm(self, store: KVStore, max_tokens: int) -> None:
        """Capture the steps of 1..max_tokens tokens now (at allocation), not mid-generation.
        Capturing at the store's free slots is harmless: a slot beyond a query's position is
        masked, and every slot is rewritten by its real step before a query can see it."""
        if store.window or not self.capture:
            return
        for n in range(1, min(max_tokens, self.max_tokens) + 1):
            if store.length + n <= store.capacity:
                ids = torch.zeros(1, n, dtype=torch.long, device=store.keys.device)
                self._step(store, ids, store.length)

    def _step(self, store: KVStore, ids: torch.Tensor, start: int) -> _Captured:
        step = self.steps.get((id(store), ids.shape[1]))
        if step is None or step.store is not store:
            if not any(s.store is store for s in self.steps.values()):
                self._clear_tail(store)
            step = self.steps[(id(store), ids.shape[1])] = self._prepare(store, ids, start)
        return step

    @staticmethod
    def _clear_tail(store: KVStore) -> None:
        """Zero the slots no step has written yet. Attention reads every slot, and a masked slot
        weighs 0 only if it is finite: uninitialized memory can hold NaN bit patterns, and
        0 · NaN is NaN. (Slots written once stay finite; rejected ones are rewritten later.)"""
        store.keys[:, :, :, store.length:].zero_()
        store.values[:, :, :, store.length:].zero_()

    def _prepare(self, store: KVStore, ids: torch.Tensor, start: int) -> _Captured:
        n = ids.shape[1]
        step = _Captured(store, None, ids.clone(), torch.arange(start, start + n, device=ids.device), None)
        if not self.capture:
            return step
        # Warm up on a side stream (lazy kernel loading, cuBLAS workspaces), then capture. Both
        # write this step's K/V at its real positions, which the replay rewrites identically.
        side = _capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.forward_static(store, step.ids, step.positions)
        torch.cuda.current_stream().wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self.pool):
            step.logits = self.model.forward_static(store, step.ids, step.positions)
        self.captures += 1
        return step
