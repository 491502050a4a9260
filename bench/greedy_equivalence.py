"""Greedy speculative output equals plain greedy output, token for token, on real prompts.

SmolLM2-135M-Instruct (fp32) as the target, the first turn of each MT-Bench question in its
chat template, 64 new tokens. Drafters: none (the reference), ngram, the same weights in bf16 as
a stand-in draft model, and a random tiny draft with the same vocabulary (rejected almost always).
Usage: python bench/greedy_equivalence.py [--limit N] [--max-new-tokens 64] [--prompts FILE]
Exit status 1 if any output differs.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.equivalence import check_greedy_equivalence  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(MT_BENCH) if MT_BENCH.exists() else None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = check_greedy_equivalence(args.prompts, args.limit, args.max_new_tokens, Path(tmp), progress=True)
    print("| drafter | prompts | identical | new tokens | drafted | accepted | acceptance |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report.items():
        print(f"| {name} | {row['prompts']} | {row['identical']} | {row['new_tokens']} | {row['drafted']} | "
              f"{row['accepted']} | {row['accepted'] / max(1, row['drafted']):.2f} |")
        for m in row["mismatches"]:
            print(f"  MISMATCH question {m['question_id']} at new token {m['position']}")
    sys.exit(0 if all(r["identical"] == r["prompts"] for r in report.values()) else 1)


if __name__ == "__main__":
    main()
