"""specmemo's own decoder for the Llama family, gpt-fast style: one config, one stack, K/V written
straight into a KVStore, attention with an explicit mask and explicit positions.

Covers Llama 2 / 3.x (RoPE scaling: linear and llama3), Mistral without a sliding window,
Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), SmolLM2, TinyLlama and Vicuna.
Weights live in the layout decoding wants on the device: on a CPU every matrix is stored
transposed ([in, out]; `x @ w` splits its columns across cores, see layout.py), q/k/v are fused
into one matrix and gate/up into another, so a layer is four matmuls. Numerics follow
transformers' modeling code (fp32 RMSNorm statistics, rotate-half RoPE, SDPA with the model's
scale), so the two agree to rounding.

Shapes: B = batch, n = new tokens in this forward, S = keys visible to attention, H / Hkv =
query / key-value heads, D = head_dim, E = hidden size, I = intermediate size, V = vocabulary.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specmemo.budget.devices import Kernels
from specmemo.budget.footprint import ROW_EXACT_TOKENS
from specmemo.memory.attention import CandidateTree, attention_mask
from specmemo.memory.kvstore import KVStore
from specmemo.models.exactness import CAUSAL_ROWS, RowExact
from specmemo.models.layout import out_major as layout_out_major

FAMILY = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int            # E
    intermediate_size: int      # I
    num_layers: int
    num_heads: int              # H
    num_kv_heads: int           # Hkv (grouped-query attention when < H)
    head_dim: int               # D
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None   # {"rope_type": "linear" | "llama3", ...}; None for plain RoPE
    tie_embeddings: bool
    qkv_bias: bool              # Qwen2
    qk_norm: bool               # Qwen3

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        model_type = cfg.get("model_type", "llama")
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")), qk_norm=model_type == "qwen3",
        )


def unsupported_reason(cfg: dict) -> str | None:
    """Why our decoder cannot run this config (then the transformers adapter does)."""
    if cfg.get("model_type") not in FAMILY:
        return f"model type {cfg.get('model_type')!r} is not in the Llama family"
    if cfg.get("model_type") == "mistral" and cfg.get("sliding_window"):
        return "Mistral with a sliding window"
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        return f"RoPE scaling {kind!r}"
    if cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        return "an MLP other than SwiGLU without bias"
    return None


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """[D/2] inverse frequencies, with linear or llama3 scaling (Llama 3.1 paper, §3; the same
    arithmetic as transformers' modeling_rope_utils)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., E]. Statistics in fp32 whatever the dtype, as transformers does. Divided by a
    sqrt rather than multiplied by rsqrt: sqrt and division are correctly rounded in scalar and
    vector code alike, while rsqrt's vector and scalar paths (n rows vs one) can differ by an ulp,
    which in bf16 flipped greedy tokens between verification and plain decoding."""
    xf = x.float()
    xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Layer:
    """One decoder block's weights, in decoding layout (see the module docstring)."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype, device, matrix):
        """matrix(n_in, n_out): an empty [n_in, n_out] operand in the model's layout (LlamaModel.matrix)."""
        E, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * D
        empty = lambda *shape: torch.empty(shape, dtype=dtype, device=device)
        self.attn_norm = empty(E)
        self.w_qkv = matrix(E, qkv)                    # [E, (H + 2·Hkv)·D]
        self.b_qkv = empty(qkv) if cfg.qkv_bias else None
        self.q_norm = empty(D) if cfg.qk_norm else None
        self.k_norm = empty(D) if cfg.qk_norm else None
        self.w_o = matrix(cfg.num_heads * D, E)        # [H·D, E]
        self.mlp_norm = empty(E)
        self.w_gate_up = matrix(E, 2 * I)              # [E, 2·I]: gate columns, then up columns
        self.w_down = matrix(I, E)                     # [I, E]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds (a packed matrix, models/quant.py, contributes its parts)."""
        out = []
        for t in vars(self).values():
            out.extend([t] if isinstance(t, torch.Tensor) else t.tensors() if hasattr(t, "tensors") else [])
        return out


class LlamaModel(RowExact):
    """The whole decoder. `forward` runs n new tokens against a KVStore and returns fp32 logits."""

    name = "specmemo"

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, device="cpu",
                 out_major: bool | None = None, kernels: Kernels = Kernels()):
        """out_major: store each matrix [out, in] and multiply by its transposed view (torch's
        Linear layout) instead of [in, out] contiguous; None: as `kernels` (this machine's device
        profile, decided by the caller) has it for this dtype (layout.out_major)."""
        self.cfg, self.dtype, self.device, self.kernels = cfg, dtype, torch.device(device), kernels
        self.out_major = layout_out_major(dtype, self.device, kernels) if out_major is None else out_major
        E, V = cfg.hidden_size, cfg.vocab_size
        self.layers = [Layer(cfg, dtype, device, self.matrix) for _ in range(cfg.num_layers)]
        self.norm = torch.empty(E, dtype=dtype, device=device)
        self.head = self.matrix(E, V)                                 # [E, V]; the embedding when tied
        self.embed = self.head if cfg.tie_embeddings else self.matrix(E, V)
        self.inv_freq = rope_inv_freq(cfg).to(device)               # [D/2] fp32
        half = cfg.head_dim // 2
        self.swap_halves = torch.cat([torch.arange(half, 2 * half), torch.arange(half)]).to(device)   # [D]
        self.scale = cfg.head_dim ** -0.5
        # Half-precision attention is not row-invariant: a query attended among n > 1 (masked) can
        # round differently than the same query alone, and that flips greedy choices between a
        # verification and plain decoding. Up to this many new tokens (verification-sized), each
        # causal query then attends exactly as a one-token step would (see `attention`).
        self.row_exact_tokens = ROW_EXACT_TOKENS if dtype in (torch.bfloat16, torch.float16) else 0
        # Those queries attend through the compiled kernel (models/kernels/native.py) where the device
        # profile measured it faster and it builds here: each key read once for all rows, each
        # row still rounding as a one-token step. Every row-exact attention in a run takes the
        # same path, one-token steps included; set to None before the first forward to use torch's.
        self.attention_kernel = self._native_attention()
        self._rows: dict = {}      # this forward's Rows per (mask, keys) for the kernel (see `attend`)
        self._widened: dict = {}   # fp32 copies of one layer's K/V for that attention (see `widen`)
        self._exactness: dict[str, str] | None = None   # probed on first use (see `exactness`)
        self.last_hidden: torch.Tensor | None = None     # [B, keep, E] of the last forward (see _stack)
        # Layers whose outputs a draft head also reads (its card says which): their kept rows,
        # [B, keep, E] each in this order, in `layer_hidden` after every forward.
        self.feature_layers: tuple[int, ...] = ()
        self.layer_hidden: list[torch.Tensor] = []

    @property
    def products_path(self) -> str:
        """Which kernels multiply the matrices: "compiled" where the row-exact products of
        models/kernels/row_matmul.c hold the q4 layers or the head (quant.NativeQ4, NativeHead), else "torch"."""
        from specmemo.models.quant import NativeHead, NativeQ4

        mats = [self.head, self.layers[0].w_qkv] if self.layers else [self.head]
        return "compiled" if any(isinstance(m, (NativeQ4, NativeHead)) for m in mats) else "torch"

    def matrix(self, n_in: int, n_out: int) -> torch.Tensor:
        """An empty [n_in, n_out] operand for `x @ w`, in this model's layout."""
        if self.out_major:
            return torch.empty(n_out, n_in, dtype=self.dtype, device=self.device).t()
        return torch.empty(n_in, n_out, dtype=self.dtype, device=self.device)

    def place(self, w: torch.Tensor) -> torch.Tensor:
        """A [out, in] matrix (as files store it) as this model's [in, out] operand."""
        w = w.to(self.dtype)
        return w.contiguous().t() if self.out_major else w.t().contiguous()

    def tensors(self) -> list[torch.Tensor]:
        own = [self.norm, self.head] + ([] if self.cfg.tie_embeddings else [self.embed]) + [self.inv_freq]
        own = [part for t in own for part in ([t] if isinstance(t, torch.Tensor) else t.tensors())]
        return own + [t for layer in self.layers for t in layer.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- pieces ---------------------------------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, n] -> [B, n, E], gathered from the transposed table."""
        # Contiguous: a transposed residual stream reduces in another order in RMSNorm than a
        # one-token step does, and half-precision rounding then parts verification from decoding.
        if not isinstance(self.embed, torch.Tensor):  # a packed head whose rows are read where kept
            return self.embed.rows(ids.reshape(-1)).reshape(*ids.shape, -1)
        if self.out_major:  # the table's rows are its storage rows: gather them directly
            return self.embed.t().index_select(0, ids.reshape(-1)).reshape(*ids.shape, -1)
        return self.embed.index_select(1, ids.reshape(-1)).t().contiguous().reshape(*ids.shape, -1)

    def head_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] -> the LM head's rows for those tokens [n, E] (what a draft head borrows)."""
        if not isinstance(self.head, torch.Tensor):
            return self.head.rows(ids)
        return self.head.t().index_select(0, ids.to(self.head.device))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [n] -> cos, and sin with its first half negated, [1, n, 1, D] in the compute
        dtype (heads broadcast): rotate_half(x) · sin = x[..., halves swapped] · that signed sin,
        bit for bit (negation is exact), in one indexing op instead of two slices, neg and cat."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        return torch.cat((cos, cos), dim=-1)[None, :, None], torch.cat((-sin, sin), dim=-1)[None, :, None]

    def attention(self, layer: Layer, index: int, x: torch.Tensor, segments: list, write, cos, sin) -> torch.Tensor:
        """x: [B, n, E] (normed) -> [B, n, E]. segments: (span, mask) per sequence whose tokens are
        x[:, span] (one segment covering all n for a single store; one per row of a batch, see
        `forward_rows`). write(index, k, v) puts this layer's K/V [B, Hkv, n, D] into the stores
        and returns, per segment, the keys/values its attention sees."""
        cfg = self.cfg
        B, n, _ = x.shape
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self.product(x, layer.w_qkv, "qkv")                     # [B, n, (H + 2·Hkv)·D]
        if layer.b_qkv is not None:
            qkv = qkv + layer.b_qkv
        qkv = qkv.view(B, n, H + 2 * Hkv, D)                          # [B, n, heads, D]: q, k, v heads
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv :]
        if layer.q_norm is not None:  # Qwen3: q and k normed per head, before RoPE
            qk = torch.cat([rms_norm(qk[:, :, :H], layer.q_norm, cfg.rms_eps),
                            rms_norm(qk[:, :, H:], layer.k_norm, cfg.rms_eps)], dim=2)
        qk = qk * cos + qk[..., self.swap_halves] * sin               # RoPE on q and k heads in one pass
        q = qk[:, :, :H].transpose(1, 2)                              # [B, H, n, D]
        k = qk[:, :, H:].transpose(1, 2)                              # [B, Hkv, n, D]
        v = v.transpose(1, 2)                                         # [B, Hkv, n, D]
        seen = write(index, k, v)
        outs = [self.attend(q[:, :, span], keys, values, mask) for (span, mask), (keys, values) in zip(segments, seen)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)   # [B, H, n, D]
        return self.product(out.transpose(1, 2).reshape(B, n, H * D), layer.w_o, "o")

    def mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n, E] (normed) -> [B, n, E]: SwiGLU."""
        gate, up = self.product(x, layer.w_gate_up, "gate_up").chunk(2, dim=-1)   # [B, n, I] each
        return self.product(F.silu(gate) * up, layer.w_down, "down")

    # -- the forward pass -----------------------------------------------------------------------

    def _stack(self, ids: torch.Tensor, positions: torch.Tensor, segments: list, write, keep) -> torch.Tensor:
        """ids [B, n] at positions [n] through every layer (segments, write: see `attention`);
        logits for the last `keep` rows (an int) or for the rows `keep` indexes (a [K] tensor)."""
        cos, sin = self.rope(positions)
        self._rows = {}
        h = self.embed_tokens(ids)                                    # [B, n, E]
        eps = self.cfg.rms_eps
        self.layer_hidden = []
        for i, layer in enumerate(self.layers):
            h = h + self.attention(layer, i, rms_norm(h, layer.attn_norm, eps), segments, write, cos, sin)
            h = h + self.mlp(layer, rms_norm(h, layer.mlp_norm, eps))
            if i in self.feature_layers:
                self.layer_hidden.append(h[:, -keep:] if isinstance(keep, int) else h[:, keep])
        # The kept rows' last hidden states, before the final norm: what a draft head reads.
        self.last_hidden = h[:, -keep:] if isinstance(keep, int) else h[:, keep]   # [B, keep, E]
        h = rms_norm(self.last_hidden, self.norm, eps)
        return self.product(h, self.head, "head").float()             # [B, keep, V]

    def additive(self, mask: torch.Tensor) -> torch.Tensor:
        """Boolean mask (True = attend) -> 0 / −inf in the compute dtype. Built once per forward:
        SDPA would otherwise convert a boolean mask in every layer (on a GPU, where a step is
        bound by kernel launches, that doubled a 6-token verification's time)."""
        return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def _placement(self, store: KVStore, n: int, device, positions=None, mask=None, tree=None):
        """Positions [n] and the attention mask for n new tokens of one sequence (see `forward`)."""
        if tree is not None:
            if store.window:
                raise ValueError("a candidate tree needs the full store layout, not a ring window")
            positions = tree.positions(store.length, device)
            mask = tree if self.row_exact_tokens else tree.mask(store.length, device)
        if positions is None:
            positions = torch.arange(store.length, store.length + n, device=device)
        if mask is None and not store.window and 1 < n <= self.row_exact_tokens:
            mask = CAUSAL_ROWS
        elif mask is None:
            mask = attention_mask(store, n)
        if isinstance(mask, torch.Tensor):
            mask = self.additive(mask)
        return positions, mask

    @torch.inference_mode()
    def forward(self, store: KVStore, ids: torch.Tensor, logits_to_keep: int = 1,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                tree: CandidateTree | None = None) -> torch.Tensor:
        """Run ids [B, n] at positions store.length.. (or `positions` [n]) and commit them to the store.

        mask: boolean [n, S] (True = attend) over the S keys attention sees after this write;
        None builds the causal one (or the ring window's). tree: the n tokens are a candidate
        tree (memory/attention.py), each at its depth's position, seeing its own branch; the store
        then holds them in tree order until the engine keeps one branch (KVStore.keep_branch).
        Returns fp32 logits [B, logits_to_keep, V].
        """
        n = ids.shape[1]
        positions, mask = self._placement(store, n, ids.device, positions, mask, tree)
        logits = self._stack(ids, positions, [(slice(0, n), mask)], lambda i, k, v: [store.write(i, k, v)],
                             logits_to_keep)
        store.advance()
        return logits

    @torch.inference_mode()
    def forward_rows(self, rows: list[KVStore], segments: list[list[int]], keep: list[int]) -> list[torch.Tensor]:
        """One forward over several sequences at once, each with its own store and length (rows of
        a batch store, KVStore.row): segments[b] are sequence b's new tokens (a prefill chunk, or
        its newest token and drafts), at its own positions; keep[b] of its last rows give logits.
        The tokens run packed, one after another ([1, Σn]), so every matmul covers the whole
        batch and no row is padded; attention runs per sequence over its own keys, exactly as
        `forward` on that store alone. Returns fp32 logits [keep[b], V] per sequence."""
        device = self.device
        spans, placed, kept, at = [], [], [], 0
        for store, ids, k in zip(rows, segments, keep):
            n = len(ids)
            positions, mask = self._placement(store, n, device)
            spans.append((slice(at, at + n), mask))
            placed.append(positions)
            kept.extend(range(at + n - k, at + n))
            at += n
        ids = torch.tensor([[t for seg in segments for t in seg]], dtype=torch.long, device=device)   # [1, Σn]
        positions = torch.cat(placed)                                                               # [Σn]
        parent = rows[0].parent
        if parent is None or any(r.parent is not parent for r in rows):
            raise ValueError("forward_rows runs rows of one batch store (KVStore.row)")
        write = self._batch_writer(parent, rows, spans, positions)
        logits = self._stack(ids, positions, spans, write, torch.tensor(kept, device=device))[0]     # [Σkeep, V]
        for store in rows:
            store.advance()
        return list(logits.split(keep))

    def _batch_writer(self, parent: KVStore, rows: list[KVStore], spans: list, positions: torch.Tensor):
        """write(index, k, v) for rows of one batch store: every row's new K/V [1, Hkv, Σn, D] go
        into the batch store in one indexed copy per layer, and for attention that rounds as a
        one-token step (half precision) the batch's keys are widened to fp32 in one copy too;
        each row then sees its own slice, laid out as a store of its own (bitwise the values and
        strides a single-sequence forward attends over)."""
        rows_of = torch.cat([torch.full((span.stop - span.start,), r.batch_row, dtype=torch.long)
                             for r, (span, _) in zip(rows, spans)]).to(positions.device)          # [Σn]
        ends = [r.claim(span.stop - span.start) + span.stop - span.start for r, (span, _) in zip(rows, spans)]
        S = max(ends)                                                                   # keys any row sees
        # rows that attend one query at a time over fp32 keys (see `attend`)
        kernel = self.attention_kernel
        widened = [bool(self.row_exact_tokens) and (m is CAUSAL_ROWS or m is None)
                   and not (kernel is not None and kernel.reads(parent.keys[0].dtype)) for _, m in spans]
        lo, hi = min(r.batch_row for r in rows), max(r.batch_row for r in rows) + 1   # the batch rows in use

        def write(index: int, k: torch.Tensor, v: torch.Tensor):
            keys, values = parent.keys[index], parent.values[index]                 # [B, Hkv, capacity, D]
            keys[rows_of, :, positions] = k[0].transpose(0, 1).to(keys.dtype)       # [Σn, Hkv, D]
            values[rows_of, :, positions] = v[0].transpose(0, 1).to(values.dtype)
            wide = self.widen(keys[:, :, :S], values[:, :, :S], rows=slice(lo, hi)) if any(widened) else None
            out = []
            for r, end, wider in zip(rows, ends, widened):
                b = r.batch_row - lo
                if wider:
                    out.append((wide[0][b : b + 1, :, :end], wide[1][b : b + 1, :, :end]))
                else:
                    out.append((keys[r.batch_row : r.batch_row + 1, :, :end], values[r.batch_row : r.batch_row + 1, :, :end]))
            return out

        return write

    @torch.inference_mode()
    def forward_static(self, store: KVStore, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The same step with shapes fixed by n alone, for CUDA graphs (models/graphs.py): ids [B, n]
        at positions [n] (a device tensor) are written into a full-layout store by index, and
        attention runs over all capacity slots, masked on the device (slot s is visible to the
        query at position p iff s ≤ p). Commits nothing: the caller moves store.length.
        Returns fp32 logits [B, n, V]."""
        slots = torch.arange(store.capacity, device=ids.device)
        mask = torch.zeros(positions.shape[0], store.capacity, dtype=self.dtype, device=ids.device)
        mask.masked_fill_(slots[None, :] > positions[:, None], float("-inf"))    # [n, capacity]

        def write(index: int, k: torch.Tensor, v: torch.Tensor):
            keys, values = store.keys[index], store.values[index]             # [B, Hkv, capacity, D]
            keys.index_copy_(2, positions, k.to(keys.dtype))
            values.index_copy_(2, positions, v.to(values.dtype))
            return keys, values

        return self._stack(ids, positions, [(slice(0, ids.shape[1]), mask)], lambda i, k, v: [write(i, k, v)],
                           ids.shape[1])

    __call__ = forward
