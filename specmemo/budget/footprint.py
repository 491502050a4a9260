"""One small function per memory component, in bytes.

Notation: B = batch, N = context tokens, k = draft length, W = draft window, C = prefill chunk,
V = vocabulary, L = layers. Every function is exact integer arithmetic on architecture facts, so
tests can check them against numbers worked out by hand.
"""

from specmemo.budget.arch import Arch
from specmemo.errors import BadInput

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
LOGITS_BYTES = 4  # verification and sampling work on fp32 logits, whatever the model dtype

# Group-quantized weight formats: every matrix is stored in groups of 32 consecutive weights of a
# row, each group packed values plus fp16 parameters, a scale and a zero point (GGUF's Q4_1 holds
# 4-bit values so; q8 holds 8-bit values so, models/quant.q8_groups). Norm weights and biases stay
# in the compute dtype.
QUANT_GROUP = 32
QUANT_GROUP_BYTES = {"q4": 16 + 2 + 2, "q8": 32 + 2 + 2}
QUANT_COMPUTE = "bf16"  # activations of a quantized model (torch's packed kernels take bf16)


def is_quantized(dtype: str) -> bool:
    return dtype in QUANT_GROUP_BYTES


def compute_dtype(dtype: str) -> str:
    """The dtype activations, logits and (by default) the KV cache have for a weight format."""
    return QUANT_COMPUTE if is_quantized(dtype) else dtype


def is_half(dtype: str) -> bool:
    """Computes in 16-bit floats (bf16/fp16 weights, or a quantized format's bf16 activations)."""
    return compute_dtype(dtype) in ("fp16", "bf16")


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[compute_dtype(dtype)]
    except KeyError:
        known = ", ".join([*DTYPE_BYTES, *QUANT_GROUP_BYTES])
        raise BadInput(f"unknown dtype {dtype!r}; choose one of {known}") from None


def matrices(arch: Arch) -> list[tuple[int, int, int]]:
    """(count, rows, columns) of every weight matrix, [out, in] as checkpoints store them."""
    E, I, D = arch.hidden_size, arch.intermediate_size, arch.head_dim
    H, Hkv, L, V = arch.num_heads, arch.num_kv_heads, arch.num_layers, arch.vocab_size
    return [
        (L, H * D, E), (2 * L, Hkv * D, E), (L, E, H * D),      # q; k and v; o
        (2 * L, I, E), (L, E, I),                              # gate and up; down
        (1 if arch.tie_embeddings else 2, V, E),               # embedding (and a separate LM head)
    ]


def weight_bytes(arch: Arch, dtype: str, quantized_head: bool = False) -> int:
    """Parameters × bytes; tied embeddings are one matrix in memory and counted once. For q4/q8,
    each row of a decoder layer's matrices is ⌈columns / 32⌉ groups of QUANT_GROUP_BYTES, and the
    vectors (norms, biases) stay in the compute dtype. The token embedding and LM head stay in the
    compute dtype too, as the CPU runtime holds them, unless quantized_head (the device profile's
    `quantized_head`): then, as GGUF files hold them (Q4_K_M: token_embd Q4_K, output Q6_K), an
    untied embedding is in the weight format itself and the LM head (or a tied embedding) in q8."""
    if not is_quantized(dtype):
        return arch.num_params() * dtype_bytes(dtype)
    every = matrices(arch)
    quantized = every if quantized_head else every[:-1]
    in_matrices = sum(n * rows * cols for n, rows, cols in quantized)
    groups = lambda mats: sum(n * rows * -(-cols // QUANT_GROUP) for n, rows, cols in mats)
    packed = groups(every[:-1]) * QUANT_GROUP_BYTES[dtype]
    if quantized_head:
        V, E = arch.vocab_size, arch.hidden_size
        embed = [] if arch.tie_embeddings else [(1, V, E)]
        packed += groups(embed) * QUANT_GROUP_BYTES[dtype] + groups([(1, V, E)]) * QUANT_GROUP_BYTES["q8"]
    return packed + (arch.num_params() - in_matrices) * dtype_bytes(dtype)


def kv_bytes_per_token(arch: Arch, kv_dtype: str) -> int:
    """2 (K and V) · layers · kv_heads · head_dim · bytes. Grouped-query attention shrinks it via kv_heads."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes(kv_dtype)


def kv_bytes(arch: Arch, kv_dtype: str, tokens: int, batch: int = 1) -> int:
    return batch * tokens * kv_bytes_per_token(arch, kv_dtype)


def verify_kv_slots_bytes(arch: Arch, kv_dtype: str, k: int, batch: int = 1) -> int:
    """The k+1 extra KV slots a store reserves for candidates, so verifying never reallocates."""
    return kv_bytes(arch, kv_dtype, k + 1, batch)


def draft_head_bytes(hidden: int, inner: int, vocab: int, dtype: str = "fp32") -> int:
    """A draft head as it drafts (models/draft_head.RunningHead): its matrices (fused input
    [2E, E], SwiGLU [E, 2I] and [I, E]) and a copy of the target's LM-head rows for its vocabulary
    [E, Vh] in `dtype` (models/quant.draft_head_weights: bf16, int8 or fp32), four norms [E] in
    that dtype (bf16 beside int8 matrices, which keep one bf16 scale per output), and its
    vocabulary's ids (int64)."""
    E = hidden
    if dtype == "int8":
        return (2 * E * E + 3 * inner * E + vocab * E) + 2 * (E + 2 * inner + E + vocab) + 2 * 4 * E + 8 * vocab
    w = dtype_bytes(dtype)
    return w * (2 * E * E + 3 * inner * E + 4 * E + vocab * E) + 8 * vocab


def logits_bytes(arch: Arch, dtype: str, positions: int, batch: int = 1) -> int:
    """Logits for `positions` rows: the model's own output, plus the fp32 copy we verify on
    unless the model already computes in fp32."""
    copy = LOGITS_BYTES if dtype != "fp32" else 0
    return batch * positions * arch.vocab_size * (dtype_bytes(dtype) + copy)


def activation_bytes_per_token(arch: Arch, dtype: str) -> int:
    """Live tensors inside one decoder layer for one token: residual, norm, q/k/v/attn-out,
    o-proj out, and the gated MLP's gate, up and product (the widest point of the layer)."""
    h, i = arch.hidden_size, arch.intermediate_size
    attn = (2 * arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    return (3 * h + attn + 3 * i) * dtype_bytes(dtype)


def attention_mask_bytes(queries: int, keys: int, batch: int = 1) -> int:
    """The mask of a multi-token forward (prefill chunk, verification): one byte per (query, key)
    for our boolean mask, plus four for the additive fp32 mask SDPA converts it into.
    Scores are not counted: fused SDPA kernels (flash on CPU, efficient/flash on CUDA) never
    materialize them, and our attention call never expands grouped K/V (see hf_adapter)."""
    return batch * queries * keys * (1 + 4) if queries > 1 else 0


def kv_upcast_bytes(arch: Arch, dtype: str, kv_dtype: str | None, keys: int, batch: int = 1) -> int:
    """A KV cache stored narrower than the compute dtype is widened one layer at a time for
    attention: one layer's K and V over `keys` keys, in the compute dtype."""
    if kv_dtype is None or dtype_bytes(kv_dtype) >= dtype_bytes(dtype):
        return 0
    return batch * 2 * arch.num_kv_heads * arch.head_dim * keys * dtype_bytes(dtype)


ROW_EXACT_TOKENS = 16             # half-precision rows that attend as one-token steps (models/llama.py)
EXACT_ATTENTION_READS = ("fp32", "bf16")   # KV dtypes the compiled exact attention reads in place


def exact_attention_fits(head_dim: int, rows: int, group: int) -> bool:
    """Shapes the compiled exact attention takes (models/kernels/exact_attention.c): head_dim a
    multiple of 32 up to 256, at most 128 queries per KV head."""
    return head_dim % 32 == 0 and head_dim <= 256 and -(-rows * group // 3) * 3 <= 128


def fp32_attention_bytes(arch: Arch, dtype: str, kv_dtype: str | None, keys: int, batch: int = 1,
                         native: bool = False) -> int:
    """Half-precision compute attends in fp32 (LlamaModel.widen): two buffers of one layer's K and
    V over `keys` slots, kept for the run. None when the KV cache is already fp32, or where the
    compiled exact attention runs (native) and reads this KV in place."""
    if not is_half(dtype) or dtype_bytes(kv_dtype or dtype) >= 4:
        return 0
    if native and (kv_dtype or compute_dtype(dtype)) in EXACT_ATTENTION_READS and exact_attention_fits(
            arch.head_dim, ROW_EXACT_TOKENS, arch.num_heads // arch.num_kv_heads):
        return 0
    return batch * 2 * arch.num_kv_heads * arch.head_dim * keys * 4


def forward_workspace_bytes(arch: Arch, dtype: str, tokens: int, keys: int, batch: int = 1,
                            kv_dtype: str | None = None) -> int:
    """Peak scratch of one forward over `tokens` new tokens attending to `keys` keys."""
    return (batch * tokens * activation_bytes_per_token(arch, dtype) + attention_mask_bytes(tokens, keys, batch)
            + kv_upcast_bytes(arch, dtype, kv_dtype, keys, batch))


def sampling_bytes(arch: Arch, k: int, batch: int = 1, sampling: bool = True) -> int:
    """p and q probabilities (fp32) plus one sort for top-p (fp32 values + int64 indices), per
    candidate row. Greedy decoding takes an argmax of the logits and needs none of it."""
    return batch * (k + 1) * arch.vocab_size * (4 + 4 + 4 + 8) if sampling else 0
