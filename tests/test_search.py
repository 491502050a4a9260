"""The fit searches against brute force, and the lower-bound and speedup budgets' definitions."""

import random

import pytest

from specmemo.budget.arch import Arch
from specmemo.budget.plan import PlanRequest, make_plan
from specmemo.budget.search import fit_at_context, lower_bound, max_context, speedup_budget
from specmemo.budget.speedup import predicted_speedup

TINY = Arch("tiny", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position=600, tie_embeddings=True)
TINY_DRAFT = Arch("tiny-draft", vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=16, max_position=600, tie_embeddings=True)


def _req(**kw):
    base = dict(target=TINY, draft=TINY_DRAFT, drafter="model", context=100, draft_len=4, draft_window=64,
                dtype="fp32", prefill_chunk=32)
    return PlanRequest(**{**base, **kw})


def total(req):
    return make_plan(req).total_bytes


@pytest.mark.parametrize("seed", range(5))
def test_max_context_matches_brute_force(seed):
    rng = random.Random(seed)
    req = _req(draft_len=rng.randint(1, 8), draft_window=rng.randint(1, 200))
    budget = rng.randint(total(req.with_(context=1, draft_window=1)), total(req.with_(context=600)))
    brute = max((n for n in range(1, 601)
                 if total(req.with_(context=n, draft_window=min(req.draft_window, n))) <= budget), default=None)
    assert max_context(req, budget) == brute


@pytest.mark.parametrize("seed", range(5))
def test_fit_at_context_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    req = _req(context=rng.randint(50, 600), draft_len=6, draft_window=rng.randint(10, 300))
    budget = rng.randint(total(req.with_(draft_len=1, draft_window=1)) - 1000, total(req))
    found = fit_at_context(req, budget)
    candidates = [(k, w) for k in range(6, 0, -1) for w in range(min(req.draft_window, req.context), 0, -1)
                  if total(req.with_(draft_len=k, draft_window=w)) <= budget]
    assert ((found.draft_len, found.draft_window) if found else None) == (candidates[0] if candidates else None)


def test_nothing_fits_below_the_lower_bound():
    req = _req(context=300)
    lb = lower_bound(req)
    assert lb.request.draft_len == 1
    assert fit_at_context(req.with_(prefill_chunk=1), lb.total_bytes - 1) is None
    assert fit_at_context(req.with_(prefill_chunk=1), lb.total_bytes) is not None


def test_speedup_budget_is_the_least_k_keeping_96_percent():
    req = _req(context=300, draft_len=8)
    alpha, c = 0.7, 0.05
    plan = speedup_budget(req, alpha, c)
    best = max(predicted_speedup(alpha, c, k) for k in range(1, 17))
    k = plan.request.draft_len
    assert predicted_speedup(alpha, c, k) >= 0.96 * best
    assert predicted_speedup(alpha, c, k - 1) < 0.96 * best
    assert plan.total_bytes <= total(req.with_(draft_len=k + 1))


def test_speedup_model_values():
    assert predicted_speedup(0.8, 0.0, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert predicted_speedup(0.6, 0.05, 5) == pytest.approx((1 - 0.6**6) / (0.4 * 1.25))
    assert predicted_speedup(0.5, 0.1, 0) == 1.0


def test_components_sum_to_total_and_ngram_costs_no_draft_memory():
    plan = make_plan(_req(draft=None, drafter="ngram"))
    assert plan.components["draft_weights"] == plan.components["draft_kv"] == 0
    assert sum(plan.components.values()) == plan.total_bytes
