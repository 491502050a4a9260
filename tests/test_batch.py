"""Batched speculative decoding (decoding/batch.py): each row gives exactly its batch-1 tokens,
whatever the other rows' prompt lengths and acceptance, and a finished row's slot is reused."""

import pytest
import torch

from specmemo.budget.plan import PlanRequest, make_plan
from specmemo.decoding.batch import BatchEngine, BatchStats, SequenceDone
from specmemo.decoding.drafters import NgramDrafter, NoDrafter
from specmemo.decoding.sampling import SamplingConfig
from specmemo.memory import allocator
from tests.test_greedy_equivalence import TARGET, prompts
from tests.tiny import arch_of, make_engine, own_model, run


def batch_engine(batch, drafter="ngram", *, context=160, k=5, chunk=16, dtype=torch.float32, model=None):
    model = model or own_model(TARGET())
    req = PlanRequest(target=arch_of(TARGET()), draft=None, drafter=drafter, context=context,
                      draft_len=0 if drafter == "none" else k, draft_window=context, dtype="fp32",
                      prefill_chunk=chunk, batch=batch)
    store = allocator.allocate_target(make_plan(req), dtype, "cpu")
    make = (lambda: NgramDrafter("cpu")) if drafter == "ngram" else (lambda: NoDrafter("cpu"))
    return BatchEngine(model.forward_rows, store, make, SamplingConfig(), draft_len=req.draft_len,
                       prefill_chunk=chunk, context=context, measure_cost=False)


def run_batch(engine, prompt_list, max_new, stop_ids=frozenset()):
    """Each request's SequenceDone, and the run's BatchStats; the Step events each request yielded
    add up to its tokens and its stats, as the single-sequence engine's do."""
    from specmemo.decoding.events import Step

    done, stats, steps = {}, None, {}
    for ev in engine.run(prompt_list, max_new, stop_ids):
        if isinstance(ev, SequenceDone):
            done[ev.index] = ev
        elif isinstance(ev, Step):
            steps.setdefault(ev.sequence, []).append(ev)
        elif isinstance(ev, BatchStats):
            stats = ev
    assert isinstance(stats, BatchStats)
    for index, seq in done.items():
        assert [t for step in steps[index] for t in step.tokens] == seq.tokens
        assert sum(step.accepted for step in steps[index]) == seq.stats.accepted_tokens
        assert sum(step.drafted for step in steps[index]) == seq.stats.drafted_tokens
    return done, stats


# Prompts of different lengths (10..45 tokens, so some take several prefill chunks of 16), some
# repetitive enough that the n-gram drafter is accepted often, others not at all.
PROMPTS = prompts(7, seed=3)


@pytest.mark.parametrize("drafter", ["ngram", "none"])
def test_every_row_gives_its_batch1_tokens(drafter):
    alone = [run(make_engine(TARGET(), drafter, own=True, chunk=16, k=5), p, 40)[0] for p in PROMPTS]
    done, stats = run_batch(batch_engine(3, drafter), PROMPTS, 40)
    assert [done[i].tokens for i in range(len(PROMPTS))] == alone
    assert stats.new_tokens == 40 * len(PROMPTS)
    # Seven prompts through three rows: the pool refilled slots as sequences finished.
    assert stats.largest_forward > 3
    if drafter == "ngram":
        accepted = [done[i].stats.accepted_tokens for i in range(len(PROMPTS))]
        assert max(accepted) > 0 and len(set(accepted)) > 1   # ragged acceptance across rows


def test_a_row_finishing_early_frees_its_slot_for_the_next_prompt():
    plain = run(make_engine(TARGET(), "none", own=True, chunk=16), PROMPTS[0], 30)[0]
    stop = plain[5]   # row 0 stops at its sixth token; the others run to 30
    alone = [run(make_engine(TARGET(), "ngram", own=True, chunk=16), p, 30, {stop})[0] for p in PROMPTS[:4]]
    done, _ = run_batch(batch_engine(2), PROMPTS[:4], 30, {stop})
    assert [done[i].tokens for i in range(4)] == alone
    assert done[0].stats.stop_reason == "stop_token" and len(done[0].tokens) == plain.index(stop) + 1
    # Prompt 2 took row 0 as soon as prompt 0 finished there, while prompt 1 was still decoding.
    assert done[2].row == done[0].row != done[1].row
    assert done[0].latency_seconds <= done[2].admitted_seconds < done[1].latency_seconds


def test_rejection_is_a_pointer_move_per_row():
    engine = batch_engine(2)
    ptrs = [r.data_ptrs() for r in engine.rows]
    lengths = []
    for ev in engine.run(PROMPTS[:2], 30):
        lengths.append([r.length for r in engine.rows])
        assert [r.data_ptrs() for r in engine.rows] == ptrs
    assert ptrs[0] != ptrs[1]


def test_half_precision_rows_are_bitwise_their_batch1_tokens():
    """bf16: the packed forward's rows round exactly as each sequence alone (row-exact attention
    per row; matmuls that the model's probe found row-exact)."""
    from specmemo.models.llama import LlamaModel

    own = own_model(TARGET())
    half = LlamaModel(own.cfg, torch.bfloat16)
    for dst, src in zip(half.tensors(), own.tensors()):
        dst.copy_(src)
    req = PlanRequest(target=arch_of(TARGET()), draft=None, drafter="ngram", context=160, draft_len=5,
                      draft_window=160, dtype="bf16", prefill_chunk=16)
    alone = []
    for p in PROMPTS[:4]:
        from specmemo.decoding.engine import Engine

        store = allocator.allocate_target(make_plan(req), torch.bfloat16, "cpu")
        eng = Engine(half, store, NgramDrafter("cpu"), SamplingConfig(), draft_len=5, prefill_chunk=16, context=160)
        alone.append(run(eng, p, 40)[0])
    done, _ = run_batch(batch_engine(4, dtype=torch.bfloat16, model=half), PROMPTS[:4], 40)
    assert [done[i].tokens for i in range(4)] == alone


def test_a_prompt_that_fills_the_context_is_refused_in_one_line():
    from specmemo.errors import BadInput

    with pytest.raises(BadInput, match="prompt 2 has 30 tokens"):
        run_batch(batch_engine(2, context=30), [PROMPTS[0][:10], list(range(30))], 5)


def test_batch_draft_counts_keep_the_drafts_that_pay_for_the_wider_forward():
    from specmemo.budget.speedup import batch_draft_counts

    linear = tuple(1 + 0.2 * (n - 1) for n in range(1, 9))   # C(n) = 1 + 0.2 (n − 1)
    # Two decoding rows (2 fixed tokens, rate 2 / 1.2): drafts taken best first, 0.9, 0.81, 0.729
    # (rates 2.9/1.4, 3.71/1.6, 4.439/1.8 = 2.47), then row 1's 0.1 lowers it (4.539/2.0).
    assert batch_draft_counts([0.9, 0.1], [3, 3], 2, linear) == [3, 0]
    assert batch_draft_counts([0.9, 0.1], [3, 3], 2, ()) == [3, 3]            # a flat curve: every draft pays
    steep = tuple(float(n) for n in range(1, 9))                              # C(n) = n: no draft pays
    assert batch_draft_counts([0.9, 0.1], [3, 3], 2, steep) == [0, 0]
    assert batch_draft_counts([0.9], [0], 1, linear) == [0]                   # nothing offered


def test_batched_sampling_follows_the_target_distribution():
    """Sampling in a batch: N copies of one prompt through 8 rows, n-gram drafts verified by
    rejection sampling per row; the first two tokens' histograms match the target's marginals
    (the bound of tests/test_sampling_distribution.py at this N)."""
    from tests import test_sampling_distribution as sd

    n = 2000
    cfg = SamplingConfig(temperature=1.0)
    p0, _, p1 = sd.distributions(cfg)
    own = own_model(sd.TARGET())
    req = PlanRequest(target=arch_of(sd.TARGET()), draft=None, drafter="ngram", context=32, draft_len=3,
                      draft_window=32, dtype="fp32", prefill_chunk=16, batch=8)
    store = allocator.allocate_target(make_plan(req), torch.float32, "cpu")
    engine = BatchEngine(own.forward_rows, store, lambda: NgramDrafter("cpu", min_ngram=1), cfg, draft_len=3, prefill_chunk=16,
                         context=32, generator=torch.Generator().manual_seed(7), measure_cost=False)
    # Three new tokens: the second step may draft (a step drafts at most its remaining budget − 1).
    done, _ = run_batch(engine, [sd.PROMPT] * n, 3)
    first = torch.tensor([done[i].tokens[0] for i in range(n)])
    second = torch.tensor([done[i].tokens[1] for i in range(n)])
    assert sum(done[i].stats.drafted_tokens for i in range(n)) > 0   # the prompt repeats: n-gram drafts ran
    bound = lambda p: 3 * 0.5 * float(torch.sqrt(p * (1 - p) / n).sum())
    p_second = (p0[:, None] * p1.double()).sum(0)
    assert sd.tv(torch.bincount(first, minlength=sd.VOCAB).double() / n, p0) < bound(p0)
    assert sd.tv(torch.bincount(second, minlength=sd.VOCAB).double() / n, p_second) < bound(p_second)


def test_forward_cost_is_the_measured_line_after_warmup_and_the_curve_before():
    from specmemo.decoding.batch import ForwardCost

    cost = ForwardCost((1.0, 1.5, 2.0), warmup=4)
    assert cost(3) == 2.0                              # nothing measured: the pair's curve
    for tokens in (8, 16, 8, 24, 16, 32):
        cost.record(tokens, 0.075 + 0.002 * tokens)    # t(T) = 75 ms + 2 ms per token
    a, b = cost.line()
    assert abs(a - 0.075) < 1e-9 and abs(b - 0.002) < 1e-9
    assert abs(cost(40) - 0.155) < 1e-9
    flat = ForwardCost((), warmup=2)
    for _ in range(5):
        flat.record(8, 0.1)                            # one width only: no line to fit
    assert flat.line() is None and flat(8) == 1.0
