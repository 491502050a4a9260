"""`specmemo profile --batch 1,2,4,8`: throughput and per-sequence latency against batch size.

Every prompt's first turn (chat template applied) runs once per batch size and engine, each run
in its own process so that its peak memory is its own:
  specmemo     the batch engine with the drafter (decoding/batch.py)
  specmemo-ar  the batch engine without drafts
  hf-batch     transformers' batched greedy `generate` (left-padded, static batches of B prompts,
               fp32 for a 4-bit target), the baseline people reach for
Outputs at batch B are compared with the same engine's batch-1 outputs; a divergence shows
the target's top-2 logit margin at its first differing position (< 1e-4: numerics).

    python -m specmemo.profiling.batch CONFIG.json RESULT.json    (one run; the parent calls it)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from specmemo.atomic import atomic_write_text
from specmemo.errors import BadInput
from specmemo.profiling.report import first_difference, machine_line, progress_console, top2_margin, write_report

BATCH_ENGINES = ("specmemo", "specmemo-ar", "hf-batch")


# -- one run, in its own process ----------------------------------------------------------------

def _run_specmemo(cfg: dict) -> dict:
    from specmemo.generate import generate_batch
    from specmemo.pipeline import RunRequest

    draft = cfg["draft"] if cfg["engine"] == "specmemo" else "none"
    run = RunRequest(cfg["target"], draft, budget=cfg.get("budget"), dtype=cfg["dtype"], kv_dtype=cfg.get("kv_dtype"),
                     batch=cfg["batch"])
    lines, summary = generate_batch(run, cfg["prompts"], chat=True, max_new_tokens=cfg["max_new_tokens"],
                                    on_sequence=lambda line: print("progress", flush=True))
    return {**summary.to_json(), "outputs": [l["token_ids"] for l in lines],
            "accepted_tokens": sum(l["accepted_tokens"] for l in lines),
            "drafted_tokens": sum(l["drafted_tokens"] for l in lines)}


def _run_hf(cfg: dict) -> dict:
    """transformers' batched greedy generate: B prompts at a time, left-padded, each row's reply
    cut at its first stop token (the batch runs until every row has stopped)."""
    import torch

    from specmemo.memory.measure import PeakMeter
    from specmemo.models.load import load_model, weights_nbytes
    from specmemo.models.resolve import resolve
    from specmemo.models.text import encode_prompt, stop_ids
    from specmemo.profiling.worker import baseline_dtype

    model = load_model(resolve(cfg["target"]), baseline_dtype(cfg["dtype"]), forward="transformers")
    hf, tok = model.model, model.tokenizer
    if hf.config._attn_implementation != "sdpa":
        hf.set_attn_implementation("sdpa")
    stops = sorted(stop_ids(tok, hf))
    pad = stops[0] if stops else 0
    prompts = [encode_prompt(tok, p, chat=True) for p in cfg["prompts"]]
    meter = PeakMeter("cpu")
    meter.start()
    outputs, latencies, B = [], [], cfg["batch"]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), B):
            group = prompts[i : i + B]
            width = max(len(p) for p in group)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=cfg["max_new_tokens"], do_sample=False,
                              eos_token_id=stops or None, pad_token_id=pad)
            for row in out[:, width:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
                outputs.append(row[:cut])
                latencies.append(time.perf_counter() - start)
                print("progress", flush=True)
    seconds = time.perf_counter() - start
    new = sum(len(o) for o in outputs)
    return {"batch": B, "prompts": len(prompts), "new_tokens": new, "seconds": seconds,
            "tokens_per_s": new / seconds, "mean_latency_seconds": sum(latencies) / len(latencies),
            "generation_peak_bytes": meter.above_baseline(), "predicted_generation_bytes": None,
            "weights_bytes": weights_nbytes(hf), "dtype": baseline_dtype(cfg["dtype"]), "forward": "transformers",
            "outputs": outputs}


def main(config_path: str, result_path: str) -> None:
    from specmemo.memory.malloc import tame_glibc_malloc

    tame_glibc_malloc()
    cfg = json.loads(Path(config_path).read_text())
    result = _run_hf(cfg) if cfg["engine"] == "hf-batch" else _run_specmemo(cfg)
    atomic_write_text(result_path, json.dumps({"engine": cfg["engine"], **result}))


# -- the parent: runs, comparison, report ------------------------------------------------------

def divergences(runs: dict, engine: str, batch: int) -> list[dict]:
    """Prompts whose tokens at `batch` differ from the same engine's batch-1 run: index and first position."""
    ref, mine = runs[(engine, 1)]["outputs"], runs[(engine, batch)]["outputs"]
    out = []
    for i, (a, b) in enumerate(zip(mine, ref)):
        if a != b:
            out.append({"prompt": i, "position": first_difference(a, b)})
    return out


def add_margins(cfg: dict, runs: dict, found: list[dict]) -> None:
    """The target's top-2 logit margin at each divergence, on the batch-1 run's own history,
    computed by our decoder alone in the run's dtype."""
    if not found:
        return
    import torch

    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.models.text import encode_prompt
    from specmemo.pipeline import RunRequest, open_pipeline

    rt = open_pipeline(RunRequest(cfg["target"], "none", context=cfg["context"], dtype=cfg["dtype"],
                                  kv_dtype=cfg.get("kv_dtype"), sampling=SamplingConfig(), forward="specmemo"))
    for d in found:
        ref = runs[(d["engine"], 1)]["outputs"][d["prompt"]]
        ids = encode_prompt(rt.tokenizer, cfg["prompts"][d["prompt"]], chat=True) + ref[: d["position"]]
        rt.engine.store.reset()
        d.update(top2_margin(rt.target.forward(rt.engine.store, torch.tensor([ids]), 1)[0, -1]))


def batch_profile(target: str, draft: str, out: Path, *, batches: list[int], prompts: str | None = None,
                  limit: int | None = None, max_new_tokens: int = 128, budget: int | None = None,
                  dtype: str = "fp32", kv_dtype: str | None = None, engines: list[str] | None = None) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from specmemo.generate import batch_pair
    from specmemo.models.load import load_tokenizer
    from specmemo.models.resolve import resolve
    from specmemo.models.text import encode_prompt
    from specmemo.profiling.machine import machine_facts
    from specmemo.profiling.prompts import load_prompts
    from specmemo.profiling.run import run_worker

    if not batches or any(b < 1 for b in batches):
        raise BadInput("--batch takes batch sizes ≥ 1, e.g. 1,2,4,8")
    asked = sorted(set(batches))
    batches = sorted(set(batches) | {1})   # our engines' batch 1 is every output comparison's reference
    engines = engines or list(BATCH_ENGINES)
    unknown = [e for e in engines if e not in BATCH_ENGINES]
    if unknown:
        raise BadInput(f"with --batch, engines are {', '.join(BATCH_ENGINES)}; not {', '.join(unknown)}")
    draft = batch_pair(target, draft)[2]   # the drafter's name: "auto" resolved once, for every run
    texts = [c.turns[0] for c in load_prompts(prompts, limit)]
    tokenizer = load_tokenizer(resolve(target))
    longest = max(len(encode_prompt(tokenizer, t, chat=True)) for t in texts)
    cfg = {"target": target, "draft": draft, "dtype": dtype, "kv_dtype": kv_dtype, "budget": budget,
           "max_new_tokens": max_new_tokens, "prompts": texts, "context": longest + max_new_tokens}
    runs = {}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, Progress(
        TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), **progress_console()
    ) as progress:
        for engine in engines:
            for b in (asked if engine == "hf-batch" else batches):   # HF's batch 1 only when asked
                task = progress.add_task(f"{engine} batch {b}", total=len(texts))
                runs[(engine, b)] = run_worker({**cfg, "engine": engine, "batch": b}, Path(tmp), progress, task,
                                               module="specmemo.profiling.batch", name=f"{engine}-b{b}")
    found = [{"engine": e, "batch": b, **d} for e in engines if e != "hf-batch" for b in batches if b > 1
             for d in divergences(runs, e, b)]
    add_margins(cfg, runs, found)
    report = build_report(machine_facts(), cfg, runs, engines, batches, found)
    write_outputs(report, runs, out)
    return report


def build_report(facts: dict, cfg: dict, runs: dict, engines: list[str], batches: list[int], found: list[dict]) -> dict:
    rows = []
    for engine in engines:
        for b in batches:
            r, one = runs.get((engine, b)), runs.get((engine, 1))
            if r is None:
                continue
            differ = sum(d["engine"] == engine and d["batch"] == b for d in found)
            same = len(r["outputs"]) - differ if engine != "hf-batch" else None
            hf = runs.get(("hf-batch", b))
            rows.append({
                "engine": engine, "batch": b, "tokens_per_s": r["tokens_per_s"],
                "mean_latency_seconds": r["mean_latency_seconds"], "new_tokens": r["new_tokens"],
                "seconds": r["seconds"],
                "throughput_vs_batch1": r["tokens_per_s"] / one["tokens_per_s"] if one else None,
                "vs_hf_batch": r["tokens_per_s"] / hf["tokens_per_s"] if hf else None,
                "identical_to_batch1": same, "prompts": len(r["outputs"]),
                "generation_peak_bytes": r["generation_peak_bytes"],
                "predicted_generation_bytes": r.get("predicted_generation_bytes"),
                "within_plan": (r["generation_peak_bytes"] <= r["predicted_generation_bytes"])
                if r.get("predicted_generation_bytes") else None,
                "acceptance_rate": r["accepted_tokens"] / r["drafted_tokens"] if r.get("drafted_tokens") else None,
                "drafter": r.get("drafter"), "dtype": r.get("dtype"), "forward": r.get("forward"),
            })
    spec = {r["batch"]: r for r in rows if r["engine"] == "specmemo"}
    return {"machine": facts, "target": cfg["target"], "draft": cfg["draft"], "dtype": cfg["dtype"],
            # The headline: speculative batches against speculative batch 1 and HF's batch of the same size.
            "specmemo_vs_batch1": {b: r["throughput_vs_batch1"] for b, r in spec.items()},
            "specmemo_vs_hf_batch": {b: r["vs_hf_batch"] for b, r in spec.items() if r["vs_hf_batch"]},
            "prompts": len(cfg["prompts"]), "max_new_tokens": cfg["max_new_tokens"], "batches": batches,
            "runs": rows, "divergences": found}


def markdown(report: dict, plots: list[str]) -> str:
    m = report["machine"]
    lines = [f"# specmemo batch profile: {report['target']} ({report['dtype']})", "",
             f"{machine_line(m)} "
             f"{report['prompts']} prompts (first turns, chat template), {report['max_new_tokens']} new tokens, "
             f"greedy. Ratios within this run only.", "",
             "| engine | batch | tok/s | × batch 1 | × hf-batch | mean latency (s) | identical to batch 1 "
             "| generation peak (MiB) | plan (MiB) | acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        plan = f"{r['predicted_generation_bytes'] / 2**20:.1f}" if r["predicted_generation_bytes"] else "–"
        vs = f"{r['vs_hf_batch']:.2f}" if r["vs_hf_batch"] else "–"
        acc = f"{r['acceptance_rate']:.3f}" if r["acceptance_rate"] is not None else "–"
        x1 = f"{r['throughput_vs_batch1']:.2f}" if r["throughput_vs_batch1"] else "–"
        same = f"{r['identical_to_batch1']}/{r['prompts']}" if r["identical_to_batch1"] is not None else "–"
        lines.append(f"| {r['engine']} | {r['batch']} | {r['tokens_per_s']:.1f} | {x1} | {vs} "
                     f"| {r['mean_latency_seconds']:.1f} | {same} "
                     f"| {r['generation_peak_bytes'] / 2**20:.1f} | {plan} | {acc} |")
    hf = next((r for r in report["runs"] if r["engine"] == "hf-batch"), None)
    if hf and hf["dtype"] != report["dtype"]:
        lines += ["", f"hf-batch runs {hf['dtype']} weights: transformers runs dense weights only."]
    lines += ["", "## Divergences from batch 1", ""]
    if not report["divergences"]:
        lines.append("None: every prompt's tokens at every batch size equal its batch-1 tokens.")
    for d in report["divergences"]:
        margin = d.get("top2_margin")
        why = "numerics (near-tied top-2 logits)" if d.get("numerics") else "NOT numerics: a bug"
        lines.append(f"- {d['engine']} batch {d['batch']}, prompt {d['prompt']}, position {d['position']}: "
                     f"top-2 margin {margin:.2e}, {why}" if margin is not None else f"- {d}")
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, runs: dict, out: Path) -> None:
    from specmemo.profiling.plots import batch_plots

    write_report(out, report, markdown, batch_plots(report, out),
                 {"outputs.json": json.dumps({f"{e}-b{b}": r["outputs"] for (e, b), r in runs.items()})})


if __name__ == "__main__":
    main(*sys.argv[1:3])
