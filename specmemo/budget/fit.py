"""The one fit: from what a user asked for and a budget to a checked Plan, with its searches.

Every command budgets through `fit`: `plan` reports the request as asked (and what would fit);
`generate`, `chat` and `profile` ask it to shrink k, the draft window and the prefill chunk until
the plan fits, and get BudgetExceeded (with the breakdown) below the lower bound.
"""

from dataclasses import dataclass

from specmemo.budget.arch import Arch
from specmemo.budget.calibration import Calibration
from specmemo.budget.devices import Device, default_dtype, load_device
from specmemo.budget.plan import (
    DEFAULT_DRAFT_LEN, DEFAULT_DRAFT_WINDOW, DEFAULT_PREFILL_CHUNK, HEAD_DRAFTERS, Plan, PlanRequest, make_plan,
)
from specmemo.budget.search import Fit, fit_at_context, lower_bound, max_context, speedup_budget
from specmemo.budget import footprint as fp
from specmemo.budget.speedup import PairProfile, pair_profile
from specmemo.budget.units import count, format_bytes
from specmemo.errors import BadInput, BudgetExceeded
from specmemo.host import c_compiler


@dataclass(frozen=True)
class PlanReport:
    target_name: str
    draft_name: str              # the draft model's name, or the drafter's ("ngram", "none")
    drafter: str                 # "model", "ngram" or "none"
    device: Device
    budget_bytes: int
    plan: Plan
    lower_bound: Plan
    speedup_budget: Plan
    max_context: int | None
    fit: Fit | None              # at the requested context, the largest k and W that fit
    pair: PairProfile
    shrunk: bool = False         # k, W or the prefill chunk were reduced to fit the budget

    @property
    def fits(self) -> bool:
        return self.plan.total_bytes <= self.budget_bytes

    @property
    def predicted_speedup(self) -> float:
        return self.pair.speedup(self.plan.request.draft_len)

    def to_json(self) -> dict:
        req = self.plan.request
        why = self.plan.not_runnable()
        return {
            "fits": self.fits,
            "runnable": not why,
            "not_runnable": why,
            "target": self.target_name,
            "draft": self.draft_name,
            "device": self.device.name,
            "dtype": req.dtype,
            "kv_dtype": req.kv,
            "draft_dtype": req.ddtype if req.draft else None,
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
            "calibrated": self.plan.calibrated,   # budget.calibration: measured here, not the profile's
            "fit_draft_len": self.fit.draft_len if self.fit else None,
            "fit_draft_window": self.fit.draft_window if self.fit else None,
            "predicted_speedup": round(self.predicted_speedup, 4),
            "alpha": self.pair.alpha,
            "c": self.pair.c,
            "speedup_source": self.pair.source,
            "c_source": self.pair.c_source,
            "cost_curve": list(self.pair.curve),
            "cost_curve_source": self.pair.curve_source,
            "drafted_share": self.pair.drafted_share,
            "drafted_share_source": self.pair.drafted_share_source,
            **({"tree_ranks": list(self.pair.ranks), "tree_ranks_source": self.pair.ranks_source} if self.pair.ranks else {}),
            "components": dict(self.plan.components),
        }

    def refusal(self) -> str:
        req = self.plan.request
        return (
            f"does not fit: {self.target_name} in {req.dtype} (KV {req.kv}) needs "
            f"{format_bytes(self.plan.total_bytes)} but the budget is {format_bytes(self.budget_bytes)}; "
            f"the lower bound at {count(req.context, 'token')} is {format_bytes(self.lower_bound.total_bytes)} "
            f"({self.lower_bound.total_bytes} bytes)"
        )

    def breakdown(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.plan.components.items() if v)


def _shrunk_to_fit(req: PlanRequest, budget: int) -> PlanRequest | None:
    """The request with k, then W, then the prefill chunk reduced until it fits; None if nothing does."""
    chunk = req.prefill_chunk
    while chunk >= 1:
        trial = req.with_(prefill_chunk=chunk)
        found = fit_at_context(trial, budget)
        if found is not None:
            return trial.with_(draft_len=found.draft_len, draft_window=found.draft_window or trial.draft_window)
        chunk //= 2
    return None


CALIBRATED = "measured on this host for this run: the load peak beside the weights (budget.calibration)"


def fit(target: Arch, draft: Arch | None, drafter: str, *, device: str | Device = "cpu", budget: int | None = None,
        context: int | None = None, draft_len: int | None = None, draft_window: int | None = None,
        dtype: str | None = None, kv_dtype: str | None = None, draft_dtype: str | None = None, batch: int = 1,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, sampling: bool = True, shrink: bool = False,
        baseline_bytes: int | None = None, head: tuple[int, int, int] | None = None,
        head_card: dict | None = None, calibration: Calibration | None = None) -> PlanReport:
    """Plan `context` tokens (default: the largest that fits) within `budget` (default: the device's
    memory). dtype None means the device's default. baseline_bytes: the process as measured now.
    calibration: what this host measured the same run to need (budget.calibration, as planned);
    without one the device profile's reserves stand in for the baseline, overhead and scratch. With shrink, a request that does not fit is
    reduced (k, W, prefill chunk) or refused with BudgetExceeded. head, head_card: a head
    drafter's (hidden, inner, vocab) and card (models/resolve.head_facts)."""
    dev = device if isinstance(device, Device) else load_device(device)
    budget_bytes = budget if budget is not None else dev.memory_bytes
    if drafter == "none" and draft_len:
        raise BadInput("--draft-len needs a drafter; with --draft none, k is 0")
    k = 0 if drafter == "none" else (draft_len if draft_len is not None else DEFAULT_DRAFT_LEN)
    if drafter in HEAD_DRAFTERS and head is None:
        raise BadInput(f"--draft {drafter} needs the draft head's dimensions to plan")
    # What the head drafts in, as RunningHead.for_machine builds it on a CPU (fp32 elsewhere).
    head_dtype = dev.kernels.head_dtype if dev.kind == "cpu" else "fp32"
    card = head_card
    req = PlanRequest(
        target=target, draft=draft, drafter=drafter, context=1, draft_len=k,
        head=head if drafter in HEAD_DRAFTERS else None,
        head_dtype=head_dtype,
        draft_window=draft_window or DEFAULT_DRAFT_WINDOW, dtype=dtype or default_dtype(dev.kind),
        kv_dtype=kv_dtype, draft_dtype=draft_dtype, batch=batch, prefill_chunk=prefill_chunk,
        baseline_bytes=baseline_bytes if baseline_bytes is not None
        else calibration.baseline_bytes if calibration else dev.baseline_bytes,
        overhead_bytes=calibration.planned_overhead_bytes if calibration else dev.overhead_bytes,
        overhead_reason=CALIBRATED if calibration else dev.overhead_reason,
        measured_scratch=tuple(calibration.scratch.items()) if calibration else None,
        native_attention=dev.kind == "cpu" and dev.kernels.native_attention and c_compiler() is not None,
        workspace_pct=dev.workspace_pct, engine_bytes=dev.engine_bytes, verify_bytes=dev.verify_bytes,
        half_scratch_bytes=dev.half_scratch_bytes, graph_bytes=dev.graph_bytes, device_kind=dev.kind,
        quantized_head=dev.quantized_head, sampling=sampling,
    )
    largest = max_context(req, budget_bytes)
    # Without --context, plan the largest context that fits (at least 1 token, to show a refusal).
    n = context if context is not None else (largest or 1)
    req = req.with_(context=n, draft_window=min(req.draft_window, n) if draft else 0)
    asked = make_plan(req)
    hint = fit_at_context(req, budget_bytes)
    shrunk = False
    if shrink and asked.total_bytes > budget_bytes:
        smaller = _shrunk_to_fit(req, budget_bytes)
        if smaller is None:
            refused = PlanReport(target.name, draft.name if draft else drafter, drafter, dev, budget_bytes, asked,
                                 lower_bound(req), asked, largest, hint, PairProfile(0.0, 0.0, "none"))
            raise BudgetExceeded(f"{refused.refusal()}. Plan: {refused.breakdown()}", plan=asked)
        req, shrunk = smaller, True
    plan = asked if not shrunk else make_plan(req)
    # c estimated from bytes streamed per step: a draft model's weights, or a head's (with its rows).
    step_bytes = fp.weight_bytes(draft, req.ddtype, req.quantized_head) if draft \
        else fp.draft_head_bytes(*head, req.head_dtype) if head else None
    ratio = step_bytes / fp.weight_bytes(target, req.dtype, req.quantized_head) if step_bytes else None
    pair = pair_profile(target.name, draft.name if draft else drafter, drafter, req.dtype,
                        dev.cost_curve(req.dtype), ratio, card, dev.curve_source(req.dtype))
    return PlanReport(
        target_name=target.name, draft_name=draft.name if draft else drafter, drafter=drafter, device=dev,
        budget_bytes=budget_bytes, plan=plan, lower_bound=lower_bound(req),
        speedup_budget=speedup_budget(req, pair), max_context=largest, fit=hint, pair=pair,
        shrunk=shrunk,
    )
