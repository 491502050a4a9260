"""The compiled row-exact products (models/kernels/row_matmul.c through models/kernels/native.py): a q4 model's
bf16 LM head (models/quant.NativeHead) and q4 layer matrices (NativeQ4). Each row of a product
of many rows has the bits of that row multiplied alone, so verification equals plain decoding;
the values are those of the dense product up to fp32 (head) or 16-bit activations and a bf16
output (q4).
"""

import pytest
import torch

from specmemo.models.kernels import native
from specmemo.models.quant import Int4Weight, NativeHead, NativeQ4

from tests.test_quant import CONFIG, Q, logits_of, write_tiny_gguf, dense_model

KERNEL = native.row_matmul()
pytestmark = pytest.mark.skipif(KERNEL is None, reason=f"no compiled row_matmul here: {native.why_not()}")


def rows_alone_equal(times, x):
    """Whether every row of times(x) (x [M, K]) equals times(that row alone), at every M."""
    whole = times(x)
    return all(torch.equal(times(x[:m])[m - 1], whole[m - 1]) and torch.equal(times(x[m - 1:m])[0], whole[m - 1])
               for m in range(1, x.shape[0] + 1))


def test_the_head_product_is_row_exact_and_the_dense_products_value():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=gen).bfloat16()             # [V, E]
    head = NativeHead(w, KERNEL)
    x = torch.randn(17, 96, generator=gen).bfloat16()               # past one tile, odd
    assert rows_alone_equal(head.times, x)
    got = head.times(x)
    assert got.dtype == torch.float32 and got.shape == (17, 300)
    assert torch.allclose(got, x.float() @ w.float().t(), atol=1e-4)
    assert torch.equal(head.rows(torch.tensor([5, 0, 299])), w[[5, 0, 299]])
    assert torch.equal(head.times(x.reshape(1, 17, 96))[0], got)     # [B, n, E] as the decoder passes it
    long = torch.randn(KERNEL.MAX_ROWS + 44, 96, generator=gen).bfloat16()   # a long prefill: in slices
    assert torch.allclose(head.times(long), long.float() @ w.float().t(), atol=1e-4)


def test_the_q4_product_is_row_exact_and_near_the_dequantized_product():
    gen = torch.Generator().manual_seed(1)
    out, n_in = 80, 192
    q = torch.randint(0, 16, (out, n_in), generator=gen)
    scale = torch.rand(out, n_in // 32, generator=gen).half().float() * 0.05
    m = -torch.rand(out, n_in // 32, generator=gen).half().float() * 0.3
    zero = m + 8 * scale
    native_q4 = NativeQ4.from_q4(q, scale, zero, KERNEL)
    reference = Int4Weight.from_q4(q, scale, zero, torch.float32).dequantize()   # [in, out]
    x = torch.randn(19, n_in, generator=gen).bfloat16()
    x[3, 32:64] = 0                                                 # a group of zeros: its scale is 0
    assert rows_alone_equal(native_q4.times, x)
    got = native_q4.times(x)
    want = x.float() @ reference
    assert got.dtype == torch.bfloat16 and got.shape == (19, out)
    torch_int4 = (x @ Int4Weight.from_q4(q, scale, zero, torch.bfloat16)).float()
    error = ((got.float() - want).norm() / want.norm()).item()
    assert error < 0.005 and error < 1.5 * ((torch_int4 - want).norm() / want.norm()).item()   # as torch's kernel
    assert native_q4.shape == (n_in, out) and sum(t.numel() * t.element_size() for t in native_q4.tensors()) \
        == out * n_in // 2 + out * n_in // 32 * 4                    # 0.625 bytes a weight, as Int4Weight
    with pytest.raises(ValueError, match="refused"):
        KERNEL.q4(torch.randn(2, 48).bfloat16(), native_q4.nibbles[:, :24], native_q4.dm[:, :1])   # 48: not 32s


@pytest.mark.parametrize("layers", [False, True])
def test_a_q4_model_through_the_kernels_verifies_exactly_and_stays_near_the_dense_model(tmp_path, monkeypatch, layers):
    """Greedy speculation equals plain decoding with the head (and, where chosen, the layers) on
    the kernel; logits stay near the dense fp32 model's; embeddings are the head's rows."""
    import dataclasses

    from specmemo.budget.arch import Arch
    from specmemo.budget.devices import load_device
    from specmemo.budget.plan import PlanRequest, make_plan
    from specmemo.decoding.drafters import NgramDrafter, NoDrafter
    from specmemo.decoding.engine import Engine
    from specmemo.decoding.events import collect
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.memory.allocator import allocate_target
    from specmemo.models.load_gguf import load_gguf_q4

    kernels = dataclasses.replace(load_device("cpu").kernels, native_head=True, native_q4=layers)
    hf = write_tiny_gguf(tmp_path / "t.gguf", Q.Q4_1)
    model = load_gguf_q4(str(tmp_path / "t.gguf"), CONFIG, torch.bfloat16, kernels)
    assert isinstance(model.head, NativeHead) and model.embed is model.head
    assert isinstance(model.layers[0].w_qkv, NativeQ4 if layers else Int4Weight)
    ids = torch.randint(0, 96, (1, 27), generator=torch.Generator().manual_seed(1))
    got, ref = logits_of(model, ids), logits_of(dense_model(hf), ids)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(model.embed_tokens(ids[:, :3])[0], hf["embed"][ids[0, :3]].bfloat16())

    arch = Arch.from_config(CONFIG, name="tiny")
    prompt = ([5, 17, 3, 44, 9, 61, 2, 33, 70] * 5)[:40]

    def engine(kind):
        plan = make_plan(PlanRequest(target=arch, draft=None, drafter=kind, context=200,
                                     draft_len=0 if kind == "none" else 4, draft_window=200, dtype="bf16"))
        store = allocate_target(plan, torch.bfloat16, "cpu")
        drafter = NoDrafter("cpu") if kind == "none" else NgramDrafter("cpu")
        return Engine(model, store, drafter, SamplingConfig(), draft_len=plan.request.draft_len, prefill_chunk=16,
                      context=200)

    plain, _ = collect(engine("none").generate(prompt, 60))
    out, stats = collect(engine("ngram").generate(prompt, 60))
    assert out == plain and stats.drafted_tokens > 0 and stats.accepted_tokens > 0


def test_the_kernel_is_chosen_only_where_the_device_profile_says(monkeypatch):
    from specmemo.budget.devices import Kernels
    from specmemo.models.quant import native_kernels

    for q4, head in [(False, False), (True, False), (False, True)]:
        kernels = Kernels(native_q4=q4, native_head=head)
        assert (native_kernels("q4", kernels) is not None) == q4
        assert (native_kernels("head", kernels) is not None) == head
