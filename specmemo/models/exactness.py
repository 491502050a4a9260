"""Row-exactness: a verified row computes exactly as a one-token step computes it.

Speculation is exact only if the target's logits for a candidate row do not depend on how many
rows the forward carries. Floating-point kernels break that quietly: a bf16 product over 1,536
inputs (the default model's down projection) rounds a row differently at 1 and at 6 rows in about
half of all inputs on the Zen 4 host, and half-precision attention of a query among n masked
ones rounds differently from that query alone. A greedy token then flips between verification
and plain decoding. This module holds what keeps every row exact on a CPU:

- products probed once on the loaded weights (RowExact.exactness): each matrix kind is left to
  its kernel where that is row-exact, else multiplied in input slices (split_product), else row
  by row in verification;
- attention in fp32 one query at a time over buffers laid out like the store (widen,
  attend_one), and candidate-tree nodes over their own branch (attend_tree); the compiled kernel
  (models/kernels/exact_attention.c) does the same reading each key once.

Shapes as in models/llama.py.
"""

import operator

import torch

import torch.nn.functional as F

from specmemo.memory.attention import CandidateTree
from specmemo.models.kernels.native import Rows

CAUSAL_ROWS = object()  # a mask marker: causal, each query attended on its own (see RowExact.attend)

SPLIT_INPUTS = 1024   # the widest inner dimension a split product multiplies at once (see exactness)


def split_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, n, in] @ w [in, out] as a sum of products over ≤ SPLIT_INPUTS inputs each, added in
    the compute dtype in a fixed order: rounds a row alike at every n where one product over all
    inputs did not (see RowExact.exactness)."""
    inputs = w.shape[0]
    pieces = -(-inputs // SPLIT_INPUTS)
    size = -(-inputs // pieces)
    out = x[..., :size] @ w[:size]
    for i in range(size, inputs, size):
        out = out + x[..., i : i + size] @ w[i : i + size]
    return out


def row_exact(multiply, x: torch.Tensor, w) -> bool:
    """multiply(x, w) for x [1, n, in] equals each row multiplied alone, as a one-token step has it:
    a [1, 1, in] tensor of its own (a slice would keep the wide tensor's row stride)."""
    alone = [multiply(x[:, i : i + 1].clone(memory_format=torch.contiguous_format), w) for i in range(x.shape[1])]
    return torch.equal(multiply(x, w), torch.cat(alone, dim=1))


def exact_on_probes(multiply, w, dtype: torch.dtype, device, widths=(2, 6) * 5) -> bool:
    """row_exact on random inputs in `dtype`, one per width (the same inputs on every call). Each
    new width costs the CPU kernel library a cached primitive (0.7 MB measured): a few widths,
    varied values (a kernel that is not row-exact shows it in about half the inputs)."""
    gen = torch.Generator(device).manual_seed(0)
    return all(row_exact(multiply, torch.randn(1, rows, w.shape[0], generator=gen, device=device).to(dtype), w)
               for rows in widths)


KINDS = {"qkv": "w_qkv", "o": "w_o", "gate_up": "w_gate_up", "down": "w_down"}   # matrix kind -> Layer field


class RowExact:
    """The exactness half of LlamaModel (models/llama.py): its products and row-exact attention.
    Expects the model's cfg, dtype, device, layers, head, scale, row_exact_tokens, _widened and
    _exactness."""

    def _native_attention(self):
        if not self.row_exact_tokens or self.device.type != "cpu":
            return None
        from specmemo.models.kernels import native

        cfg = self.cfg
        if not self.kernels.native_attention or not native.ExactAttention.fits(
                cfg.head_dim, self.row_exact_tokens, cfg.num_heads // cfg.num_kv_heads):
            return None
        return native.exact_attention()

    @property
    def attention_path(self) -> str | None:
        """How row-exact (half-precision) attention runs: "native" (the compiled kernel), "torch"
        (one query at a time), None where attention need not be row-exact (fp32)."""
        if not self.row_exact_tokens:
            return None
        return "native" if self.attention_kernel is not None else "torch"

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
        """q [B, H, n, D] over keys/values [B, Hkv, S, D] (the last n are the queries' own) -> [B, H, n, D].
        mask: additive [n, S], None, CAUSAL_ROWS or a CandidateTree (see `forward`)."""
        n, H, Hkv = q.shape[2], q.shape[1], keys.shape[1]
        tree = isinstance(mask, CandidateTree)
        causal_rows = mask is CAUSAL_ROWS or (n == 1 and mask is None and self.row_exact_tokens)
        if (tree or causal_rows) and self.attention_kernel is not None:
            S = keys.shape[2]
            key = (id(mask), S, n)
            if key not in self._rows:
                self._rows[key] = Rows.tree(S - n, mask.paths) if tree else Rows.causal(S, n)
            if not self.attention_kernel.reads(keys.dtype):
                keys, values = self.widen(keys, values)
            out = self.attention_kernel.attend(q, keys, values, self._rows[key], self.scale)   # [B, n, H, D]
            return out.to(q.dtype).transpose(1, 2)
        if tree:
            return self.attend_tree(q, keys, values, mask)
        if causal_rows:
            # Query i sees keys[:S - n + i + 1], attended exactly as a one-token step would.
            keys, values = self.widen(keys, values)
            S = keys.shape[2]
            rows = [self.attend_one(q[:, :, i : i + 1], keys[:, :, : S - n + i + 1], values[:, :, : S - n + i + 1])
                    for i in range(n)]
            return rows[0] if n == 1 else torch.cat(rows, dim=2)
        if keys.dtype != q.dtype:  # a narrower KV store (--kv-dtype): widen one layer at a time
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                              enable_gqa=Hkv != H)

    def widen(self, keys: torch.Tensor, values: torch.Tensor, copy: bool = False,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values [B, Hkv, S, D] (views of the store) in fp32, copied into two
        buffers laid out like the store and kept for every layer and step (the plan's
        fp32_attention): a fresh 0.8 MB tensor per layer cost 160 µs in page faults where the copy takes
        11. A verification's rows then attend over slices with the strides a one-token step's
        have (a matmul may take another path on other strides, and round otherwise). rows: only
        these batch rows are copied and returned (the buffers still cover the whole batch)."""
        if keys.dtype == torch.float32 and values.dtype == torch.float32 and not copy:
            return keys[rows], values[rows]   # copy: the caller writes into what it gets (attend_tree)
        B, Hkv, S, D = keys.shape
        slots = keys.stride(1) // D
        layout = (Hkv * slots * D, slots * D, D, 1)
        if keys.stride() != layout or values.stride() != layout:  # not a store view: a one-off copy
            return keys[rows].to(torch.float32, copy=True), values[rows].to(torch.float32, copy=True)
        spec = (B, Hkv, slots, D, keys.device)
        if self._widened.get("spec") != spec:
            self._widened = {}   # the old buffers go before the new ones come
            self._widened = {"spec": spec, "bufs": [torch.empty(B, Hkv, slots, D, device=keys.device)
                                                    for _ in range(2)]}
        kb, vb = self._widened["bufs"]
        return kb[rows, :, :S].copy_(keys[rows]), vb[rows, :, :S].copy_(values[rows])

    def attend_tree(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    tree: CandidateTree) -> torch.Tensor:
        """Each node of a candidate tree attended exactly as a one-token step on its own branch
        would: q [B, H, n, D]; keys/values [B, Hkv, S, D] (the prefix, then the n nodes in tree
        order). The node's ancestors are copied behind the prefix in fp32 (≤ depth rows) so it
        attends over one contiguous run of keys, as decoding that branch would."""
        n = q.shape[2]
        prefix = keys.shape[2] - n
        new_k, new_v = keys[:, :, prefix:].float(), values[:, :, prefix:].float()     # [B, Hkv, n, D]
        kb, vb = self.widen(keys, values, copy=True)
        rows = []
        for i, path in enumerate(tree.paths):
            end = prefix + len(path)
            kb[:, :, prefix:end] = new_k[:, :, path]
            vb[:, :, prefix:end] = new_v[:, :, path]
            rows.append(self.attend_one(q[:, :, i : i + 1], kb[:, :, :end], vb[:, :, :end]))
        return torch.cat(rows, dim=2)

    def attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One query per head over S keys, in fp32: q [B, H, 1, D], keys/values [B, Hkv, S, D]
        fp32 (see `widen`) -> [B, H, 1, D] in q's dtype. For half precision: torch's CPU flash
        kernel took 172 µs per bf16 call at S = 300 (1,063 at 2,000) where this takes 63 (224),
        and both one-token steps and verified rows go through it, so they round alike."""
        B, H, _, D = q.shape
        Hkv = keys.shape[1]
        # bmm on [B·Hkv, ...] views: what a 4-D matmul runs, without its reshaping (7 µs a call).
        qg = q.reshape(B * Hkv, H // Hkv, D).float()                   # [B·Hkv, H/Hkv, D]: a group's queries
        scores = torch.bmm(qg, keys.flatten(0, 1).transpose(1, 2)).mul_(self.scale)   # [B·Hkv, H/Hkv, S]
        out = torch.bmm(torch.softmax(scores, dim=-1), values.flatten(0, 1))          # [B·Hkv, H/Hkv, D]
        return out.to(q.dtype).reshape(B, H, 1, D)

    def product(self, x: torch.Tensor, w, kind: str) -> torch.Tensor:
        """x [B, n, in] @ w [in, out], rounded per row as a one-token step rounds it (half precision
        on a CPU, see `exactness`): a kind marked "split" is multiplied in slices of its inputs at
        every width (one-token steps included); a kind marked "rows" one row at a time in
        verification."""
        how = self.exactness.get(kind)
        if how is None and not isinstance(w, torch.Tensor):   # packed (models/quant.py): its kernel, directly
            return w.times(x)
        if how == "split":
            return split_product(x, w)
        if how == "rows" and 1 < x.shape[1] <= self.row_exact_tokens:
            # Each row as the very call a one-token step makes: a fresh [B, 1, in] with its strides
            # (a slice keeps the wide tensor's row stride, and MKL's fp16 product rounded
            # otherwise at that leading dimension on an AMX host; a strided [B, 1, in] slice took
            # a batched matmul that copied the weight).
            return torch.cat([x[:, i : i + 1].clone(memory_format=torch.contiguous_format) @ w
                              for i in range(x.shape[1])], dim=1)
        return x @ w

    @property
    def exactness(self) -> dict[str, str]:
        """How each matrix kind keeps a verified row equal to the same row alone, found once by
        probing the loaded weights with random inputs of 2 and 6 rows, each product against its rows
        multiplied alone: absent when the kernel is row-exact; "split" when it is not but the
        product in slices of SPLIT_INPUTS inputs is; "rows" otherwise. On the Zen 4 host, bf16
        with 1,536 inputs (the down projection) rounded differently in about half of the probes,
        and never with ≤ 1,024 inputs (bench/weight_layout.py): split, its one-token step costs
        1.3 ms more per token and a 6-token verification 10 less than row by row. int4 and fp16
        never needed either. Only half precision on a CPU: a GPU target runs at a fixed width
        (models/graphs.py), and fp32 is left to its precision (see README)."""
        if self._exactness is None:
            found = {}
            if self.row_exact_tokens and self.device.type == "cpu":
                kinds = {kind: getattr(self.layers[0], attr) for kind, attr in KINDS.items()} | {"head": self.head}
                for kind, w in kinds.items():
                    widths = (2, 6) if kind == "head" else (2, 6) * 5
                    if not exact_on_probes(operator.matmul, w, self.dtype, self.device, widths):
                        splits = isinstance(w, torch.Tensor) and w.shape[0] > SPLIT_INPUTS
                        found[kind] = "split" if splits and exact_on_probes(
                            split_product, w, self.dtype, self.device, widths) else "rows"
            self._exactness = found
        return self._exactness

