"""The compiled exact-attention kernel (models/kernels/exact_attention.c through models/kernels/native.py): each row
of a multi-row call, causal or a candidate-tree node, rounds bit for bit as that row attended alone
over its own keys; it stays close to SDPA; the decoder runs it for half precision and keeps greedy
speculation token-identical; a machine without a compiler keeps the torch path."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specmemo.memory.attention import CandidateTree
from specmemo.models.kernels import native
from specmemo.models.kernels.native import Rows
from tests.tiny import VOCAB, make_engine, own_model, run, tiny_llama

KERNEL = native.exact_attention()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no compiled kernel here: {native.why_not()}")


def store_view(gen, B, Hkv, S, D, dtype, spare=7):
    """keys/values [B, Hkv, S, D] as views of a store with `spare` unused slots per head."""
    full = [torch.randn(B, Hkv, S + spare, D, generator=gen).to(dtype) for _ in range(2)]
    return full, [t[:, :, :S] for t in full]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_causal_row_equals_the_row_alone_and_sdpa(dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(24):
        G, D = [(3, 64), (1, 32), (4, 128), (2, 64)][trial % 4]
        B, Hkv = 1 + trial % 2, 3 if trial % 3 == 0 else 2   # 3 KV heads: split in pieces on 2 threads
        S = int(torch.randint(1, 700, (), generator=gen))
        n = int(torch.randint(1, min(16, S) + 1, (), generator=gen))
        (K, V), (k, v) = store_view(gen, B, Hkv, S, D, dtype)
        q = torch.randn(B, n, Hkv * G, D, generator=gen).transpose(1, 2)          # [B, H, n, D], strided
        out = KERNEL.attend(q, k, v, Rows.causal(S, n), D ** -0.5)                # [B, n, H, D]
        for i in range(n):
            end = S - n + i + 1
            alone = KERNEL.attend(q[:, :, i : i + 1], K[:, :, :end], V[:, :, :end], Rows.causal(end, 1), D ** -0.5)
            assert torch.equal(out[:, i], alone[:, 0]), (trial, i)
        mask = torch.ones(n, S, dtype=torch.bool).tril(S - n)
        ref = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, scale=D ** -0.5, enable_gqa=G > 1)
        torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_the_threads_split_heads_and_queries_without_changing_a_bit():
    """One thread, two and three (SmolLM2's 3 KV heads on 2 threads: each head's queries in
    pieces; on 3: a head each) give the same bits."""
    gen = torch.Generator().manual_seed(2)
    _, (k, v) = store_view(gen, 1, 3, 517, 64, torch.bfloat16)
    q = torch.randn(1, 9, 6, 64, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(KERNEL.attend(q, k, v, Rows.causal(517, 6), 0.125))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_each_tree_node_equals_its_branch_attended_alone():
    tree = CandidateTree([-1, 0, 0, 1, 1, 2, 3, 3, 6, 0])
    gen = torch.Generator().manual_seed(1)
    P, n, D = 300, len(tree), 64
    _, (k, v) = store_view(gen, 1, 3, P + n, D, torch.bfloat16)
    q = torch.randn(1, 9, n, D, generator=gen)
    out = KERNEL.attend(q, k, v, Rows.tree(P, tree.paths), D ** -0.5)
    for node, path in enumerate(tree.paths):
        keys = list(range(P)) + [P + j for j in path]
        kb, vb = k[:, :, keys].contiguous(), v[:, :, keys].contiguous()
        alone = KERNEL.attend(q[:, :, node : node + 1], kb, vb, Rows.causal(len(keys), 1), D ** -0.5)
        assert torch.equal(out[:, node], alone[:, 0]), node


@needs_kernel
def test_rows_that_see_keys_past_the_store_are_refused():
    k = torch.zeros(1, 1, 10, 32)
    with pytest.raises(ValueError, match="refused"):
        KERNEL.attend(torch.zeros(1, 1, 1, 32), k, k, Rows.causal(11, 1), 1.0)
    with pytest.raises(ValueError, match="refused"):
        KERNEL.attend(torch.zeros(1, 1, 1, 32), k, k, Rows([5], [[3]]), 1.0)   # an extra key inside the prefix


@needs_kernel
def test_the_decoder_verifies_trees_and_greedy_speculation_exactly_through_the_kernel():
    # head_dim 64 (the kernel takes multiples of 32), grouped K/V, bf16
    target = tiny_llama(5, hidden=256, heads=4, kv_heads=2, inter=512).to(torch.bfloat16)
    own = own_model(target)
    assert own.attention_path == "native"
    from tests.test_tree import TREE, assert_nodes_decode_as_their_branches, store_for

    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=gen)
    tokens = torch.randint(0, VOCAB, (len(TREE),), generator=gen).tolist()
    assert_nodes_decode_as_their_branches(own, prompt, tokens)
    # The torch path (one query at a time) rounds otherwise but computes the same attention.
    chains = []
    for kernel in (own.attention_kernel, None):
        saved, own.attention_kernel = own.attention_kernel, kernel
        try:
            chain = store_for(own)
            own(chain, prompt, 1)
            chains.append(own(chain, torch.tensor([tokens[:4]]), 4)[0])
        finally:
            own.attention_kernel = saved
    torch.testing.assert_close(chains[0], chains[1], rtol=0.02, atol=0.02)
    plain, _ = run(make_engine(target, "none", own=True), prompt[0].tolist() * 2, 60)
    spec, stats = run(make_engine(target, "ngram", own=True), prompt[0].tolist() * 2, 60)
    assert spec == plain and stats.accepted_tokens > 0


@needs_kernel
def test_a_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMEMO_CACHE", str(tmp_path))
    first = native.build(native.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "kernels" and native.build(native.SOURCE) == first
    assert first.stat().st_mtime_ns == stamp and not list(first.parent.glob(".*.tmp"))   # no half-written library
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.build(native.SOURCE, compiler="/nonexistent/cc")


def test_without_a_compiler_generate_runs_the_torch_path_and_says_so(tmp_path):
    env = {**os.environ, "CC": "/nonexistent/cc"}
    r = subprocess.run([sys.executable, "-m", "specmemo", "generate", "--prompt", "Say hi.", "--chat", "--dtype", "bf16",
                        "--max-new-tokens", "8", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["attention"] == "torch"
