"""The GPU check (issue 14): one run, about 5 minutes on an H100/H200, report under $OUT.

1. runs the tests marked `gpu` (greedy equivalence through transformers' forward and ours, our
   decoder against transformers, KV in another dtype, the sampling distribution, fixed KV);
2. builds realistic-size models from configuration with random weights (llama-2-7b-chat with a
   vicuna-68m draft in fp16; SmolLM2-1.7B with SmolLM2-135M in bf16) on the GPU;
3. emulates 8 GiB and 24 GiB devices with torch.cuda.set_per_process_memory_fraction;
4. per configuration: peak memory against the plan, wall time and decode speed for specmemo
   (our decoder: draft model, n-gram lookup, plain AR, KV in another dtype; plain AR through
   transformers' forward) and for hf-ar, hf-assisted and hf-lookup on the same weights and prompt;
5. measures the CUDA overhead the device profiles estimate: NVML's memory for the process minus
   what torch's allocator reserved, after CUDA init and after the run.

Random weights make acceptance meaningless (near zero for a draft model), so the figures are
per-step cost and memory; speculation against hf-assisted is on the same random pair.

Usage: python bench/gpu_check.py --out "$OUT"            (on a GPU)
       python bench/gpu_check.py --out /tmp/x --smoke    (CPU, tiny, to test the script itself)
"""

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
MIB = 2**20
CASES = [
    {"name": "24GiB llama-2-7b + vicuna-68m fp16", "budget": 24 * GIB, "target": "llama-2-7b-chat",
     "draft": "vicuna-68m", "dtype": "fp16", "context": 2048, "new": 128},
    {"name": "8GiB llama-2-7b + vicuna-68m fp16", "budget": 8 * GIB, "target": "llama-2-7b-chat",
     "draft": "vicuna-68m", "dtype": "fp16", "context": 2048, "new": 128},
    {"name": "8GiB smollm2-1.7b + smollm2-135m bf16", "budget": 8 * GIB, "target": "smollm2-1.7b-instruct",
     "draft": "smollm2-135m-instruct", "dtype": "bf16", "kv_variant": "fp16", "context": 4096, "new": 128},
]
SMOKE = [{"name": "smoke vicuna-68m + vicuna-68m fp32", "budget": 2 * GIB, "target": "vicuna-68m",
          "draft": "vicuna-68m", "dtype": "fp32", "kv_variant": "bf16", "context": 256, "new": 16}]
WARMUP_TOKENS = 8


def hf_config(alias: str):
    from transformers import LlamaConfig

    data = tomllib.loads((ROOT / "profiles" / "models" / f"{alias}.toml").read_text())
    return LlamaConfig(**data["config"])


def nvml_used() -> int | None:
    """Device memory in use (all processes; this one is alone on a lent GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
    except Exception:
        return None


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reserved(device: str) -> int:
    import torch

    return torch.cuda.memory_reserved() if device == "cuda" else 0


def specmemo_engines(case: dict, device: str, used0: int | None) -> dict:
    """Our engines over our decoder (and one over transformers' forward), in one process."""
    import torch

    from specmemo.budget.fit import fit
    from specmemo.decoding.events import collect
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.errors import BudgetExceeded
    from specmemo.models.load import LoadedModel, wrap
    from specmemo.models.load_safetensors import own_from_transformers
    from specmemo.models.resolve import resolve
    from specmemo.models.synthetic import random_model
    from specmemo.budget.plan import GRAPH_ROWS
    from specmemo.models import graphs as graphs_mod
    from specmemo.pipeline import assemble, cap_cuda_memory

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    t_ref, d_ref = resolve(case["target"]), resolve(case["draft"])
    prompt = prompt_of(case, t_ref.arch.vocab_size)
    out = {"engines": {}, "plans": {}}
    torch.zeros(1, device=device) @ torch.zeros(1, device=device)  # CUDA context and cuBLAS handle
    sync(device)
    used1 = nvml_used()
    if used0 is not None and used1 is not None:
        out["cuda_init_bytes"] = used1 - used0 - reserved(device)

    # (engine, drafter, KV dtype, forward, CUDA graphs); specmemo-ar (graphed) is the reference.
    # "unpadded": graphed, but a target step at its own width (1 row), as before fixed-width steps:
    # what the fixed width costs a one-token step.
    configs = [("specmemo", "model", None, "specmemo", True), ("specmemo-ngram", "ngram", None, "specmemo", True),
               ("specmemo-ar", "none", None, "specmemo", True), ("specmemo-ngram-eager", "ngram", None, "specmemo", False),
               ("specmemo-ar-eager", "none", None, "specmemo", False),
               ("specmemo-ar-unpadded", "none", None, "specmemo", "unpadded")]
    if case.get("kv_variant"):
        configs.append((f"specmemo-ar-kv-{case['kv_variant']}", "none", case["kv_variant"], "specmemo", True))
    configs.append(("specmemo-ar-hf-forward", "none", None, "transformers", False))
    reports = {}
    for name, drafter, kv, _, _ in configs:
        try:
            reports[name] = fit(t_ref.arch, d_ref.arch if drafter == "model" else None, drafter,
                                device="cpu" if device == "cpu" else "cuda", budget=case["budget"],
                                context=case["context"], dtype=case["dtype"], kv_dtype=kv, sampling=False, shrink=True)
        except BudgetExceeded as e:
            out["engines"][name] = {"refused": str(e).split(". Plan:")[0]}
    if not reports:
        return out

    def built(role, forward):
        alias, seed, ref = (case["target"], 0, t_ref) if role == "target" else (case["draft"], 1, d_ref)
        hf = random_model(hf_config(alias), seed, dtype, device)
        if forward == "transformers":
            return wrap(ref, hf)
        own = own_from_transformers(hf)
        del hf
        return LoadedModel(ref, own, None, dtype, torch.device(device), "specmemo", own)

    models = {}
    for name, drafter, kv, forward, graphs in configs:
        if name not in reports:
            continue
        report = reports[name]
        target = draft = None
        if drafter != "model":
            models.pop(("draft", forward), None)  # not in this plan
        if ("target", forward) not in models:
            models.clear()  # one target in memory at a time
            if device == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, 0)
                torch.cuda.empty_cache()
            models[("target", forward)] = built("target", forward)
        target = models[("target", forward)]
        if drafter == "model":
            if ("draft", forward) not in models:
                models[("draft", forward)] = built("draft", forward)
            draft = models[("draft", forward)]
        out["plans"][name] = {k: v for k, v in report.plan.components.items()} | {
            "total_bytes": report.plan.total_bytes, "generation_bytes": report.plan.generation_bytes,
            "context": report.plan.request.context, "draft_len": report.plan.request.draft_len,
            "weights_measured_bytes": target.model.nbytes() if forward == "specmemo" else None}
        graphs_mod.ROWS = 1 if graphs == "unpadded" else GRAPH_ROWS
        graphs = bool(graphs)
        try:
            if device == "cuda":
                cap_cuda_memory(report)
            warm = assemble(report, target, draft, SamplingConfig(), cuda_graphs=graphs)  # first-call kernels
            collect(warm.engine.generate(prompt[:64], WARMUP_TOKENS))
            del warm
            if device == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            rt = assemble(report, target, draft, SamplingConfig(), cuda_graphs=graphs)  # captures graphs
            sync(device)
            assemble_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens, stats = collect(rt.engine.generate(prompt, case["new"]))
            sync(device)
            wall = time.perf_counter() - t0
            out["engines"][name] = {
                "forward": forward + (" + CUDA graphs" if graphs and forward == "specmemo" and device == "cuda" else "")
                + (f", {rows}-row steps" if (rows := getattr(rt.engine.forward, "rows", None)) else ""),
                "kv_dtype": kv or case["dtype"], "assemble_s": assemble_s,
                "graphs_captured": getattr(rt.engine.forward, "captures", 0)
                + getattr(getattr(rt.engine.drafter, "forward", None), "captures", 0),
                "generation_peak_bytes": rt.meter.above_baseline(),
                "predicted_generation_bytes": report.plan.generation_bytes,
                "wall_s": wall, "prefill_s": stats.prefill_seconds, "decode_tokens_per_s": stats.tokens_per_s,
                "ms_per_step": 1e3 * stats.decode_seconds / max(1, stats.steps), "steps": stats.steps,
                "new_tokens": stats.new_tokens, "acceptance": stats.accepted_tokens / max(1, stats.drafted_tokens),
                "tokens": tokens}
            del rt
        except torch.OutOfMemoryError as e:
            out["engines"][name] = {"refused": f"out of memory under the plan's cap: {str(e).splitlines()[0][:160]}"}
        except Exception as e:  # one engine's failure is a finding, not the end of the check
            out["engines"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    used2 = nvml_used()
    if used0 is not None and used2 is not None:
        out["cuda_overhead_end_bytes"] = used2 - used0 - reserved(device)
    return out


def hf_engines(case: dict, device: str) -> dict:
    """transformers' generate on the same random weights and prompt (no memory cap: a baseline)."""
    import torch

    from specmemo.memory.measure import PeakMeter
    from specmemo.models.synthetic import random_model
    from specmemo.models.resolve import resolve

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    prompt = prompt_of(case, resolve(case["target"]).arch.vocab_size)
    target = random_model(hf_config(case["target"]), 0, dtype, device)
    draft = random_model(hf_config(case["draft"]), 1, dtype, device)
    for m in (target, draft):
        m.set_attn_implementation("sdpa")
    out = {}
    runs = [("hf-ar", {}), ("hf-assisted", {"assistant_model": draft}), ("hf-lookup", {"prompt_lookup_num_tokens": 10})]
    for name, kwargs in runs:
        def gen(ids, new):
            return target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, **kwargs)

        ids = torch.tensor([prompt], device=device)
        gen(ids[:, :64], WARMUP_TOKENS)
        meter = PeakMeter(device)
        meter.start()
        sync(device)
        t0 = time.perf_counter()
        seq = gen(ids, case["new"])
        sync(device)
        wall = time.perf_counter() - t0
        new = seq[0, ids.shape[1]:].tolist()
        out[name] = {"forward": "transformers generate", "generation_peak_bytes": meter.above_baseline(),
                     "wall_s": wall, "new_tokens": len(new), "tokens": new}
    return out


def prompt_of(case: dict, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (case["context"] - case["new"],), generator=g).tolist()


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix: greedy runs that agree match to the end."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_child(part: str, case: dict, device: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--out", "-", "--part", part, "--one", json.dumps(case),
                        "--device", device], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(case: dict, ours: dict, hf: dict) -> dict:
    engines = {**ours.get("engines", {}), **hf}
    ar = engines.get("specmemo-ar", {}).get("tokens")
    for name, e in engines.items():
        if "tokens" in e:
            e["agrees_with_specmemo_ar"] = None if ar is None else agreement(e["tokens"], ar)
            e["tokens_per_s_wall"] = e["new_tokens"] / e["wall_s"]
    hf_ar = engines.get("hf-ar", {}).get("tokens")
    if hf_ar is not None:
        for name in ("specmemo-ar-hf-forward", "hf-assisted", "hf-lookup"):
            if "tokens" in engines.get(name, {}):
                engines[name]["agrees_with_hf_ar"] = agreement(engines[name]["tokens"], hf_ar)
    for e in engines.values():
        e.pop("tokens", None)
    return {"case": case["name"], "budget_bytes": case["budget"], "new_tokens": case["new"],
            "prompt_tokens": case["context"] - case["new"], "plans": ours.get("plans", {}), "engines": engines,
            **{k: ours[k] for k in ("cuda_init_bytes", "cuda_overhead_end_bytes", "error") if k in ours}}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['gpu']} ({report['date']})", "",
             f"torch {report['torch']}, transformers {report['transformers']}; gpu tests: {report['tests']}", "",
             "Random weights (acceptance is meaningless); wall time includes the prefill of the same prompt for "
             "every engine. Agreement: common prefix with specmemo-ar's greedy tokens (of the new tokens).", "",
             "| case | engine | forward | peak MiB | plan MiB | peak/plan | wall s | tok/s (wall) | ms/step | "
             "acceptance | agrees | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case in report["cases"]:
        if "error" in case:
            lines.append(f"| {case['case']} | | | | | | | | | | | error: {case['error']} |")
        for name, e in case["engines"].items():
            if "refused" in e or "error" in e:
                lines.append(f"| {case['case']} | {name} | | | | | | | | | | {e.get('refused', e.get('error'))} |")
                continue
            plan = e.get("predicted_generation_bytes")
            ratio = f"{e['generation_peak_bytes'] / plan:.3f}" if plan else ""
            step = f"{e['ms_per_step']:.2f}" if "ms_per_step" in e else ""
            acc = f"{e['acceptance']:.2f}" if "acceptance" in e else ""
            agree = e.get("agrees_with_specmemo_ar")
            agree = "" if agree is None else f"{agree}/{e['new_tokens']}"
            lines.append(f"| {case['case']} | {name} | {e['forward']} | {e['generation_peak_bytes'] / MIB:.1f} | "
                         f"{'' if not plan else f'{plan / MIB:.1f}'} | {ratio} | {e['wall_s']:.2f} | "
                         f"{e['tokens_per_s_wall']:.1f} | {step} | {acc} | "
                         f"{agree} | |")
        over = [f"{k}: {v / MIB:.0f} MiB" for k, v in case.items() if k.startswith("cuda_") and v is not None]
        if over:
            lines.append(f"| {case['case']} | CUDA overhead (NVML − torch reserved) | | | | | | | | | | {'; '.join(over)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that exercises this script")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child: one case, one side, its own process (the memory cap is per process)
        used0 = nvml_used() if args.device == "cuda" else None
        case = json.loads(args.one)
        result = specmemo_engines(case, args.device, used0) if args.part == "specmemo" else hf_engines(case, args.device)
        print(json.dumps(result))
        return
    import torch
    import transformers

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke to test the script on a CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                            str(ROOT / "tests" / "test_gpu.py")], capture_output=True, text=True, cwd=ROOT)
    (out / "gpu_tests.log").write_text(tests.stdout + tests.stderr)
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    print("gpu tests:", summary, f"({time.time() - t0:.0f} s)", flush=True)
    cases = []
    for case in SMOKE if args.smoke else CASES:
        ours = run_child("specmemo", case, device)
        hf = run_child("hf", case, device) if ours.get("plans") else {}
        if "error" in hf:
            hf = {"hf": {"error": hf["error"]}}
        cases.append(summarize(case, ours, hf))
        print(case["name"], f"done ({time.time() - t0:.0f} s)", flush=True)
        report = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
                  "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "transformers": transformers.__version__, "tests": summary, "cases": cases}
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))  # after each case: a timeout keeps some
        (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
