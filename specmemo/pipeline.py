"""The running pipeline: resolve → plan (fit) → load → allocate → drafter → engine.

Shared by `generate`, `chat` and `profile`. Memory is measured here with one PeakMeter: the
process before loading (counted in the plan as process_baseline), the load peak, and the
generation peak from just before the KV stores are allocated.
"""

from dataclasses import dataclass, replace

import torch

from specmemo.budget import calibration
from specmemo.budget.devices import load_device
from specmemo.budget.fit import PlanReport
from specmemo.budget.plan import DEFAULT_PREFILL_CHUNK, HEAD_DRAFTERS
from specmemo.budget.units import count
from specmemo.decoding.batch import BatchEngine
from specmemo.decoding.drafters import HeadDrafter, LookupHeadDrafter, ModelDrafter, NgramDrafter, NoDrafter
from specmemo.decoding.engine import Engine
from specmemo.decoding.sampling import SamplingConfig
from specmemo.errors import BadInput, BudgetExceeded, UnknownDevice
from specmemo.memory import allocator
from specmemo.memory.malloc import tame_glibc_malloc, trim_heap
from specmemo.memory.measure import PeakMeter
from specmemo.models.load import LoadedModel, check_architecture, load_model, torch_dtype
from specmemo.models.resolve import plan_pair, resolve_pair


@dataclass
class Pipeline:
    report: PlanReport
    target: LoadedModel
    draft: LoadedModel | None
    engine: Engine | BatchEngine
    meter: PeakMeter          # baseline: just before the KV stores were allocated
    preload_bytes: int = 0    # the whole process just before loading weights
    load_peak_bytes: int = 0  # what loading added at its peak, above preload_bytes
    calibrated: bool = False  # planned with this host's calibration, and records what it measures (calibrate)

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def process_peak_bytes(self) -> int:
        """Whole-process peak from before loading until now: what the budget bounds."""
        return max(self.preload_bytes + self.load_peak_bytes, self.meter.peak())

    def calibrate(self) -> None:
        """Record what this run measured beside the tensors its plan counts (budget.calibration),
        so that the next plan of the same run on this host reserves that instead of the device
        profile's figures: the process before loading, the load peak beside the weights, and the
        generation peak (since the meter's last reset) beside the counted generation memory at
        the KV slots touched so far. Single sequences on a CPU only."""
        report = self.report
        if (report.device.kind != "cpu" or isinstance(self.engine, BatchEngine) or not self.preload_bytes
                or not self.calibrated):
            return
        plan, req, touched = report.plan, report.plan.request, self.engine.store.touched
        counted = plan.counted_generation_bytes(touched)
        calibration.record(
            calibration.run_key(report.target_name, report.draft_name, req.dtype, req.draft_dtype, report.device.name),
            calibration.Calibration(baseline_bytes=self.preload_bytes,
                                    overhead_bytes=max(0, self.load_peak_bytes - plan.weights_bytes),
                                    scratch={calibration.bucket(touched): max(0, self.meter.above_baseline() - counted)}))


def cuda_cap_fraction(budget_bytes: int, overhead_bytes: int, total_bytes: int) -> float:
    """The caching allocator's share of the device: the budget less the CUDA context (counted in
    the plan's runtime_overhead, and outside the allocator)."""
    return max(0.0, min(1.0, (budget_bytes - overhead_bytes) / total_bytes))


def cap_cuda_memory(report: PlanReport) -> None:
    """A hard cap: allocations beyond the budget fail in the allocator instead of growing into
    memory the plan did not give us."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(
        cuda_cap_fraction(report.budget_bytes, report.device.overhead_bytes, total), 0)


def step_forward(model: LoadedModel, cuda_graphs: bool, verify_tokens: int | None = None):
    """The forward the engine calls. On a GPU our decoder's small steps replay CUDA graphs, and a
    target's (verify_tokens: its widest verification) run at one fixed width of at least
    graphs.ROWS, graphed or not, so plain decoding and speculation round alike (models/graphs.py)."""
    if model.device.type == "cuda" and model.forward_path == "specmemo" and (cuda_graphs or verify_tokens):
        from specmemo.models.graphs import ROWS, GraphedForward

        rows = None if verify_tokens is None else max(ROWS, verify_tokens)
        return GraphedForward(model.forward, capture=cuda_graphs, rows=rows)
    return model.forward


def running_head(target: LoadedModel, device, drafter: str):
    """The target's shipped draft head as it drafts (models/draft_head.RunningHead: packed where this
    machine packs it). Built while the target loads: the plan counts it with the weights."""
    if target.forward_path != "specmemo":
        raise BadInput(f"--draft {drafter} needs specmemo's own decoder (--forward specmemo)")
    from specmemo.models.draft_head import RunningHead, load_head
    from specmemo.models.resolve import head_file

    head, _ = load_head(head_file(target.ref.name))
    return RunningHead.for_machine(head.to(device), target.model)


def make_drafter(report: PlanReport, target: LoadedModel, draft: LoadedModel | None, sampling: SamplingConfig,
                 device, generator, cuda_graphs: bool = True, head=None):
    """head: the RunningHead for head drafters (built here when not given)."""
    if report.drafter == "none":
        return NoDrafter(device)
    if report.drafter == "ngram":
        return NgramDrafter(device)
    if report.drafter in HEAD_DRAFTERS:
        kind = HeadDrafter if report.drafter == "head" else LookupHeadDrafter
        return kind(target.model, head or running_head(target, device, report.drafter), sampling, generator)
    req = report.plan.request
    store = allocator.allocate_draft(report.plan, torch_dtype(req.draft_kv), device)
    return ModelDrafter(step_forward(draft, cuda_graphs), store, sampling, req.draft_window, generator,
                        prefill_chunk=req.prefill_chunk)


def assemble(report: PlanReport, target: LoadedModel, draft: LoadedModel | None, sampling: SamplingConfig,
             preload_bytes: int = 0, load_peak_bytes: int = 0, cuda_graphs: bool = True,
             batched: bool = False, head=None) -> Pipeline:
    """Allocate once from the plan and build the engine. Generation memory is measured from here.
    head: a head drafter's RunningHead, built before (pipeline.running_head) so that its packed copy
    is not measured as generation memory; built here when not given.
    cuda_graphs: replay our decoder's decode/verify steps as CUDA graphs on a GPU (models/graphs.py).
    batched: the batch engine (decoding/batch.py), one KV row per sequence of the plan's batch."""
    why = report.plan.not_runnable()
    if why:
        raise BadInput(f"this plan is not runnable yet: {'; '.join(why)}")
    device = target.device
    meter = PeakMeter(device.type, fixed_bytes=report.device.overhead_bytes if device.type == "cuda" else 0)
    if device.type == "cpu":
        trim_heap()   # what loading freed leaves the heap now, not at some later step: a steady baseline
    meter.start()
    generator = sampling.generator(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    req = report.plan.request
    store = allocator.allocate_target(report.plan, torch_dtype(req.kv), device)
    if batched:
        if target.forward_path != "specmemo":
            raise BadInput("batched decoding needs specmemo's own decoder; this model runs through transformers")
        if report.drafter in HEAD_DRAFTERS:   # every row drafts with the one head and its copied rows
            one = make_drafter(report, target, draft, sampling, device, generator, head=head)
            new_drafter = lambda: type(one)(target.model, one.running, sampling, generator)
        else:
            new_drafter = lambda: make_drafter(report, target, draft, sampling, device, generator)
        engine = BatchEngine(target.model.forward_rows, store, new_drafter,
                             sampling, draft_len=req.draft_len, prefill_chunk=req.prefill_chunk,
                             context=req.context, generator=generator, pair=report.pair)
        return Pipeline(report, target, draft, engine, meter, preload_bytes, load_peak_bytes)
    drafter = make_drafter(report, target, draft, sampling, device, generator, cuda_graphs, head)
    engine = Engine(step_forward(target, cuda_graphs, req.draft_len + 1), store, drafter, sampling, draft_len=req.draft_len,
                    prefill_chunk=req.prefill_chunk, context=req.context, generator=generator, pair=report.pair)
    if device.type == "cuda":
        from specmemo.models.graphs import GraphedForward

        for forward, kv in [(engine.forward, store), (drafter.forward, drafter.store)]:
            if isinstance(forward, GraphedForward):  # CUDA graphs: captured now, inside the measured generation memory
                forward.warm(kv, req.draft_len + 1)
    return Pipeline(report, target, draft, engine, meter, preload_bytes, load_peak_bytes)


@dataclass(frozen=True)
class RunRequest:
    """What a command asks to run, built once from its options and passed down: the models, the
    device and budget, the dtypes, the context and draft sizes, sampling, and how to load.
    None: planned (the largest context that fits, the device's dtype, the plan's k and W)."""
    target: str = "smollm2-135m-instruct"
    draft: str = "auto"
    device: str = "cpu"                  # a device profile: cpu, cuda, or a name in profiles/devices
    budget: int | None = None            # bytes; None: the device's memory
    context: int | None = None
    draft_len: int | None = None
    draft_window: int | None = None
    dtype: str | None = None
    kv_dtype: str | None = None
    draft_dtype: str | None = None
    sampling: SamplingConfig = SamplingConfig()
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    allow_pickle: bool = False
    trust_remote_code: bool = False
    forward: str = "auto"                # auto, specmemo or transformers
    cuda_graphs: bool = True
    batch: int | None = None             # the batch engine with this many rows; None: one sequence
    calibrated: bool = False             # plan with what this host measured (budget.calibration) and
                                         # record what this run measures; False: the device profile's reserves

    def with_(self, **changes) -> "RunRequest":
        return replace(self, **changes)


def open_pipeline(run: RunRequest, *, min_context: int = 0, refs=None, tokenizer=None) -> Pipeline:
    """Resolve, plan (refusing what does not fit), load, allocate. The context defaults to the
    largest that fits the budget, at least `min_context`. refs: run's models already resolved
    (resolve_pair); tokenizer: already loaded."""
    # A named profile (e.g. rtx-3060-12gb) gives the budget; its kind says where to run.
    profile = run.device
    dev = load_device(profile)
    kind = dev.kind
    if kind == "cuda" and not torch.cuda.is_available():
        raise UnknownDevice(f"--device {profile}: no CUDA device is available to torch")
    meter = PeakMeter(kind)
    if run.forward not in ("auto", "specmemo", "transformers"):
        raise BadInput(f"--forward must be auto, specmemo or transformers, got {run.forward!r}")
    if kind == "cpu":
        tame_glibc_malloc()
    t_ref, d_ref, drafter = refs = refs or resolve_pair(run.target, run.draft)
    report = plan_pair(refs, device=dev, budget=run.budget, context=run.context, draft_len=run.draft_len,
                       draft_window=run.draft_window, dtype=run.dtype, kv_dtype=run.kv_dtype,
                       draft_dtype=run.draft_dtype, prefill_chunk=run.prefill_chunk, sampling=not run.sampling.greedy,
                       shrink=True, batch=run.batch or 1, baseline_bytes=meter.current() if kind == "cpu" else None,
                       calibrated=run.calibrated)
    if report.plan.request.context < min_context:
        raise BudgetExceeded(f"the budget holds only {count(report.plan.request.context, 'token')} of context; "
                             f"this request needs at least {min_context} (raise --budget)", plan=report.plan)
    why = report.plan.not_runnable()
    if why:
        raise BadInput(f"this plan is not runnable yet: {'; '.join(why)}")
    for ref in (t_ref, d_ref):
        if ref is not None:
            check_architecture(ref, run.trust_remote_code)
    if kind == "cuda":
        cap_cuda_memory(report)
    meter.start()
    req = report.plan.request
    load = dict(allow_pickle=run.allow_pickle, trust_remote_code=run.trust_remote_code, fast_layout=True,
                forward=run.forward, kernels=dev.kernels)
    t = load_model(t_ref, req.dtype, kind, with_tokenizer=tokenizer is None, **load)
    if tokenizer is not None:
        t.tokenizer = tokenizer
    # A draft directory need not carry tokenizer files: its vocabulary size was checked.
    d = load_model(d_ref, req.ddtype, kind, with_tokenizer=False, **load) if d_ref is not None else None
    head = running_head(t, t.device, report.drafter) if report.drafter in HEAD_DRAFTERS else None
    rt = assemble(report, t, d, run.sampling, preload_bytes=meter.baseline, load_peak_bytes=meter.above_baseline(),
                  cuda_graphs=run.cuda_graphs, batched=run.batch is not None, head=head)
    rt.calibrated = run.calibrated
    return rt
