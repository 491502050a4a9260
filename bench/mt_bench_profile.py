"""`specmemo profile` as a bench: runs it, then writes its headline figures to
bench/results/profile-<cpu class>.json (bench/result.py), the report itself beside them in --out.

    python bench/mt_bench_profile.py [--limit 20] [--turns 2] [--max-new-tokens 128]
        [--engines specmemo,specmemo-ar,hf-ar] [--draft auto] [--out out/profile]
MT-Bench (../shared/data/mt_bench_questions.jsonl) where it is present, else the shipped prompts.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--engines", default="specmemo,specmemo-ar,hf-ar")
    ap.add_argument("--draft", default="auto")
    ap.add_argument("--out", type=Path, default=Path("out/profile"))
    args = ap.parse_args()
    from bench.result import figure, save
    from specmemo.budget.devices import default_weights, load_device
    from specmemo.models.resolve import resolve
    from specmemo.profiling.run import profile

    target = "smollm2-135m-instruct"
    dtype = default_weights(load_device("cpu"), resolve(target).packed_q4, None, None, None)[0] or "fp32"  # as the CLI
    report = profile(target, args.draft, args.out, prompts=str(MT_BENCH) if MT_BENCH.exists() else None,
                     turns=args.turns, limit=args.limit, max_new_tokens=args.max_new_tokens,
                     engines=args.engines.split(","), dtype=dtype)
    runs = {r["engine"]: r for r in report["runs"]}
    what = f"SmolLM2-135M {report['dtype']}, {report['prompts']['count']} MT-Bench × {args.turns} turns"
    figures = [figure(f"{name} decode: {what}", round(r["tokens_per_s"], 1), "tok/s") for name, r in runs.items()]
    if "specmemo" in runs and "specmemo-ar" in runs:
        s, ar = runs["specmemo"], runs["specmemo-ar"]
        figures.append(figure(f"specmemo ({report['draft']}) / specmemo-ar: {what}",
                              round(s["tokens_per_s"] / ar["tokens_per_s"], 3), "×"))
        figures.append(figure(f"turns identical to specmemo-ar: {what}",
                              f"{s['turns_identical_to_specmemo_ar']}/{s['turns']}"))
    save("profile", figures, {"report": report})


if __name__ == "__main__":
    main()
