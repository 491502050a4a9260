"""Every footprint formula against numbers worked out by hand, for three kinds of architecture:
multi-head (llama-2-7b), grouped-query (llama-2-70b) and tied embeddings + GQA (smollm2-135m)."""

from specmemo.budget import footprint as fp
from specmemo.budget.arch import Arch
from specmemo.models.resolve import resolve

MHA = resolve("llama-2-7b-chat").arch
GQA = resolve("llama-2-70b-chat").arch
TIED = resolve("smollm2-135m-instruct").arch


def test_parameter_count_multi_head():
    # embed 32000·4096 = 131,072,000, twice (untied); per layer 4·4096² + 3·4096·11008 + 2·4096
    # = 67,108,864 + 135,266,304 + 8,192 = 202,383,360; × 32 = 6,476,267,520; + final norm 4,096
    assert MHA.num_params() == 2 * 131_072_000 + 6_476_267_520 + 4_096 == 6_738_415_616


def test_parameter_count_grouped_query():
    # q,o: 8192² each; k,v: 8192·(8·128) each; mlp 3·8192·28672; norms 2·8192
    layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert layer == 855_654_400
    assert GQA.num_params() == 80 * layer + 2 * 32000 * 8192 + 8192 == 68_976_648_192


def test_parameter_count_tied_embeddings_counted_once():
    # per layer: q,o 576·576; k,v 576·192; mlp 3·576·1536; norms 2·576 = 3,540,096; embed 49152·576 once
    assert TIED.num_params() == 30 * 3_540_096 + 28_311_552 + 576 == 134_515_008
    untied = Arch(**{**TIED.to_dict(), "tie_embeddings": False})
    assert untied.num_params() - TIED.num_params() == 28_311_552


def test_weight_bytes_per_dtype():
    assert fp.weight_bytes(MHA, "fp16") == 13_476_831_232
    assert fp.weight_bytes(TIED, "fp32") == 538_060_032
    assert fp.weight_bytes(TIED, "bf16") == 269_030_016


def test_kv_bytes_per_token():
    assert fp.kv_bytes_per_token(MHA, "fp16") == 2 * 32 * 32 * 128 * 2 == 524_288
    assert fp.kv_bytes_per_token(GQA, "fp16") == 2 * 80 * 8 * 128 * 2 == 327_680
    assert fp.kv_bytes_per_token(TIED, "fp32") == 2 * 30 * 3 * 64 * 4 == 46_080
    assert fp.kv_bytes(MHA, "fp16", 2048, batch=2) == 2 * 2048 * 524_288


def test_verification_buffers():
    # k = 5: 6 slots in each store; logits 6 rows × 32000 × (2 + 4) bytes
    assert fp.verify_kv_slots_bytes(MHA, "fp16", 5) == 6 * 524_288
    assert fp.logits_bytes(MHA, "fp16", 6) == 6 * 32000 * 6 == 1_152_000
    # sampling: p, q, sort values (fp32) and sort indices (int64) per row
    assert fp.sampling_bytes(TIED, 5) == 6 * 49152 * 20
    assert fp.sampling_bytes(TIED, 5, sampling=False) == 0
    # an fp32 model's logits are verified as they are: no second copy
    assert fp.logits_bytes(TIED, "fp32", 6) == 6 * 49152 * 4


def test_workspace():
    # per token: 3·576 + (2·9 + 2·3)·64 + 3·1536 = 1728 + 1536 + 4608 = 7872 elements
    assert fp.activation_bytes_per_token(TIED, "fp32") == 7872 * 4
    # prefill chunk of 256 attending 1000 keys: activations + a 256 × 1000 boolean mask and its fp32 form
    assert fp.forward_workspace_bytes(TIED, "fp32", 256, 1000) == 256 * 7872 * 4 + 256 * 1000 * 5
    # one decoded token needs no mask
    assert fp.forward_workspace_bytes(TIED, "fp32", 1, 1000) == 7872 * 4


def test_half_precision_attends_through_two_fp32_buffers_of_one_layer():
    # K and V of one layer (3 KV heads × 64) over 1,000 slots, in fp32; q4 computes in bf16
    for dtype in ("bf16", "fp16", "q4"):
        assert fp.fp32_attention_bytes(TIED, dtype, None, 1000) == 2 * 3 * 64 * 1000 * 4
    assert fp.fp32_attention_bytes(TIED, "bf16", "fp32", 1000) == 0   # an fp32 cache is read as is
    assert fp.fp32_attention_bytes(TIED, "fp32", "bf16", 1000) == 0   # fp32 compute widens through SDPA


def test_the_compiled_exact_attention_reads_a_bf16_cache_in_place_and_needs_no_fp32_copies():
    assert fp.fp32_attention_bytes(TIED, "q4", None, 1000, native=True) == 0          # KV bf16
    assert fp.fp32_attention_bytes(TIED, "bf16", None, 1000, native=True) == 0
    # an fp16 cache is widened first; a head_dim the kernel does not take attends through torch
    assert fp.fp32_attention_bytes(TIED, "fp16", None, 1000, native=True) == 2 * 3 * 64 * 1000 * 4
    odd = Arch(**{**TIED.to_dict(), "head_dim": 80})
    assert fp.fp32_attention_bytes(odd, "bf16", None, 1000, native=True) == 2 * 3 * 80 * 1000 * 4


def test_quantized_weight_bytes_count_groups_and_keep_vectors_in_the_compute_dtype():
    # SmolLM2-135M in q4: per layer q 576×18 groups, k and v 192×18, o 576×18, gate and up 1536×18,
    # down 576×48 = 110,592 groups; ×30 layers = 3,317,760 groups of 20 bytes (16 packed + scale
    # + min). The tied embedding (49152 × 576) and the vectors (30·2·576 + 576 = 35,136 norms) bf16.
    assert 30 * 110_592 * 32 + 49152 * 576 + 35_136 == TIED.num_params()
    assert fp.weight_bytes(TIED, "q4") == 3_317_760 * 20 + (49152 * 576 + 35_136) * 2 == 123_048_576
    assert fp.weight_bytes(TIED, "q8") == 3_317_760 * 36 + (49152 * 576 + 35_136) * 2   # 32 bytes, scale, zero
    # Where the device holds the embedding and head quantized too: the tied matrix in q8 groups
    # (49,152 rows × 18 groups × 36 bytes); only the vectors stay bf16.
    assert fp.weight_bytes(TIED, "q4", quantized_head=True) == 3_317_760 * 20 + 49152 * 18 * 36 + 35_136 * 2
    # llama-2-7b: layer matrices in groups of 32; the untied embedding and head (2 × 32000 × 4096)
    # and 266,240 vector parameters (32·2·4096 norms + the final 4096) in bf16.
    vectors, embed = 32 * 2 * 4096 + 4096, 2 * 32000 * 4096
    assert fp.weight_bytes(MHA, "q4") == (6_738_415_616 - vectors - embed) // 32 * 20 + (vectors + embed) * 2
    # quantized: its embedding in q4 groups and its head in q8 groups (32,000 rows × 128 groups each)
    assert fp.weight_bytes(MHA, "q4", quantized_head=True) == \
        (6_738_415_616 - vectors - embed) // 32 * 20 + 32000 * 128 * (20 + 36) + vectors * 2
    # activations and the default KV cache of a quantized model are bf16
    assert fp.kv_bytes_per_token(MHA, fp.compute_dtype("q4")) == fp.kv_bytes_per_token(MHA, "bf16")
