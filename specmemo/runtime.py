"""Assemble a running engine: plan → load → allocate → drafter → engine.

Shared by `generate`, `chat` and `profile`. Memory is measured here: load-time memory, then
the generation peak from just before the KV stores are allocated.
"""

from dataclasses import dataclass

import torch

from specmemo.budget.plan import DEFAULT_PREFILL_CHUNK
from specmemo.decoding.drafters import ModelDrafter, NgramDrafter, NoDrafter
from specmemo.decoding.engine import Engine
from specmemo.decoding.sampling import SamplingConfig
from specmemo.errors import BudgetExceeded
from specmemo.memory import allocator
from specmemo.memory.malloc import tame_glibc_malloc
from specmemo.memory.measure import PeakMeter
from specmemo.models.load import LoadedModel, load_model
from specmemo.planning import PlanReport, build_report

@dataclass
class Runtime:
    report: PlanReport
    target: LoadedModel
    draft: LoadedModel | None
    engine: Engine
    meter: PeakMeter
    load_peak_bytes: int

    @property
    def tokenizer(self):
        return self.target.tokenizer


def check_budget(report: PlanReport) -> None:
    if not report.fits:
        from specmemo.budget.units import format_bytes

        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in report.plan.components.items() if v)
        raise BudgetExceeded(f"{report.refusal()}. Plan: {parts}", plan=report.plan)


def cap_cuda_memory(budget_bytes: int) -> None:
    """A hard cap: allocations beyond the budget fail in the allocator instead of growing into
    memory the plan did not give us."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), 0)


def fit_report(t_ref, d_ref, drafter, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, **kw) -> PlanReport:
    """The requested plan if it fits; else the same context with k, W and the prefill chunk
    shrunk until it fits; refused (BudgetExceeded, with the breakdown) below the lower bound."""
    report = build_report(t_ref, d_ref, drafter, prefill_chunk=prefill_chunk, **kw)
    if report.fits:
        return report
    chunk, trial = prefill_chunk, report
    while chunk >= 1:
        if chunk != prefill_chunk:
            trial = build_report(t_ref, d_ref, drafter, prefill_chunk=chunk, **kw)
        if trial.fit is not None:
            shrunk = {**kw, "draft_len": trial.fit.draft_len or None, "draft_window": trial.fit.draft_window or None}
            return build_report(t_ref, d_ref, drafter, prefill_chunk=chunk, **shrunk)
        chunk //= 2
    check_budget(report)
    return report


def make_drafter(report: PlanReport, draft: LoadedModel | None, sampling: SamplingConfig, device, generator):
    if report.drafter == "none":
        return NoDrafter(device)
    if report.drafter == "ngram":
        return NgramDrafter(device)
    store = allocator.allocate_draft(report.plan, draft.dtype, device)
    return ModelDrafter(draft.model, store, sampling, report.plan.request.draft_window, generator)


def assemble(report: PlanReport, target: LoadedModel, draft: LoadedModel | None, sampling: SamplingConfig,
             load_peak_bytes: int = 0) -> Runtime:
    """Allocate once from the plan and build the engine. Measures generation memory from here."""
    device = target.device
    meter = PeakMeter(device.type)
    meter.start()
    generator = sampling.generator(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    store = allocator.allocate_target(report.plan, target.dtype, device)
    drafter = make_drafter(report, draft, sampling, device, generator)
    req = report.plan.request
    engine = Engine(target.model, store, drafter, sampling, draft_len=req.draft_len,
                    prefill_chunk=req.prefill_chunk, context=req.context, generator=generator)
    return Runtime(report, target, draft, engine, meter, load_peak_bytes)


def open_runtime(target: str, draft: str, *, device: str = "cpu", budget: int | None = None,
                 context: int | None = None, draft_len: int | None = None, draft_window: int | None = None,
                 dtype: str = "fp32", draft_dtype: str | None = None, sampling: SamplingConfig = SamplingConfig(),
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, allow_pickle: bool = False,
                 trust_remote_code: bool = False, min_context: int = 0, refs=None, tokenizer=None) -> Runtime:
    """Resolve, plan (refusing what does not fit), load, allocate. `context` defaults to the
    largest that fits the budget, at least `min_context`."""
    from specmemo.planning import resolve_pair

    # A named profile (e.g. rtx-3060-12gb) gives the budget; its kind says where to run.
    from specmemo.budget.devices import load_device

    profile = device
    device = load_device(profile).kind
    if device == "cuda" and not torch.cuda.is_available():
        from specmemo.errors import UnknownDevice

        raise UnknownDevice(f"--device {profile}: no CUDA device is available to torch")
    if device == "cpu":
        tame_glibc_malloc()
    t_ref, d_ref, drafter = refs or resolve_pair(target, draft)
    report = fit_report(t_ref, d_ref, drafter, device=profile, budget=budget, context=context,
                        draft_len=draft_len, draft_window=draft_window, dtype=dtype, draft_dtype=draft_dtype,
                        prefill_chunk=prefill_chunk, sampling=not sampling.greedy)
    if report.plan.request.context < min_context:
        raise BudgetExceeded(f"the budget holds only {report.plan.request.context} tokens of context; "
                             f"this request needs {min_context}", plan=report.plan)
    if device == "cuda":
        cap_cuda_memory(report.budget_bytes)
    meter = PeakMeter(device)
    meter.start()
    t = load_model(t_ref, dtype, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                   with_tokenizer=tokenizer is None, fast_layout=True)
    if tokenizer is not None:
        t.tokenizer = tokenizer
    d = None
    if d_ref is not None:
        # A draft directory need not carry tokenizer files: its vocabulary size was checked.
        d = load_model(d_ref, draft_dtype or dtype, device, with_tokenizer=False, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, fast_layout=True)
    load_peak = meter.peak()
    return assemble(report, t, d, sampling, load_peak_bytes=load_peak)
