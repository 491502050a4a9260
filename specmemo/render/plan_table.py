"""The human view of a PlanReport: a component table and the three budgets."""

from rich.console import Console
from rich.table import Table

from specmemo.budget.units import format_bytes

_EXPLAIN = {
    "process_baseline": "the process before loading: interpreter, torch, transformers (measured)",
    "target_weights": "parameters × dtype bytes (tied embeddings once)",
    "draft_weights": "draft parameters × dtype bytes",
    "target_kv": "context × 2·L·kv_heads·head_dim·bytes",
    "draft_kv": "draft window × draft KV bytes per token",
    "verify_kv_slots": "the draft store's k+1 slots (the target's candidates stay inside its context)",
    "logits": "(k+1) × vocab logits, model dtype + fp32 copy",
    "workspace": "largest forward: prefill chunk, verify or draft step × allocator factor",
    "kernel_scratch": "fixed kernel scratch: first forward, verification, half-precision kernels (device profile)",
    "cuda_graphs": "CUDA graphs: capture stream workspace and the graphs' private memory pool",
    "fp32_attention": "half precision attends in fp32: one layer's K and V widened, kept for the run",
    "sampling": "p, q and top-p sort buffers for k+1 rows",
    "runtime_overhead": "device runtime reserve",
}


def render_plan(report, console: Console) -> None:
    req = report.plan.request
    table = Table(title=f"{report.target_name} + {report.draft_name} on {report.device.name} ({req.dtype}, kv {req.kv})")
    table.add_column("component")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    table.add_column("how", style="dim")
    explain = dict(_EXPLAIN)
    if report.plan.calibrated:   # budget.calibration: a run like this one measured here
        explain |= {"kernel_scratch": "what a run like this one measured here beside the counted tensors",
                    "runtime_overhead": "what loading it measured here beside the weights",
                    "process_baseline": "the process before loading, as measured here"}
    for name, value in report.plan.components.items():
        table.add_row(name, f"{value:,}", format_bytes(value), explain.get(name, ""))
    table.add_section()
    table.add_row("[bold]total", f"{report.plan.total_bytes:,}", format_bytes(report.plan.total_bytes), "")
    table.add_row("budget", f"{report.budget_bytes:,}", format_bytes(report.budget_bytes), "")
    console.print(table)
    verdict = "[green]fits[/]" if report.fits else "[red]does not fit[/]"
    console.print(
        f"{verdict}: context {req.context:,} tokens, draft length k={req.draft_len}, draft window W={req.draft_window:,}"
    )
    console.print(f"lower bound (k=1, minimal buffers): {format_bytes(report.lower_bound.total_bytes)}")
    console.print(
        f"speedup budget (≥96% of best predicted speedup, k={report.speedup_budget.request.draft_len}): "
        f"{format_bytes(report.speedup_budget.total_bytes)}"
    )
    console.print(
        f"predicted speedup at k ≤ {req.draft_len} (each step's best): {report.predicted_speedup:.2f}× "
        f"(α={report.pair.alpha}: {report.pair.source}; c={report.pair.c:.4g}: {report.pair.c_source}; "
        f"verification cost: {report.pair.curve_source}"
        + (f"; drafts in {report.pair.drafted_share:.0%} of steps: {report.pair.drafted_share_source}"
           if report.pair.drafted_share < 1 else "")
        + (f"; candidate trees, rank acceptance {list(report.pair.ranks)}: {report.pair.ranks_source}"
           if report.pair.ranks else "") + ")"
    )
    if report.max_context:
        console.print(f"largest context that fits this budget: {report.max_context:,} tokens")
    why = report.plan.not_runnable()
    if why:
        console.print(f"[yellow]not runnable yet: {'; '.join(why)}[/]")
    if report.fit and not report.fits:
        console.print(f"at this context, fits with k={report.fit.draft_len}, W={report.fit.draft_window}")
