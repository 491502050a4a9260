"""The fit searches against brute force, and the lower-bound and speedup budgets' definitions."""

import random

import pytest

from specmemo.budget.arch import Arch
from specmemo.budget.plan import PlanRequest, make_plan
from specmemo.budget.search import fit_at_context, lower_bound, max_context, speedup_budget
from specmemo.budget.speedup import PairProfile, best_draft_len, predicted_speedup, step_cost

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


@pytest.mark.parametrize("curve", [(), (1.0, 1.2, 1.3, 1.5, 1.9, 2.0)], ids=["flat", "measured"])
def test_speedup_budget_is_the_least_k_keeping_96_percent(curve):
    req = _req(context=300, draft_len=8)
    pair = PairProfile(0.7, 0.05, "test", curve)
    plan = speedup_budget(req, pair)
    best = max(pair.speedup(k) for k in range(1, 17))
    k = plan.request.draft_len
    assert pair.speedup(k) >= 0.96 * best
    assert pair.speedup(k - 1) < 0.96 * best
    assert plan.total_bytes <= total(req.with_(draft_len=k + 1))


def test_speedup_model_values():
    assert predicted_speedup(0.8, 0.0, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert predicted_speedup(0.6, 0.05, 5) == pytest.approx((1 - 0.6**6) / (0.4 * 1.25))
    assert predicted_speedup(0.5, 0.1, 0) == 1.0
    # a measured verification cost: C(6) = 2.0 one-token forwards
    curve = (1.0, 1.2, 1.3, 1.5, 1.9, 2.0)
    assert predicted_speedup(0.6, 0.05, 5, curve) == pytest.approx((1 - 0.6**6) / (0.4 * (2.0 + 0.25)))
    assert step_cost(curve, 8) == pytest.approx(2.0 + 2 * 0.2)   # past the points: the mean slope
    assert step_cost((), 9) == 1.0


def test_a_steep_verification_cost_asks_for_shorter_drafts():
    flat, steep = (), (1.0, 1.2, 1.3, 1.5, 1.9, 2.0, 2.2, 2.4)
    assert best_draft_len(0.6, 0.0, flat, 16) == 16        # free verification: draft as far as allowed
    assert best_draft_len(0.6, 0.0, steep, 16) == 2
    assert best_draft_len(0.9, 0.0, steep, 16) > best_draft_len(0.6, 0.0, steep, 16)
    assert best_draft_len(0.05, 0.3, steep, 16) == 1       # never below one: acceptance is still measured


def test_components_sum_to_total_and_ngram_costs_no_draft_memory():
    plan = make_plan(_req(draft=None, drafter="ngram"))
    assert plan.components["draft_weights"] == plan.components["draft_kv"] == 0
    assert sum(plan.components.values()) == plan.total_bytes


def test_the_engine_drafts_shorter_after_rejections_and_longer_after_acceptances():
    from specmemo.decoding.engine import DraftLength
    from specmemo.decoding.events import Step

    steep = (1.0, 1.1, 1.2, 1.3, 1.45, 1.6, 1.75, 1.9)
    lengths = DraftLength(PairProfile(0.6, 0.0, "test", steep), max_k=8)
    k = lengths.first()
    for _ in range(10):
        k = lengths.after(Step([1], drafted=k, accepted=0))
    assert k == 1 and lengths.alpha < 0.2
    for _ in range(30):
        k = lengths.after(Step([1] * (k + 1), drafted=k, accepted=k))
    assert k == 8 and lengths.alpha > 0.9
    assert best_draft_len(lengths.alpha, 0.0, steep, 8) == k
