"""The GPU check for issue 6: one run, under 8 minutes on an H100/H200, report under $OUT.

1. runs the tests marked `gpu` (greedy equivalence, sampling distribution, fixed KV on CUDA);
2. builds realistic-size models from configuration with random weights (llama-2-7b-chat target
   with a vicuna-68m draft in fp16; SmolLM2-1.7B with SmolLM2-135M);
3. emulates 8 GiB and 24 GiB devices with torch.cuda.set_per_process_memory_fraction;
4. measures peak memory against the plan, and time per step for specmemo, specmemo-ar, hf-ar and
   hf-assisted in the same process. Random weights make acceptance meaningless, so it reports
   per-step overhead and memory, not speedup.

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
CASES = [
    {"name": "24GiB llama-2-7b + vicuna-68m", "budget": 24 * GIB, "target": "llama-2-7b-chat",
     "draft": "vicuna-68m", "dtype": "fp16", "context": 2048, "new": 128},
    {"name": "8GiB llama-2-7b + vicuna-68m", "budget": 8 * GIB, "target": "llama-2-7b-chat",
     "draft": "vicuna-68m", "dtype": "fp16", "context": 2048, "new": 128},
    {"name": "8GiB smollm2-1.7b + smollm2-135m", "budget": 8 * GIB, "target": "smollm2-1.7b-instruct",
     "draft": "smollm2-135m-instruct", "dtype": "bf16", "context": 4096, "new": 128},
]
SMOKE = [{"name": "smoke vicuna-68m + vicuna-68m", "budget": 2 * GIB, "target": "vicuna-68m", "draft": "vicuna-68m",
          "dtype": "fp32", "context": 256, "new": 16}]


def hf_config(alias: str):
    from transformers import LlamaConfig

    data = tomllib.loads((ROOT / "profiles" / "models" / f"{alias}.toml").read_text())
    return LlamaConfig(**data["config"])


def run_case(case: dict, device: str) -> dict:
    """In its own process (the memory-fraction cap is per process)."""
    import torch

    from specmemo.decoding.events import Finished
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.errors import BudgetExceeded
    from specmemo.models.load import wrap
    from specmemo.models.resolve import resolve
    from specmemo.models.synthetic import random_model
    from specmemo.budget.fit import fit
    from specmemo.pipeline import assemble, cap_cuda_memory

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    t_ref, d_ref = resolve(case["target"]), resolve(case["draft"])
    out = {"case": case["name"], "budget_bytes": case["budget"]}
    prompt = torch.randint(0, t_ref.arch.vocab_size, (case["context"] - case["new"],)).tolist()
    engines = {}
    for name, drafter in [("specmemo", "model"), ("specmemo-ar", "none")]:
        try:
            report = fit(t_ref.arch, d_ref.arch if drafter == "model" else None, drafter,
                         device="cpu" if device == "cpu" else "cuda", budget=case["budget"], context=case["context"],
                         dtype=case["dtype"], sampling=False, shrink=True)
        except BudgetExceeded as e:
            engines[name] = {"refused": str(e).split(". Plan:")[0]}
            continue
        out.setdefault("plans", {})[name] = {"total_bytes": report.plan.total_bytes,
                                             "generation_bytes": report.plan.generation_bytes,
                                             "lower_bound_bytes": report.lower_bound.total_bytes}
        if device == "cuda":
            cap_cuda_memory(report)
        target = wrap(t_ref, random_model(hf_config(case["target"]), 0, dtype, device))
        draft = wrap(d_ref, random_model(hf_config(case["draft"]), 1, dtype, device)) if drafter == "model" else None
        rt = assemble(report, target, draft, SamplingConfig())
        stats = [ev.stats for ev in rt.engine.generate(prompt, case["new"]) if isinstance(ev, Finished)][0]
        engines[name] = {"generation_peak_bytes": rt.meter.above_baseline(), "predicted_generation_bytes": report.plan.generation_bytes,
                         "ms_per_step": 1e3 * stats.decode_seconds / stats.steps, "steps": stats.steps,
                         "tokens_per_s": stats.new_tokens / stats.decode_seconds}
        # HF baselines on the same weights, same process.
        if name == "specmemo":
            for hf_name, kwargs in [("hf-ar", {}), ("hf-assisted", {"assistant_model": draft.model})]:
                from specmemo.memory.measure import PeakMeter

                for m in (target.model, draft.model):
                    m.set_attn_implementation("sdpa")
                meter = PeakMeter(device)
                meter.start()
                ids = torch.tensor([prompt], device=device)
                t0 = time.perf_counter()
                gen = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=case["new"],
                                            min_new_tokens=case["new"], do_sample=False, **kwargs)
                secs = time.perf_counter() - t0
                n = gen.shape[1] - ids.shape[1]
                engines[hf_name] = {"generation_peak_bytes": meter.above_baseline(), "tokens_per_s": n / secs,
                                    "ms_per_token": 1e3 * secs / n}
        del rt, target, draft
        if device == "cuda":
            torch.cuda.empty_cache()
    out["engines"] = engines
    return out


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['gpu']} ({report['date']})", "",
             f"gpu tests: {report['tests']}", "",
             "| case | engine | peak MiB | plan MiB | peak/plan | ms/step | tok/s | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for case in report["cases"]:
        for name, e in case["engines"].items():
            if "refused" in e:
                lines.append(f"| {case['case']} | {name} | | | | | | refused: {e['refused']} |")
                continue
            plan = e.get("predicted_generation_bytes")
            ratio = f"{e['generation_peak_bytes'] / plan:.3f}" if plan else ""
            step = e.get("ms_per_step", e.get("ms_per_token"))
            lines.append(f"| {case['case']} | {name} | {e['generation_peak_bytes'] / 2**20:.1f} | "
                         f"{'' if not plan else f'{plan / 2**20:.1f}'} | {ratio} | {step:.2f} | {e['tokens_per_s']:.1f} | |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that exercises this script")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(json.loads(args.one), args.device)))
        return
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke to test the script on a CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")],
                           capture_output=True, text=True, cwd=ROOT)
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    cases = []
    for case in SMOKE if args.smoke else CASES:
        r = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", json.dumps(case), "--device", device],
                           capture_output=True, text=True)
        cases.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                     {"case": case["name"], "engines": {"error": {"refused": r.stderr.strip().splitlines()[-1][:200]}}})
        print(case["name"], "done", flush=True)
    report = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
              "date": time.strftime("%Y-%m-%d"), "tests": summary, "cases": cases}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
