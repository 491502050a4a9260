"""specmemo's own decoder (models/llama.py) against transformers, for every supported variant, and
the engine running on it: greedy speculation stays token-identical to plain decoding."""

import json

import pytest
import torch
import transformers

from specmemo.memory.allocator import allocate_target
from specmemo.budget.plan import PlanRequest, make_plan
from tests.tiny import VOCAB, arch_of, make_engine, own_model, run, tiny_llama, tiny

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
VARIANTS = {
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL),
    "llama-tied-mha": lambda: transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear-rope-scaling": lambda: transformers.LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "mistral-no-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=False),
    "qwen3-qk-norm": lambda: transformers.Qwen3Config(**SMALL, head_dim=16, use_sliding_window=False),
}


def hf_model(make, seed=0):
    torch.manual_seed(seed)
    cfg = make()
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def store_for(model, context=200):
    req = PlanRequest(target=arch_of(model), draft=None, drafter="none", context=context, draft_len=0,
                      draft_window=0, dtype="fp32")
    weight = next(model.parameters())
    return allocate_target(make_plan(req), weight.dtype, weight.device)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    model = hf_model(VARIANTS[variant])
    ours = own_model(model)
    ids = torch.randint(0, VOCAB, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits[0].float()                    # [90, V], one full forward
    store = store_for(model)
    # Ours in prefill chunks, then one token at a time, then a 5-token verification block.
    got = [ours(store, ids[:, :40], 40)[0], ours(store, ids[:, 40:64], 24)[0]]
    got += [ours(store, ids[:, i:i + 1], 1)[0] for i in range(64, 85)]
    got.append(ours(store, ids[:, 85:90], 5)[0])
    got = torch.cat(got)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_kv_written_by_our_decoder_equals_transformers_cache():
    model = hf_model(VARIANTS["llama-gqa"])
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    store = store_for(model)
    own_model(model)(store, ids, 1)
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    for layer in range(2):
        k, v = cache.layers[layer].keys, cache.layers[layer].values      # [1, Hkv, 30, D]
        assert torch.allclose(store.keys[layer, :, :, :30], k, atol=1e-5)
        assert torch.allclose(store.values[layer, :, :, :30], v, atol=1e-5)


TARGET = tiny(0, scale=8.0)
DRAFT = tiny(0, scale=8.0)


@pytest.mark.parametrize("drafter,draft,window", [("ngram", None, None), ("model", DRAFT, None),
                                                  ("model", DRAFT, 12)])
def test_greedy_speculation_on_our_decoder_equals_plain_decoding(drafter, draft, window):
    import random

    rng = random.Random(3)
    base = [rng.randrange(VOCAB) for _ in range(9)]
    prompt = (base * 5)[:40]
    plain, _ = run(make_engine(TARGET(), "none", own=True), prompt, 60)
    assert plain == run(make_engine(TARGET(), "none"), prompt, 60)[0]   # same tokens as transformers
    out, stats = run(make_engine(TARGET(), drafter, draft and draft(), window=window, own=True), prompt, 60)
    assert out == plain and stats.accepted_tokens > 0


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen3-qk-norm", "qwen2-qkv-bias"])
def test_the_fixed_shape_step_for_cuda_graphs_matches_the_eager_forward(variant):
    """forward_static (K/V written by index, attention over every slot under a device-built mask)
    gives the eager forward's logits, and leaves the store as the eager forward would."""
    from specmemo.models.graphs import GraphedForward

    model = hf_model(VARIANTS[variant])
    own = own_model(model)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    eager, static = store_for(model), store_for(model)
    graphed = GraphedForward(own, max_tokens=6, capture=False)
    for a, b in [(0, 20), (20, 21), (21, 27), (27, 28), (28, 33)]:  # a prefill chunk (eager), steps
        ref = own(eager, ids[:, a:b], b - a)
        got = graphed(static, ids[:, a:b], b - a)
        assert static.length == eager.length == b
        assert (got - ref).abs().max() < 1e-4 and torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.allclose(static.keys[:, :, :, :33], eager.keys[:, :, :, :33], atol=1e-6)
    static.trim(30)  # rejected candidates: the next step overwrites their slots
    eager.trim(30)
    assert torch.allclose(graphed(static, ids[:, 35:37], 2), own(eager, ids[:, 35:37], 2), atol=1e-4)


def fixed_width_rows_vs_one_token_steps(dtype, device="cpu", capture=False):
    """Six tokens as one padded step and as six one-token steps: (logits, logits, stores equal)."""
    from specmemo.models.graphs import ROWS, GraphedForward

    model = hf_model(VARIANTS["llama-gqa"]).to(device, dtype)
    own = own_model(model)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4)).to(device)
    wide_store, one_store = store_for(model), store_for(model)
    graphed = GraphedForward(own, capture=capture, rows=ROWS)
    for store in (wide_store, one_store):
        graphed(store, ids[:, :20], 20)                 # the same eager prefill
    wide = graphed(wide_store, ids[:, 20:26], 6)
    one = torch.cat([graphed(one_store, ids[:, i : i + 1], 1) for i in range(20, 26)], dim=1)
    return wide, one, torch.equal(wide_store.keys[:, :, :, :26], one_store.keys[:, :, :, :26])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_target_step_at_fixed_width_rounds_each_row_as_a_one_token_step(dtype):
    """The padded step (models/graphs.py): a verified row is bit-identical to the same token run
    alone, so speculation cannot part from plain decoding by rounding (unpadded fp32 differs by
    an ulp here), and the padding rows' duplicate K/V writes leave the store as one-token steps do."""
    wide, one, same_kv = fixed_width_rows_vs_one_token_steps(dtype)
    assert torch.equal(wide, one) and same_kv


@pytest.mark.parametrize("drafter,draft", [("ngram", None), ("model", DRAFT)])
def test_greedy_speculation_through_the_fixed_shape_step_equals_plain_decoding(drafter, draft):
    import random

    rng = random.Random(5)
    prompt = ([rng.randrange(VOCAB) for _ in range(9)] * 5)[:40]
    plain, _ = run(make_engine(TARGET(), "none", own=True), prompt, 60)
    assert run(make_engine(TARGET(), "none", graphed=True), prompt, 60)[0] == plain
    out, stats = run(make_engine(TARGET(), drafter, draft and draft(), graphed=True), prompt, 60)
    assert out == plain and stats.accepted_tokens > 0


def test_an_architecture_outside_the_family_runs_through_the_adapter(tmp_path):
    from specmemo.models.load import load_model
    from specmemo.models.resolve import resolve

    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "neox", safe_serialization=True)
    ref = resolve(str(tmp_path / "neox"))
    loaded = load_model(ref, "fp32", with_tokenizer=False)
    assert loaded.forward_path == "transformers"
    with pytest.raises(Exception, match="cannot run it"):
        load_model(ref, "fp32", with_tokenizer=False, forward="specmemo")


def test_a_llama_directory_loads_into_our_decoder(tmp_path):
    from specmemo.models.load import load_model
    from specmemo.models.resolve import resolve

    TARGET().save_pretrained(tmp_path / "llama", safe_serialization=True)
    loaded = load_model(resolve(str(tmp_path / "llama")), "fp32", with_tokenizer=False)
    assert loaded.forward_path == "specmemo" and loaded.forward is loaded.model
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert loaded.model.cfg.num_layers == cfg["num_hidden_layers"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("drafter,draft", [("ngram", None), ("model", DRAFT)])
def test_greedy_speculation_in_half_precision_equals_plain_decoding(dtype, drafter, draft):
    """bf16/fp16 weights on our decoder through the engine. (The rounding sensitivity that needs
    rows computed exactly as one-token steps shows on real weights: see test_quant.py's q4 test.)"""
    import random

    import copy

    # head_dim 64 with grouped K/V, as in real models (attention rounding depends on it); soft logits:
    # near-ties. The draft is the target itself: long accepted runs, many multi-row verifications.
    target = tiny_llama(0, hidden=256, heads=4, kv_heads=2, inter=512).to(dtype)
    rng = random.Random(7)
    prompt = ([rng.randrange(VOCAB) for _ in range(11)] * 4)[:40]
    plain, _ = run(make_engine(target, "none", own=True), prompt, 80)
    draft = copy.deepcopy(target) if draft is not None else None
    out, stats = run(make_engine(target, drafter, draft, own=True), prompt, 80)
    assert out == plain and stats.accepted_tokens > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_verification_rounds_each_row_as_a_one_token_step(dtype):
    """The eager path speculation takes on a CPU: six tokens in one forward give, bit for bit, the
    logits of six one-token forwards (SmolLM2-135M's widths, vocabulary and layout as the device
    profile chose; bf16 stored [in, out] fails this on the Zen 4 host, see bench/weight_layout.py)."""
    model = tiny_llama(0, hidden=576, heads=9, kv_heads=3, inter=1536, vocab=4096).to(dtype)
    own = own_model(model)
    ids = torch.randint(0, 4096, (1, 30), generator=torch.Generator().manual_seed(2))
    wide_store, one_store = store_for(model), store_for(model)
    for store in (wide_store, one_store):
        own(store, ids[:, :24], 1)
    wide = own(wide_store, ids[:, 24:30], 6)
    one = torch.cat([own(one_store, ids[:, i : i + 1], 1) for i in range(24, 30)], dim=1)
    assert torch.equal(wide, one)
    # Whether a kernel rounds a row differently next to others depends on the values (bf16 with
    # 1,536 inputs did in about half of random 6-row inputs on the Zen 4 host), so the forward's
    # products are checked on many: each kind the model multiplies, 12 inputs of 2..13 rows.
    layer = own.layers[0]
    kinds = {"qkv": layer.w_qkv, "o": layer.w_o, "gate_up": layer.w_gate_up, "down": layer.w_down, "head": own.head}
    for kind, w in kinds.items():
        for rows in range(2, 14):
            x = torch.randn(1, rows, w.shape[0], generator=torch.Generator().manual_seed(rows)).to(dtype)
            # Alone as a one-token step has it: a tensor of its own (a slice keeps the wide one's strides).
            alone = torch.cat([own.product(x[:, i : i + 1].clone(memory_format=torch.contiguous_format), w, kind)
                               for i in range(rows)], dim=1)
            assert torch.equal(own.product(x, w, kind), alone), (kind, rows)
