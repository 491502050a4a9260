"""From user arguments to a PlanReport: resolve models, build the plan, run the searches.

Shared by `plan`, `generate`, `chat` and `profile`, so every command budgets the same way.
"""

from dataclasses import dataclass

from specmemo.budget.devices import Device, load_device
from specmemo.budget.plan import (
    DEFAULT_DRAFT_LEN, DEFAULT_DRAFT_WINDOW, DEFAULT_PREFILL_CHUNK, Plan, PlanRequest, make_plan,
)
from specmemo.budget.search import Fit, fit_at_context, lower_bound, max_context, speedup_budget
from specmemo.budget.speedup import PairProfile, pair_profile, predicted_speedup
from specmemo.budget.units import format_bytes
from specmemo.errors import BadInput
from specmemo.models.resolve import ModelRef, check_vocab, resolve

DRAFTER_NAMES = ("ngram", "none")


@dataclass(frozen=True)
class PlanReport:
    target: ModelRef
    draft: ModelRef | None
    drafter: str
    device: Device
    budget_bytes: int
    plan: Plan
    lower_bound: Plan
    speedup_budget: Plan
    max_context: int | None
    fit: Fit | None
    pair: PairProfile

    @property
    def fits(self) -> bool:
        return self.plan.total_bytes <= self.budget_bytes

    @property
    def predicted_speedup(self) -> float:
        return predicted_speedup(self.pair.alpha, self.pair.c, self.plan.request.draft_len)

    def to_json(self) -> dict:
        req = self.plan.request
        return {
            "fits": self.fits,
            "target": self.target.name,
            "draft": self.draft.name if self.draft else self.drafter,
            "device": self.device.name,
            "dtype": req.dtype,
            "kv_dtype": req.kv,
            "draft_dtype": req.ddtype if self.draft else None,
            "batch": req.batch,
            "context": req.context,
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.plan.total_bytes,
            "generation_bytes": self.plan.generation_bytes,
            "lower_bound_bytes": self.lower_bound.total_bytes,
            "speedup_budget_bytes": self.speedup_budget.total_bytes,
            "speedup_budget_draft_len": self.speedup_budget.request.draft_len,
            "max_context": self.max_context,
            "draft_len": req.draft_len,
            "draft_window": req.draft_window,
            "prefill_chunk": req.prefill_chunk,
            "fit_draft_len": self.fit.draft_len if self.fit else None,
            "fit_draft_window": self.fit.draft_window if self.fit else None,
            "predicted_speedup": round(self.predicted_speedup, 4),
            "alpha": self.pair.alpha,
            "c": self.pair.c,
            "speedup_source": self.pair.source,
            "components": dict(self.plan.components),
        }

    def refusal(self) -> str:
        return (
            f"does not fit: needs {format_bytes(self.plan.total_bytes)} but the budget is "
            f"{format_bytes(self.budget_bytes)}; the lower bound at {self.plan.request.context} tokens is "
            f"{format_bytes(self.lower_bound.total_bytes)} ({self.lower_bound.total_bytes} bytes)"
        )


def resolve_pair(target: str, draft: str) -> tuple[ModelRef, ModelRef | None, str]:
    t = resolve(target)
    if draft in DRAFTER_NAMES:
        return t, None, draft
    d = resolve(draft)
    check_vocab(t, d)
    return t, d, "model"


def build_report(
    target: ModelRef,
    draft: ModelRef | None,
    drafter: str,
    *,
    device: str = "cpu",
    budget: int | None = None,
    context: int | None = None,
    draft_len: int | None = None,
    draft_window: int | None = None,
    dtype: str = "fp16",
    kv_dtype: str | None = None,
    draft_dtype: str | None = None,
    batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    sampling: bool = True,
) -> PlanReport:
    dev = load_device(device)
    budget_bytes = budget if budget is not None else dev.memory_bytes
    k = 0 if drafter == "none" else (draft_len if draft_len is not None else DEFAULT_DRAFT_LEN)
    if drafter == "none" and draft_len:
        raise BadInput("--draft-len needs a drafter; with --draft none, k is 0")
    req = PlanRequest(
        target=target.arch, draft=draft.arch if draft else None, drafter=drafter,
        context=1, draft_len=k, draft_window=draft_window or DEFAULT_DRAFT_WINDOW,
        dtype=dtype, kv_dtype=kv_dtype, draft_dtype=draft_dtype, batch=batch, prefill_chunk=prefill_chunk,
        overhead_bytes=dev.overhead_bytes, overhead_reason=dev.overhead_reason,
        workspace_pct=dev.workspace_pct, engine_bytes=dev.engine_bytes,
        verify_bytes=dev.verify_bytes, sampling=sampling,
    )
    largest = max_context(req, budget_bytes)
    # Without --context, plan the largest context that fits (at least 1 token, to show a refusal).
    n = context if context is not None else (largest or 1)
    req = req.with_(context=n, draft_window=min(req.draft_window, n) if draft else 0)
    plan = make_plan(req)
    pair = pair_profile(target.name, draft.name if draft else drafter, drafter)
    return PlanReport(
        target=target, draft=draft, drafter=drafter, device=dev, budget_bytes=budget_bytes,
        plan=plan, lower_bound=lower_bound(req), speedup_budget=speedup_budget(req, pair.alpha, pair.c),
        max_context=largest, fit=fit_at_context(req, budget_bytes), pair=pair,
    )
