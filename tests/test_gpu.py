"""The CUDA path: greedy equivalence (transformers' forward and ours), our decoder against
transformers, KV in another dtype, the sampling distribution and fixed KV storage on a GPU.
Run by bench/gpu_check.py on a lent GPU; skipped cleanly without one."""

import pytest
import torch

from specmemo.decoding.sampling import SamplingConfig
from specmemo.decoding.verify import verify_sampling
from specmemo.memory import allocator
from tests.tiny import VOCAB, make_engine, own_model, run, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPT = [5, 17, 3, 44, 9, 17, 3, 44, 9, 17, 3]


@pytest.mark.parametrize("own", [False, True], ids=["transformers", "specmemo"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_equivalence_on_cuda(dtype, drafter, own):
    target = tiny_llama(0, scale=8.0).to("cuda", dtype)
    draft = tiny_llama(5, scale=8.0).to("cuda", dtype) if drafter == "model" else None
    plain, _ = run(make_engine(target, "none", device="cuda", own=own), PROMPT, 60)
    spec, _ = run(make_engine(target, drafter, draft, window=16, device="cuda", own=own), PROMPT, 60)
    assert spec == plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_decoder_matches_transformers_on_cuda(dtype):
    from specmemo.memory.hf_adapter import AdapterForward
    from specmemo.budget.plan import PlanRequest, make_plan
    from tests.tiny import arch_of

    target = tiny_llama(0, scale=8.0).to("cuda", dtype)
    plan = make_plan(PlanRequest(target=arch_of(target), draft=None, drafter="none", context=64, draft_len=0,
                                 draft_window=64, dtype="fp32", prefill_chunk=16))
    ids = torch.tensor([PROMPT], device="cuda")
    logits = [fwd(allocator.allocate_target(plan, dtype, "cuda"), ids, len(PROMPT))
              for fwd in (own_model(target), AdapterForward(target))]
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    tol = 1e-3 if dtype == torch.float32 else 0.15
    assert (logits[0] - logits[1]).abs().max().item() < tol


def test_greedy_equivalence_with_kv_in_another_dtype_on_cuda():
    target = tiny_llama(0, scale=8.0).to("cuda", torch.float16)
    kv = torch.float32
    plain, _ = run(make_engine(target, "none", device="cuda", own=True, kv_dtype=kv), PROMPT, 60)
    spec, _ = run(make_engine(target, "ngram", device="cuda", own=True, kv_dtype=kv), PROMPT, 60)
    assert spec == plain


def test_sampling_matches_the_target_on_cuda():
    n = 20_000
    gen = torch.Generator("cuda").manual_seed(0)
    torch.manual_seed(0)
    cfg = SamplingConfig(temperature=1.0, top_k=20)
    p = cfg.probs(torch.randn(2, VOCAB, device="cuda") * 2)
    q = cfg.probs(torch.randn(1, VOCAB, device="cuda") * 2)
    drafts = torch.multinomial(q[0], n, replacement=True, generator=gen)
    first = torch.empty(n, dtype=torch.long)
    for i in range(n):
        a, nxt = verify_sampling(p, q, drafts[i : i + 1], gen)
        first[i] = drafts[i] if a == 1 else nxt
    hist = torch.bincount(first, minlength=VOCAB).double() / n
    p0 = p[0].double().cpu()
    tv = 0.5 * float((hist - p0).abs().sum())
    assert tv < 3 * 0.5 * float(torch.sqrt(p0 * (1 - p0) / n).sum())


def test_kv_storage_is_not_reallocated_on_cuda():
    target = tiny_llama(0).to("cuda", torch.float16)
    engine = make_engine(target, "ngram", device="cuda")
    ptrs = engine.store.data_ptrs()
    for _ in engine.generate(PROMPT, 50):
        assert engine.store.data_ptrs() == ptrs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_cuda_graphs_keep_greedy_equivalence(dtype, drafter):
    target = tiny_llama(0, scale=8.0).to("cuda", dtype)
    draft = tiny_llama(5, scale=8.0).to("cuda", dtype) if drafter == "model" else None
    eager, _ = run(make_engine(target, "none", device="cuda", own=True), PROMPT, 60)
    plain_engine = make_engine(target, "none", device="cuda", graphed=True)
    plain, _ = run(plain_engine, PROMPT, 60)
    spec_engine = make_engine(target, drafter, draft, device="cuda", graphed=True)
    spec, _ = run(spec_engine, PROMPT, 60)
    assert plain_engine.forward.captures >= 1 and spec_engine.forward.captures >= 1
    assert spec == plain
    if dtype == torch.float32:  # the unpadded eager engine rounds otherwise, by ulps
        assert plain == eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("capture", [True, False], ids=["graphed", "eager"])
def test_a_target_step_at_fixed_width_rounds_each_row_as_a_one_token_step_on_cuda(dtype, capture):
    """cuBLAS picks kernels by shape; at one fixed width a verified row is bit-identical to the
    same token in a one-token step (the premise of exact half-precision speculation on a GPU)."""
    from tests.test_own_forward import fixed_width_rows_vs_one_token_steps

    wide, one, same_kv = fixed_width_rows_vs_one_token_steps(dtype, "cuda", capture)
    assert torch.equal(wide, one) and same_kv
