"""Measured generation memory against the plan, at contexts the run fills (--ignore-eos).

Each point runs `specmemo generate --json` in its own process, so every peak is its own. Writes
bench/results/memory-<cpu class>.json (bench/result.py).
Usage: python bench/memory.py [--contexts 1000,4000] [--drafters none,ngram] [--max-new-tokens 200]
       [--dtype fp32] [--draft-dtype bf16]    (a drafter may be a model: --drafters smollm2-135m-instruct)
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def filler(tokens: int) -> str:
    """Real text of about `tokens` SmolLM2 tokens: MT-Bench questions, else the shipped prompts."""
    source = MT_BENCH if MT_BENCH.exists() else ROOT / "prompts" / "default.jsonl"
    words = " ".join(" ".join(json.loads(l)["turns"]) for l in source.open()).split()
    while len(words) < tokens:
        words = words + words
    return " ".join(words[: int(tokens / 1.35)])  # about 1.35 tokens per English word


def run(context: int, drafter: str, max_new: int, target: str, dtype: str, draft_dtype: str | None) -> dict:
    cmd = [sys.executable, "-m", "specmemo", "generate", "--target", target, "--draft", drafter,
           "--prompt", "-", "--max-new-tokens", str(max_new), "--ignore-eos", "--dtype", dtype, "--json"]
    if draft_dtype and drafter not in ("none", "ngram"):
        cmd += ["--draft-dtype", draft_dtype]
    out = subprocess.run(cmd, input=filler(context - max_new), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1000,4000")
    ap.add_argument("--drafters", default="none,ngram")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--draft-dtype", default=None)
    args = ap.parse_args()
    print("| context | drafter | measured MiB | plan MiB | measured/plan | process peak MiB | plan total MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    from bench.result import figure, save

    worst_ok, figures, points = True, [], []
    for context in map(int, args.contexts.split(",")):
        for drafter in args.drafters.split(","):
            r = run(context, drafter, args.max_new_tokens, args.target, args.dtype, args.draft_dtype)
            ratio = r["generation_peak_bytes"] / r["predicted_generation_bytes"]
            whole = r["process_peak_bytes"] / r["plan_total_bytes"]
            worst_ok &= ratio <= 1.0 and r["process_peak_bytes"] <= r["plan_total_bytes"]
            label = f"{args.target} {r['dtype']}, {drafter}, context {r['context']}"
            figures += [figure(f"generation peak / plan: {label}", round(ratio, 3)),
                        figure(f"process peak / plan total: {label}", round(whole, 3))]
            points.append({k: r[k] for k in ("context", "dtype", "drafter", "generation_peak_bytes",
                                             "predicted_generation_bytes", "process_peak_bytes", "plan_total_bytes")})
            print(f"| {r['context']} | {drafter} | {r['generation_peak_bytes'] / 2**20:.1f} | "
                  f"{r['predicted_generation_bytes'] / 2**20:.1f} | {ratio:.3f} | {r['process_peak_bytes'] / 2**20:.0f} | "
                  f"{r['plan_total_bytes'] / 2**20:.0f} |", flush=True)
    save("memory", figures, {"points": points})
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
