"""A Plan itemizes every byte a speculative-decoding run needs, component by component."""

from dataclasses import dataclass, field

from specmemo.budget import footprint as fp
from specmemo.budget.arch import Arch
from specmemo.budget.calibration import Calibration
from specmemo.errors import BadInput

DEFAULT_DRAFT_LEN = 5          # gpt-fast and HF assisted generation both start around 5
DEFAULT_DRAFT_WINDOW = 1024    # a draft rarely gains from older context; its KV need not grow with the chat
DEFAULT_PREFILL_CHUNK = 256    # bounds prefill activations; large enough to keep matmuls efficient
DRAFTERS_WITHOUT_WEIGHTS = ("ngram", "none")
HEAD_DRAFTERS = ("head", "ngram+head")   # drafters that run the target's shipped head (ngram+head: lookup first)
HEAD_LOGITS_BYTES = 4          # a draft head's logits over its vocabulary, fp32, one step at a time

# Components that exist before generation starts; the rest is "generation memory".
STATIC_COMPONENTS = ("process_baseline", "target_weights", "draft_weights", "runtime_overhead")

# What the engine can run today; `plan` still plans the rest, marked not runnable.
RUNNABLE_DTYPES = ("fp32", "bf16", "fp16", "q4")  # q4: GGUF Q4_0/Q4_1 on a CPU (models/quant.py)
BATCH_DRAFTERS = ("ngram", "head", "ngram+head", "none")        # what the batch engine drafts with (decoding/batch.py)


@dataclass(frozen=True)
class PlanRequest:
    """What is being planned. `draft` is None for the head, ngram and none drafters."""

    target: Arch
    draft: Arch | None
    drafter: str                 # "model", "head", "ngram+head", "ngram" or "none"
    context: int                 # N: tokens of conversation the target KV holds
    draft_len: int               # k
    draft_window: int            # W: tokens the draft KV holds (≤ N)
    dtype: str = "fp16"
    kv_dtype: str | None = None  # defaults to dtype
    draft_dtype: str | None = None  # defaults to dtype; e.g. a bf16 draft beside an fp32 target
    batch: int = 1
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    baseline_bytes: int = 0        # the process before any model loads (interpreter, torch, transformers)
    overhead_bytes: int = 0
    overhead_reason: str = ""
    sampling: bool = True          # False for greedy decoding: no probability buffers
    workspace_pct: int = 100       # measured allocator factor on forward workspace (device profile)
    engine_bytes: int = 0          # measured fixed scratch of the first forward (device profile)
    verify_bytes: int = 0          # measured fixed scratch of multi-token verification kernels
    half_scratch_bytes: int = 0    # measured scratch of bf16/fp16 kernels (CPU: conversion buffers)
    # This run's kernel scratch as measured here, ((run size, bytes), ...) (budget.calibration);
    # None: the profile's engine + verify + half-precision figures.
    measured_scratch: tuple | None = None
    native_attention: bool = False # half precision attends through the compiled kernel (no fp32 K/V copies)
    graph_bytes: int = 0           # measured fixed cost of CUDA-graph capture (0: the device runs none)
    device_kind: str = "cpu"       # "cpu" or "cuda": what the engine can run differs
    quantized_head: bool = False   # q4/q8: the embedding and LM head held quantized (footprint.weight_bytes)
    head: tuple[int, int, int] | None = None   # a draft head's (hidden, inner, vocab): models/draft_head.py
    head_dtype: str = "fp32"                   # what the head drafts in (draft_head.RunningHead.for_machine)

    def with_(self, **changes) -> "PlanRequest":
        return PlanRequest(**{**self.__dict__, **changes})

    @property
    def kv(self) -> str:
        return self.kv_dtype or fp.compute_dtype(self.dtype)

    @property
    def ddtype(self) -> str:
        return self.draft_dtype or self.dtype

    @property
    def draft_kv(self) -> str:
        return self.kv_dtype or fp.compute_dtype(self.ddtype)


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def generation_bytes(self) -> int:
        """What allocating and running generation adds on top of loaded weights and runtime."""
        return sum(v for k, v in self.components.items() if k not in STATIC_COMPONENTS)

    @property
    def calibrated(self) -> bool:
        """The kernel scratch is what this host measured (budget.calibration), not the profile's."""
        return bool(self.request.measured_scratch)

    @property
    def counted_bytes(self) -> int:
        """The generation memory counted tensor by tensor: all of it but the kernel scratch."""
        return self.generation_bytes - self.components["kernel_scratch"]

    def counted_generation_bytes(self, tokens: int) -> int:
        """counted_bytes once `tokens` of the context hold keys: a KV store's pages become resident
        as tokens arrive."""
        return make_plan(self.request.with_(context=max(1, min(tokens, self.request.context)))).counted_bytes

    @property
    def weights_bytes(self) -> int:
        return self.components["target_weights"] + self.components["draft_weights"]

    @property
    def target_capacity(self) -> int:
        """KV slots the allocator reserves for the target: the context. The engine drafts at most
        room − 1 tokens, so a step's candidates always land inside the context."""
        return self.request.context

    @property
    def draft_capacity(self) -> int:
        """W + k + 1: the window's W most recent tokens plus one step's draft tokens."""
        return self.request.draft_window + self.request.draft_len + 1

    def not_runnable(self) -> list[str]:
        """Why the engine cannot run this plan yet (empty when it can)."""
        req, why = self.request, []
        if req.batch > 1 and req.drafter not in BATCH_DRAFTERS:
            why.append(f"batch {req.batch} with --draft {req.drafter}: batches draft with "
                       f"{', '.join(BATCH_DRAFTERS)} so far")
        given = [("--dtype", req.dtype), ("--kv-dtype", req.kv)]
        if req.draft and req.draft_dtype:
            given.append(("--draft-dtype", req.draft_dtype))
        for flag, value in given:
            if value not in RUNNABLE_DTYPES:
                why.append(f"{flag} {value}: the engine runs {', '.join(RUNNABLE_DTYPES)}")
            elif fp.is_quantized(value) and req.device_kind != "cpu":
                why.append(f"{flag} {value}: packed 4-bit weights run on a CPU so far")
        if req.head and req.device_kind != "cpu":
            why.append(f"--draft {req.drafter}: the draft head runs on a CPU so far")
        return why


def validate(req: PlanRequest) -> None:
    if req.context < 1:
        raise BadInput(f"context must be at least 1 token, got {req.context}")
    if req.context > req.target.max_position:
        raise BadInput(
            f"context {req.context} exceeds {req.target.name}'s maximum of {req.target.max_position} tokens"
        )
    if req.draft_len < 0 or (req.drafter != "none" and req.draft_len < 1):
        raise BadInput(f"draft length must be ≥ 1 with a drafter, got {req.draft_len}")
    if req.batch < 1 or req.prefill_chunk < 1:
        raise BadInput("batch and prefill chunk must be ≥ 1")
    if req.drafter == "model" and req.draft_window < 1:
        raise BadInput(f"draft window must be ≥ 1, got {req.draft_window}")


GRAPH_ROWS = 16  # a target's fixed step width under CUDA graphs: the widest verification it serves


def _kernel_scratch(req: PlanRequest) -> int:
    if req.measured_scratch:
        measured = Calibration(scratch=dict(req.measured_scratch))
        here = measured.scratch_bytes(req.context)
        if here is not None:
            return here
        # Below every measured run: the smallest one's scratch plus what its larger context counted
        # beside this one's, so that a shorter run never plans less than that run measured.
        unmeasured = req.with_(measured_scratch=None)
        smallest = unmeasured.with_(context=min(measured.smallest_run, req.target.max_position))
        return (measured.scratch_bytes(smallest.context) + make_plan(smallest).counted_bytes
                - make_plan(unmeasured).counted_bytes)
    half = fp.is_half(req.dtype) or (req.draft is not None and fp.is_half(req.ddtype))
    return req.engine_bytes + (req.verify_bytes if req.draft_len >= 1 else 0) + (req.half_scratch_bytes if half else 0)


def make_plan(req: PlanRequest) -> Plan:
    validate(req)
    t, d, B, k = req.target, req.draft, req.batch, req.draft_len
    N = req.context
    W = min(req.draft_window, N) if d else 0
    # Only one forward runs at a time, so the workspace is the largest of: a prefill chunk,
    # a verification of k+1 candidates, and (with a draft model) a draft step.
    step = fp.forward_workspace_bytes(t, req.dtype, min(k + 1, N), N, B, req.kv)
    # A graphed target step runs at a fixed width (models/graphs.py), over every capacity slot.
    graph_step = fp.forward_workspace_bytes(t, req.dtype, max(GRAPH_ROWS, k + 1), N, B, req.kv)
    workspaces = [fp.forward_workspace_bytes(t, req.dtype, min(req.prefill_chunk, N), N, B, req.kv), step]
    if d:
        workspaces.append(fp.forward_workspace_bytes(d, req.ddtype, min(req.prefill_chunk, W), W + k + 1, B,
                                                     req.draft_kv))
    components = {
        "process_baseline": req.baseline_bytes,
        "target_weights": fp.weight_bytes(t, req.dtype, req.quantized_head),
        "draft_weights": fp.weight_bytes(d, req.ddtype, req.quantized_head) if d
        else fp.draft_head_bytes(*req.head, req.head_dtype) if req.head else 0,
        "target_kv": fp.kv_bytes(t, req.kv, N, B),
        "draft_kv": fp.kv_bytes(d, req.draft_kv, W, B) if d else 0,
        # The target's candidates land inside its context (see target_capacity); a draft
        # window holds W tokens plus one step's k + 1.
        "verify_kv_slots": fp.verify_kv_slots_bytes(d, req.draft_kv, k, B) if d else 0,
        "logits": fp.logits_bytes(t, req.dtype, k + 1, B) + (fp.logits_bytes(d, req.ddtype, 1, B) if d else 0)
        + (B * req.head[2] * HEAD_LOGITS_BYTES if req.head else 0),
        "workspace": max(workspaces) * req.workspace_pct // 100,
        "kernel_scratch": _kernel_scratch(req),
        # CUDA graphs (models/graphs.py): the capture stream's cuBLAS workspace, and the graphs'
        # private pool, which holds the largest captured step's scratch beside the eager cache.
        "cuda_graphs": req.graph_bytes + graph_step if req.graph_bytes else 0,
        # A GPU target's steps attend through SDPA at a fixed width (models/graphs.py); a draft
        # may run eagerly anywhere.
        "fp32_attention": (fp.fp32_attention_bytes(t, req.dtype, req.kv, N, B, req.native_attention)
                           if req.device_kind == "cpu" else 0)
        + (fp.fp32_attention_bytes(d, req.ddtype, req.draft_kv, W + k + 1, B, req.native_attention) if d else 0),
        "sampling": fp.sampling_bytes(t, k, B, req.sampling),
        "runtime_overhead": req.overhead_bytes,
    }
    return Plan(req, components)
