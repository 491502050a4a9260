"""Searches over plans: what fits a budget, the lower-bound budget, and the speedup budget.

Every component grows monotonically with context N, draft length k and draft window W, so
the largest fitting value of each is found by bisection.
"""

from dataclasses import dataclass

from specmemo.budget.plan import Plan, PlanRequest, make_plan
from specmemo.budget.speedup import KEEP_FRACTION, MAX_DRAFT_LEN, PairProfile


def _largest(lo: int, hi: int, fits) -> int | None:
    """Largest x in [lo, hi] with fits(x), for monotone fits; None if even lo fails."""
    if lo > hi or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_context(req: PlanRequest, budget: int) -> int | None:
    """Largest context that fits with the request's k, and its window capped at the context."""
    def fits(n: int) -> bool:
        return make_plan(req.with_(context=n, draft_window=min(req.draft_window, n))).total_bytes <= budget

    return _largest(1, req.target.max_position, fits)


@dataclass(frozen=True)
class Fit:
    """The request shrunk, if need be, to fit: k first kept, then the window, then k reduced."""
    draft_len: int
    draft_window: int


def fit_at_context(req: PlanRequest, budget: int) -> Fit | None:
    """At the request's context, the largest k (≤ requested) and then largest W (≤ requested) that fit."""
    for k in range(req.draft_len, 0 if req.drafter != "none" else -1, -1):
        if req.draft is None:
            if make_plan(req.with_(draft_len=k)).total_bytes <= budget:
                return Fit(k, 0)
            continue
        w = _largest(1, min(req.draft_window, req.context),
                     lambda w, k=k: make_plan(req.with_(draft_len=k, draft_window=w)).total_bytes <= budget)
        if w is not None:
            return Fit(k, w)
    return None


def lower_bound(req: PlanRequest) -> Plan:
    """The least memory that runs speculative decoding (k = 1) at this context: a one-token draft
    window and one-token prefill chunks. Slow, but it runs. With drafter `none`, k = 0."""
    k = 0 if req.drafter == "none" else 1
    return make_plan(req.with_(draft_len=k, draft_window=1, prefill_chunk=1))


def speedup_budget(req: PlanRequest, pair: PairProfile) -> Plan:
    """The least memory that keeps ≥ 96% of the best predicted speedup over k ∈ [1, 16]."""
    if req.drafter == "none":
        return make_plan(req)
    best = max(pair.speedup(k) for k in range(1, MAX_DRAFT_LEN + 1))
    k = next(k for k in range(1, MAX_DRAFT_LEN + 1) if pair.speedup(k) >= KEEP_FRACTION * best)
    return make_plan(req.with_(draft_len=k))
