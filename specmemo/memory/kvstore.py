"""KV stores: each model's keys and values, allocated once from the plan.

A store is one tensor per K and V, shaped [layers, batch, kv_heads, capacity, head_dim]
(capacity = the context for the target, W + k + 1 for a windowed draft). Appending writes in
place; rejecting candidates moves `length` back (trim), so nothing is freed, nothing copied.

Two layouts:
  * full: slot s holds position s. Attention sees keys[..., :length] only, never empty capacity.
  * window (ring): slot s holds the most recent position p with p % capacity == s. It keeps at
    least the W most recent tokens; keys keep their original (RoPE) positions, and `slot_pos`
    tells the attention mask which position each slot holds.
"""

from dataclasses import dataclass

import torch

from specmemo.errors import BudgetExceeded


@dataclass(frozen=True)
class KVShape:
    layers: int
    batch: int
    kv_heads: int
    head_dim: int
    capacity: int

    def nbytes(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * self.batch * self.kv_heads * self.capacity * self.head_dim * elem


class KVStore:
    """Fixed-size KV storage for one model. Only this class allocates KV memory."""

    def __init__(self, shape: KVShape, dtype: torch.dtype, device: torch.device | str, window: bool = False,
                 _views: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.shape, self.window = shape, window
        dims = (shape.layers, shape.batch, shape.kv_heads, shape.capacity, shape.head_dim)
        if _views is not None:  # a row of a batch store (see `row`): its storage, not new memory
            self.keys, self.values = _views
        else:
            # torch.empty: pages are only touched as tokens arrive, so resident memory tracks use.
            self.keys = torch.empty(dims, dtype=dtype, device=device)
            self.values = torch.empty(dims, dtype=dtype, device=device)
        # Position held by each slot, -1 for none; only the ring layout needs it for its mask.
        self.slot_pos = torch.full((shape.capacity,), -1, dtype=torch.long, device=device) if window else None
        self.parent: KVStore | None = None   # the batch store this is a row of (see `row`)
        self.batch_row = 0
        self.length = 0  # tokens committed: the next token goes to position `length`
        self.touched = 0  # slots written at least once: what of the store is resident (torch.empty)
        self.first_valid = 0  # positions before this were skipped (ring layout jumps)
        self._pending = 0  # tokens written by the forward in progress, committed by `advance`

    def row(self, b: int) -> "KVStore":
        """Sequence b of a batch store as a store of its own: views of its slots, with its own
        length, so each row appends, trims and keeps branches independently (vLLM's per-request
        slots: a rejection in one row is that row's pointer move, nothing is re-padded)."""
        if self.window:
            raise ValueError("batch rows need the full store layout")
        shape = KVShape(self.shape.layers, 1, self.shape.kv_heads, self.shape.head_dim, self.shape.capacity)
        row = KVStore(shape, self.keys.dtype, self.keys.device,
                      _views=(self.keys[:, b : b + 1], self.values[:, b : b + 1]))
        row.parent, row.batch_row = self, b
        return row

    @property
    def capacity(self) -> int:
        return self.shape.capacity

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def data_ptrs(self) -> tuple[int, int]:
        return self.keys.data_ptr(), self.values.data_ptr()

    # -- the write path, called once per layer by the adapter ------------------------------------

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, H, n, D] at positions length..length+n; return what attention sees."""
        n = k.shape[-2]
        start = self.length
        if not self.window:
            self.claim(n)
            self.keys[layer, :, :, start:start + n].copy_(k)
            self.values[layer, :, :, start:start + n].copy_(v)
            return self.keys[layer, :, :, :start + n], self.values[layer, :, :, :start + n]
        if n > self.capacity:
            raise BudgetExceeded(f"{n} tokens do not fit a draft window of {self.capacity} slots")
        for src, dst in self._ring_spans(start, n):
            self.keys[layer, :, :, dst].copy_(k[:, :, src])
            self.values[layer, :, :, dst].copy_(v[:, :, src])
        self._pending = n
        visible = min(self.capacity, start + n)
        self.touched = max(self.touched, visible)
        return self.keys[layer, :, :, :visible], self.values[layer, :, :, :visible]

    def claim(self, n: int) -> int:
        """Full layout: reserve positions length..length+n for the forward in progress (its writer
        fills them in every layer; `advance` commits them). Returns the first position."""
        if self.length + n > self.capacity:
            raise BudgetExceeded(f"KV store full: {self.length} + {n} tokens > capacity {self.capacity}")
        self._pending = n
        self.touched = max(self.touched, self.length + n)
        return self.length

    def _ring_spans(self, start: int, n: int):
        """(source slice, destination slice) pairs for writing n tokens from `start`, wrapping once."""
        s = start % self.capacity
        first = min(n, self.capacity - s)
        yield slice(0, first), slice(s, s + first)
        if first < n:
            yield slice(first, n), slice(0, n - first)

    def window_mask(self, n: int) -> torch.Tensor:
        """Boolean mask [1, 1, n, visible] for n queries at positions length..length+n, ring layout."""
        start = self.length
        pos = self.slot_pos.clone()
        for src, dst in self._ring_spans(start, n):
            pos[dst] = torch.arange(start + src.start, start + src.stop, device=pos.device)
        visible = min(self.capacity, start + n)
        q = torch.arange(start, start + n, device=pos.device)[:, None]
        kv = pos[:visible][None, :]
        return ((kv >= 0) & (kv <= q))[None, None]

    # -- bookkeeping after a forward --------------------------------------------------------------

    def advance(self) -> None:
        """Commit what the last forward wrote."""
        if self.window:
            for src, dst in self._ring_spans(self.length, self._pending):
                self.slot_pos[dst] = torch.arange(self.length + src.start, self.length + src.stop,
                                                  device=self.slot_pos.device)
        self.length += self._pending
        self._pending = 0

    def keep_branch(self, start: int, path: list[int]) -> None:
        """After a candidate tree's verification wrote its nodes in tree order at start.. : move
        the accepted branch (node indices, root first, each greater than the one before) to
        consecutive slots start, start + 1, ... A copy of ≤ depth tokens per layer, in place;
        the caller then trims past the branch. Full layout only."""
        for j, node in enumerate(path):
            if node != j:  # node > j: its source slot is never a destination already written
                self.keys[:, :, :, start + j].copy_(self.keys[:, :, :, start + node])
                self.values[:, :, :, start + j].copy_(self.values[:, :, :, start + node])

    def trim(self, length: int) -> None:
        """Forget every position ≥ length (rejected candidates): a pointer move."""
        if length >= self.length:
            return
        if self.window:
            # Slots of forgotten positions now hold stale data; hide them from the mask.
            self.slot_pos[self.slot_pos >= length] = -1
        self.length = max(0, length)
        self.first_valid = min(self.first_valid, self.length)

    def reset(self) -> None:
        self.trim(0)
        self.first_valid = 0

    def release(self, start: int) -> int:
        """Give the pages holding positions ≥ start back to the OS (CPU only; their content is
        stale anyway). Resident memory then tracks what a smaller context needs: a store is
        allocated once, and this is how chat shrinks into a budget it overran. Returns bytes freed."""
        if self.keys.device.type != "cpu" or start >= self.capacity or not self.keys.is_contiguous():
            return 0
        self.trim(start)
        self.touched = min(self.touched, start)
        return sum(_dontneed(t, start) for t in (self.keys, self.values))

    def jump(self, position: int) -> None:
        """Ring layout: continue at `position`, treating everything before it as out of the window."""
        self.slot_pos.fill_(-1)
        self.length = self.first_valid = position

    def safe_chunk(self, window: int) -> int:
        """Ring layout: most tokens one forward may write without overwriting keys its own first
        query still needs (its min(window, history) predecessors)."""
        return max(1, self.capacity - min(window, self.length - self.first_valid))


_PAGE = 4096


def _dontneed(t: torch.Tensor, start: int) -> int:
    """madvise(MADV_DONTNEED) the whole pages of every [.., start:, :] row of a CPU store tensor
    [layers, batch, heads, capacity, head_dim]: anonymous pages read back as zeros later."""
    import ctypes

    from specmemo.memory.malloc import libc

    c = libc()
    if c is None:
        return 0
    row = t.shape[-2] * t.shape[-1] * t.element_size()
    first = start * t.shape[-1] * t.element_size()
    freed = 0
    for r in range(t.numel() * t.element_size() // row):
        lo = t.data_ptr() + r * row + first
        hi = t.data_ptr() + (r + 1) * row
        lo = (lo + _PAGE - 1) // _PAGE * _PAGE
        hi = hi // _PAGE * _PAGE
        if hi > lo and c.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0:  # 4: MADV_DONTNEED
            freed += hi - lo
    return freed
