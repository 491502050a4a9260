"""CUDA graphs of our decoder's small steps (gpt-fast's "reduce-overhead" idea, by hand).

On a GPU a one-token step of a 1–7B model is bound by kernel launches, not by the GPU: measured
on an H200 (bench/gpu_step_profile.py), SmolLM2-1.7B spent 2.5 ms of GPU time in a 20 ms
forward. A CUDA graph replays a captured forward's ~1,000 kernels with one launch.

A graph needs fixed shapes and addresses, so graphed steps use LlamaModel.forward_static: K/V
written by index into the store's preallocated tensors, attention over every capacity slot
under a mask built on the device from the positions. One graph per (store, width): a target
has one width (below); a draft one per n ≤ `max_tokens`. Captured when the pipeline is assembled
(or on first use) into one shared memory pool; prefill chunks and ring-window stores run eagerly.

Exactness: a GPU's kernels are not row-invariant across shapes. cuBLAS picks another kernel for
a 6-row matmul than for a 1-row one, so a verified row rounds differently than the same token in a
one-token step, and in half precision that flipped greedy choices (measured on an H200: 10 of 128
tokens agreed between Llama-2-7B fp16 speculation and plain decoding). So a target's steps run at
one fixed width, `rows`: n ≤ rows new tokens are padded to rows by repeating the last token at the
last position. Every matmul, norm and attention then has one shape, and a row's result depends
only on its own token, position and visible keys. The padding rows recompute the last row exactly
and write the same K/V into its slot, so the duplicate write is harmless. Measured on the H200:
every engine then agreed 128/128 with plain decoding; a one-token step at 16 rows costs 1.3-1.4x
one at 1 row, almost all of it from 1 row to 2 (bench/results/history/gpu_row_widths_h200_2026-11-27.txt).
With graphs off (capture=False) the same fixed-width step runs eagerly.
"""

from dataclasses import dataclass

import torch

from specmemo.budget.plan import GRAPH_ROWS as ROWS  # one-token steps pay this width too
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
    n ≤ max_tokens on full-layout stores. rows: run every step of n ≤ rows tokens at that one width
    (a target's; see the module docstring), None: at its own n (a draft's rounding does not touch
    the output). capture=False runs forward_static without graphs (the fixed-shape path on a CPU)."""

    name = "specmemo"

    def __init__(self, model, max_tokens: int = 16, capture: bool = True, rows: int | None = None):
        self.model, self.capture, self.rows = model, capture, rows
        self.max_tokens = max(max_tokens, rows or 0)
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
        positions = torch.arange(start, start + n)
        if self.rows and n < self.rows:  # pad: the last token again, at the last position
            pad = self.rows - n
            ids = torch.cat([ids, ids[:, -1:].expand(1, pad)], dim=1)
            positions = torch.cat([positions, positions[-1:].expand(pad)])
        step = self._step(store, ids, start)
        step.ids.copy_(ids)
        step.positions.copy_(positions)
        if step.graph is None:
            step.logits = self.model.forward_static(store, step.ids, step.positions)
        else:
            step.graph.replay()
        store.length += n
        # A copy: the static output is overwritten by the next replay of any graph sharing the pool.
        return step.logits[:, n - logits_to_keep : n].clone()

    def warm(self, store: KVStore, max_tokens: int) -> None:
        """Capture the steps of 1..max_tokens tokens now (at allocation), not mid-generation.
        Capturing at the store's free slots is harmless: a slot beyond a query's position is
        masked, and every slot is rewritten by its real step before a query can see it."""
        if store.window or not self.capture:
            return
        widths = [self.rows] if self.rows else range(1, min(max_tokens, self.max_tokens) + 1)
        for n in widths:
            if store.length + (1 if self.rows else n) <= store.capacity:
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
        # Capture-time positions stay inside the store (a padded step may start at its last slot).
        positions = torch.arange(start, start + n, device=ids.device).clamp_(max=store.capacity - 1)
        step = _Captured(store, None, ids.clone(), positions, None)
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
