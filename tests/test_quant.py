"""Packed 4-bit weights: GGUF Q4_0/Q4_1 blocks kept packed and run by torch's int4 CPU kernel.

A tiny Llama is written as a real GGUF file by gguf-py (quantized by gguf-py, Q/K rows permuted
as llama.cpp's converter does), loaded packed, and compared with our decoder holding the same
(dequantized) weights densely.
"""

import gguf
import numpy as np
import pytest
import torch

from pathlib import Path

from specmemo.budget.arch import Arch
from specmemo.budget.plan import PlanRequest, make_plan
from specmemo.memory.allocator import allocate_target
from specmemo.budget.devices import load_device
from specmemo.models.llama import LlamaConfig, LlamaModel
from specmemo.models.quant import Int4Weight, q4_blocks, q8_dequantize, q8_groups, rope_rows

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parent.parent
HERE = load_device("cpu").kernels   # this machine's kernel choices, as a command decides them
CONFIG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 256}


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1])
def test_q4_blocks_multiply_exactly_as_gguf_dequantizes_them(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 128)).astype(np.float32)              # [out, in] as GGUF rows
    raw = gguf.quants.quantize(w, kind)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, kind).copy())   # what llama.cpp computes with
    q, scale, zero = q4_blocks(raw, kind.name, 48, 128)
    packed = Int4Weight.from_q4(q, scale, zero, torch.float32)
    assert torch.allclose(packed.dequantize(), ref.t(), atol=1e-6)
    x = torch.randn(3, 128)
    assert torch.allclose(x @ packed, x @ ref.t(), atol=1e-4)
    assert (x[None] @ packed).shape == (1, 3, 48)


def test_q8_groups_round_each_group_over_its_own_range():
    w = torch.tensor([[float(i) for i in range(32)] + [3.0] * 32,
                      [-1.0 + 2.0 * i / 31 for i in range(32)] + [0.5 * (-1) ** i for i in range(32)]])
    q, scale, zero = q8_groups(w)
    assert q.dtype == torch.uint8 and scale.shape == zero.shape == (2, 2)
    assert scale[0, 0] == 31 / 255 and zero[0, 0] == 0          # 0..31: step 31/255 from 0
    assert scale[0, 1] == 0 and zero[0, 1] == 3 and torch.all(q[0, 32:] == 0)   # constant: its zero point
    assert q[0, 0] == 0 and q[0, 31] == 255 and q[1, 0] == 0 and q[1, 31] == 255
    back = q8_dequantize(q, scale, zero)
    assert back[0, 32:].eq(3).all()
    assert (back - w).abs().max() <= scale.float().max() / 2 + 1e-3   # half a step, plus fp16 rounding


def test_q8_groups_keep_a_four_bit_grid():
    # A Q4_1 group: m + q·d, q in 0..15. 255 = 15·17: q8's levels include every one of them.
    m, d = torch.tensor(-0.4375), torch.tensor(0.0625)
    w = (m + d * torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0))).float()
    w[:, 0], w[:, 1], w[:, 32], w[:, 33] = m, m + 15 * d, m, m + 15 * d   # each group spans the grid
    q, scale, zero = q8_groups(w)
    assert torch.all(q.long() % 17 == 0)                        # every value on a level of the grid
    err = (q8_dequantize(q, scale, zero) - w).abs().max()       # only the scale's fp16 rounding is left
    q8_0 = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0)
    assert err < 3e-4 and err < (torch.from_numpy(q8_0.copy()) - w).abs().max() / 4


def test_rope_rows_undo_llama_cpps_permutation():
    heads, d = 4, 8
    hf = torch.arange(heads * d)
    # llama.cpp's convert: w.reshape(heads, 2, d // 2, ...).swapaxes(1, 2)
    gguf_rows = hf.reshape(heads, 2, d // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(gguf_rows[rope_rows(heads * d, heads)], hf)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, layer_kind=Q.Q4_1, arch="llama", seed=0, f64_norm=False):
    """A tiny Llama GGUF and the HF-layout fp32 weights it dequantizes to."""
    rng = np.random.default_rng(seed)
    E, I, V, H, Hkv = 64, 128, 96, 4, 2
    D = E // H
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(I)
    writer.add_head_count(H)
    writer.add_head_count_kv(Hkv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_context_length(256)
    hf = {}

    def add(name, w, kind, hf_name, heads=None):
        if f64_norm and name == "blk.1.ffn_norm.weight":  # a type gguf-py cannot dequantize
            writer.add_tensor(name, w.astype(np.float64))
            return
        stored = _permute(w, heads) if heads else w
        raw = gguf.quants.quantize(stored, kind)
        writer.add_tensor(name, raw, raw_dtype=kind)
        back = gguf.quants.dequantize(raw, kind).reshape(stored.shape)
        # Undo the permutation on the dequantized values: the HF-layout weights llama.cpp runs.
        hf[hf_name] = torch.from_numpy(_permute_back(back, heads) if heads else back.copy())

    add("token_embd.weight", rng.standard_normal((V, E)).astype(np.float32), Q.Q8_0, "embed")
    for i in range(2):
        norm = (1 + 0.3 * rng.standard_normal(E)).astype(np.float32)
        add(f"blk.{i}.attn_norm.weight", norm, Q.F32, f"{i}.attn_norm")
        add(f"blk.{i}.ffn_norm.weight", norm[::-1].copy(), Q.F32, f"{i}.mlp_norm")
        for part, rows, heads in [("q", H * D, H), ("k", Hkv * D, Hkv), ("v", Hkv * D, None)]:
            add(f"blk.{i}.attn_{part}.weight", 0.2 * rng.standard_normal((rows, E)).astype(np.float32), layer_kind,
                f"{i}.{part}", heads)
        add(f"blk.{i}.attn_output.weight", 0.2 * rng.standard_normal((E, H * D)).astype(np.float32), layer_kind, f"{i}.o")
        add(f"blk.{i}.ffn_gate.weight", 0.2 * rng.standard_normal((I, E)).astype(np.float32), layer_kind, f"{i}.gate")
        add(f"blk.{i}.ffn_up.weight", 0.2 * rng.standard_normal((I, E)).astype(np.float32), layer_kind, f"{i}.up")
        add(f"blk.{i}.ffn_down.weight", 0.2 * rng.standard_normal((E, I)).astype(np.float32), layer_kind, f"{i}.down")
    add("output_norm.weight", np.ones(E, dtype=np.float32), Q.F32, "norm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def _permute_back(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dense_model(hf: dict) -> LlamaModel:
    """Our decoder holding the same weights densely in fp32: the reference."""
    model = LlamaModel(LlamaConfig.from_hf(CONFIG), torch.float32)
    for i, layer in enumerate(model.layers):
        layer.attn_norm, layer.mlp_norm = hf[f"{i}.attn_norm"], hf[f"{i}.mlp_norm"]
        layer.w_qkv = torch.cat([hf[f"{i}.q"], hf[f"{i}.k"], hf[f"{i}.v"]]).t().contiguous()
        layer.w_o = hf[f"{i}.o"].t().contiguous()
        layer.w_gate_up = torch.cat([hf[f"{i}.gate"], hf[f"{i}.up"]]).t().contiguous()
        layer.w_down = hf[f"{i}.down"].t().contiguous()
    model.norm = hf["norm"]
    model.embed = model.head = hf["embed"].t().contiguous()
    return model


def logits_of(model, ids):
    arch = Arch.from_config(CONFIG, name="tiny")
    plan = make_plan(PlanRequest(target=arch, draft=None, drafter="none", context=64, draft_len=0,
                                 draft_window=64, dtype="fp32"))
    store = allocate_target(plan, torch.float32, "cpu")
    return torch.cat([model(store, ids[:, :20], 20), model(store, ids[:, 20:21], 1), model(store, ids[:, 21:27], 6)], 1)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1])
def test_a_packed_gguf_runs_like_its_dequantized_weights(tmp_path, kind):
    from specmemo.models.load_gguf import load_gguf_q4

    hf = write_tiny_gguf(tmp_path / "tiny.gguf", kind)
    packed = load_gguf_q4(str(tmp_path / "tiny.gguf"), CONFIG, torch.float32)
    assert all(isinstance(layer.w_qkv, Int4Weight) and isinstance(layer.w_down, Int4Weight) for layer in packed.layers)
    ids = torch.randint(0, 96, (1, 27), generator=torch.Generator().manual_seed(1))
    got, ref = logits_of(packed, ids), logits_of(dense_model(hf), ids)
    assert (got - ref).abs().max() < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # bf16 activations (what --dtype q4 runs): close, same top-1 on these sharp logits
    bf16 = logits_of(load_gguf_q4(str(tmp_path / "tiny.gguf"), CONFIG, torch.bfloat16), ids)
    assert (bf16 - ref).abs().max() < 0.1 * ref.abs().max()


def test_a_packed_head_and_file_read_embedding_give_the_dense_heads_logits_bit_for_bit(tmp_path, monkeypatch):
    import dataclasses

    from specmemo.models.load_gguf import load_gguf_q4
    from specmemo.models.quant import PackedMatrix, packs

    if not packs(torch.bfloat16, "head", HERE):
        pytest.skip("this machine does not pack a bf16 head (device profile or oneDNN)")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    packed = load_gguf_q4(str(tmp_path / "tiny.gguf"), CONFIG, torch.bfloat16, HERE)
    dense = load_gguf_q4(str(tmp_path / "tiny.gguf"), CONFIG, torch.bfloat16,
                         dataclasses.replace(HERE, packed_head=False))
    assert isinstance(packed.head, PackedMatrix) and packed.embed is packed.head
    assert isinstance(dense.head, torch.Tensor)
    assert packed.nbytes() == dense.nbytes()                 # same bytes, another layout; no embedding copy
    ids = torch.randint(0, 96, (1, 27), generator=torch.Generator().manual_seed(1))
    assert torch.equal(packed.embed_tokens(ids), dense.embed_tokens(ids))   # rows read from the file
    assert torch.equal(logits_of(packed, ids), logits_of(dense, ids))
    vocab = torch.tensor([3, 0, 95])
    assert torch.equal(packed.head_rows(vocab), dense.head_rows(vocab))


def test_layer_matrices_of_another_type_are_dequantized_with_one_warning(tmp_path, capfd):
    from specmemo.models.load_gguf import load_gguf_q4

    hf = write_tiny_gguf(tmp_path / "q8.gguf", Q.Q8_0)
    model = load_gguf_q4(str(tmp_path / "q8.gguf"), CONFIG, torch.float32)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q8_0" in err[0] and "not run packed" in err[0]
    assert isinstance(model.layers[0].w_qkv, torch.Tensor)
    ids = torch.randint(0, 96, (1, 27), generator=torch.Generator().manual_seed(2))
    assert (logits_of(model, ids) - logits_of(dense_model(hf), ids)).abs().max() < 1e-3


def test_a_tensor_type_that_cannot_load_is_refused_naming_it(tmp_path):
    from specmemo.errors import UnknownModel
    from specmemo.models.load_gguf import load_gguf_q4

    write_tiny_gguf(tmp_path / "f64.gguf", f64_norm=True)
    with pytest.raises(UnknownModel, match="tensor blk.1.ffn_norm.weight has type F64, which specmemo cannot load"):
        load_gguf_q4(str(tmp_path / "f64.gguf"), CONFIG, torch.float32)


def test_a_gguf_of_another_architecture_is_refused_in_one_line(tmp_path):
    from specmemo.errors import UnknownModel
    from specmemo.models.load_gguf import load_gguf_q4

    write_tiny_gguf(tmp_path / "other.gguf", arch="qwen2")
    with pytest.raises(UnknownModel, match="packed q4 runs GGUF architecture 'llama', not 'qwen2'"):
        load_gguf_q4(str(tmp_path / "other.gguf"), CONFIG, torch.float32)


def test_q4_needs_a_gguf_file(tmp_path):
    from specmemo.errors import BadInput
    from specmemo.models.load import load_model
    from specmemo.models.resolve import resolve
    from specmemo.models.synthetic import llama_config, save_random_model

    save_random_model(llama_config(96), tmp_path / "m")
    with pytest.raises(BadInput, match="--dtype q4 needs a GGUF file with Q4_0/Q4_1 weights"):
        load_model(resolve(str(tmp_path / "m")), "q4", with_tokenizer=False)


def test_profile_names_the_missing_llama_cpp_extra_in_one_line(cli, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    r = cli("profile", "--limit", "1", "--engines", "specmemo-ar,llama.cpp", "--out", tmp_path / "profile")
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("error: the llama.cpp engine needs llama-cpp-python: pip install")


def test_llama_cpp_runs_in_a_profile_beside_q4(tmp_path):
    """Needs the optional llama extra (never in CI): one short q4 profile with llama.cpp."""
    import json
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    r = subprocess.run([sys.executable, "-m", "specmemo", "profile", "--limit", "1", "--turns", "2",
                        "--max-new-tokens", "8", "--dtype", "q4", "--engines", "specmemo-ar,llama.cpp",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {row["engine"]: row for row in json.loads((tmp_path / "report.json").read_text())["runs"]}
    assert rows["llama.cpp"]["turns"] == 2 and rows["llama.cpp"]["tokens_per_s"] > 0
    assert rows["specmemo-ar"]["weights_bytes"] < 130 * 2**20   # packed, not 538 MB of fp32
    assert rows["hf-ar"]["forward"] == "transformers"


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_speculation_on_packed_weights_equals_plain_decoding(tmp_path, drafter):
    from specmemo.decoding.drafters import ModelDrafter, NgramDrafter, NoDrafter
    from specmemo.decoding.engine import Engine
    from specmemo.decoding.events import collect
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.memory.allocator import allocate_draft
    from specmemo.models.load_gguf import load_gguf_q4

    write_tiny_gguf(tmp_path / "t.gguf", Q.Q4_1)
    model = load_gguf_q4(str(tmp_path / "t.gguf"), CONFIG, torch.bfloat16)
    arch = Arch.from_config(CONFIG, name="tiny")
    prompt = ([5, 17, 3, 44, 9, 61, 2, 33, 70] * 5)[:40]

    def engine(kind):
        plan = make_plan(PlanRequest(target=arch, draft=arch if kind == "model" else None, drafter=kind, context=200,
                                     draft_len=0 if kind == "none" else 4, draft_window=200, dtype="bf16"))
        store = allocate_target(plan, torch.bfloat16, "cpu")
        d = {"none": lambda: NoDrafter("cpu"), "ngram": lambda: NgramDrafter("cpu"),
             "model": lambda: ModelDrafter(model, allocate_draft(plan, torch.bfloat16, "cpu"), SamplingConfig(), 200)}
        return Engine(model, store, d[kind](), SamplingConfig(), draft_len=plan.request.draft_len, prefill_chunk=16,
                      context=200)

    plain, _ = collect(engine("none").generate(prompt, 60))
    out, stats = collect(engine(drafter).generate(prompt, 60))
    assert out == plain and stats.drafted_tokens > 0


def test_greedy_speculation_on_the_q4_default_model_equals_plain_decoding(tmp_path):
    """The real SmolLM2-135M in packed q4 (bf16 activations), shipped prompts: every drafter's
    greedy output equals plain decoding. Before rows were computed exactly as one-token steps
    (contiguous residual, sqrt norms, per-row attention), model drafts diverged within 64 tokens."""
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.greedy_equivalence import check_greedy_equivalence

    report = check_greedy_equivalence(str(ROOT / "prompts" / "default.jsonl"), 4, 48, tmp_path, dtype="q4")
    for name, row in report.items():
        assert row["identical"] == row["prompts"] == 4, (name, row["mismatches"])
    assert report["smollm2-bf16-draft"]["accepted"] > 0 and report["random-tiny-draft"]["drafted"] > 0


def test_the_default_model_plans_and_runs_packed_q4_on_a_cpu(cli):
    """The CPU profile measured packed 4-bit faster (packed_q4), so a Q4_1 GGUF defaults to q4 in
    plan (and generate/chat, which decide in the same place); --dtype fp32 is the dense reference."""
    import json

    args = ["plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "512", "--json"]
    default, fp32 = json.loads(cli(*args).stdout), json.loads(cli(*args, "--dtype", "fp32").stdout)
    assert default["dtype"] == "q4" and default["runnable"] and default["kv_dtype"] == "bf16"
    assert default["components"]["target_weights"] == 123_048_576   # see test_footprint
    assert fp32["dtype"] == "fp32" and fp32["components"]["target_weights"] > 4 * default["components"]["target_weights"]


def test_bf16_layers_and_head_packed_for_onednn_give_the_dense_models_logits_bit_for_bit(tmp_path, monkeypatch):
    """`--dtype bf16` on a CPU whose device profile packs layers: every layer matrix (the down
    projection in pieces where whole was not row-exact) and the tied head packed once, the
    embedding's rows read from the safetensors file. Same logits as the dense model, and a
    6-token verification rounds each row as a one-token step."""
    import json

    import transformers

    import dataclasses

    import specmemo.models.quant as quant
    from specmemo.memory.kvstore import KVShape, KVStore
    from specmemo.models.load_safetensors import load_llama

    if not quant.packs(torch.bfloat16, "layers", HERE):
        pytest.skip("this machine does not pack bf16 layers (device profile or oneDNN)")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=192, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m", safe_serialization=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    packed = load_llama(str(tmp_path / "m"), config, torch.bfloat16, "cpu", HERE)
    dense = load_llama(str(tmp_path / "m"), config, torch.bfloat16, "cpu",
                       dataclasses.replace(HERE, packed_head=False, packed_layers=()))
    assert all(isinstance(w, quant.PackedMatrix) for w in (packed.layers[0].w_qkv, packed.layers[1].w_gate_up))
    assert isinstance(packed.head, quant.PackedMatrix) and packed.embed is packed.head
    assert packed.nbytes() == dense.nbytes()                   # same bytes, another layout; no embedding copy
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    assert torch.equal(packed.embed_tokens(ids), dense.embed_tokens(ids))

    def steps(model, widths):
        store = KVStore(KVShape(2, 1, 1, 64, 64), model.dtype, model.device)
        out, at = [], 0
        for n in widths:
            out.append(model(store, ids[:, at : at + n], n))
            at += n
        return torch.cat(out, dim=1)

    verify = steps(packed, [24, 6])[:, 24:]
    assert torch.equal(verify, steps(dense, [24, 6])[:, 24:])
    assert torch.equal(verify, steps(packed, [24] + [1] * 6)[:, 24:])
