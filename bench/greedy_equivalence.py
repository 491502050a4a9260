"""Greedy speculative output equals plain greedy output, token for token, on real prompts.

SmolLM2-135M-Instruct (fp32 by default; --dtype q4 or bf16) as the target, the first turn of each MT-Bench question in its
chat template, 64 new tokens. Drafters: none (the reference), ngram, the same weights in bf16 as
a stand-in draft model, and a random tiny draft with the same vocabulary (rejected almost always).
Usage: python bench/greedy_equivalence.py [--limit N] [--max-new-tokens 64] [--prompts FILE] [--dtype q4]
Exit status 1 if any output differs.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.budget.fit import fit  # noqa: E402
from specmemo.decoding.events import collect  # noqa: E402
from specmemo.decoding.sampling import SamplingConfig  # noqa: E402
from specmemo.budget.devices import load_device  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.models.synthetic import llama_config, save_random_model  # noqa: E402
from specmemo.models.text import encode_prompt  # noqa: E402
from specmemo.pipeline import assemble  # noqa: E402
from specmemo.profiling.prompts import load_prompts  # noqa: E402

TARGET = "smollm2-135m-instruct"


def _greedy(engine, prompt_ids, max_new):
    engine.reset()
    return collect(engine.generate(prompt_ids, max_new))


def check_greedy_equivalence(prompts_file, limit, max_new: int, workdir: Path, progress: bool = False,
                             dtype: str = "fp32") -> dict:
    """Returns {drafter: {prompts, identical, new_tokens, drafted, accepted, mismatches}}."""
    target_ref = resolve(TARGET)
    target = load_model(target_ref, dtype, fast_layout=True, kernels=load_device("cpu").kernels)
    random_dir = save_random_model(llama_config(target_ref.arch.vocab_size), workdir / "random-draft", seed=1)
    drafts = {
        "none": ("none", None, None),
        "ngram": ("ngram", None, None),
        "smollm2-bf16-draft": ("model", target_ref, "bf16"),
        "random-tiny-draft": ("model", resolve(str(random_dir)), "fp32"),
    }
    conversations = load_prompts(prompts_file, limit)
    prompts = [encode_prompt(target.tokenizer, c.turns[0], chat=True) for c in conversations]
    context = max(len(p) for p in prompts) + max_new
    engines = {}
    for name, (kind, ref, dtype) in drafts.items():
        draft = load_model(ref, dtype, with_tokenizer=False, fast_layout=True, kernels=load_device("cpu").kernels) if ref else None
        report = fit(target_ref.arch, ref.arch if ref else None, kind, budget=1 << 40, context=context, dtype=dtype,
                     draft_dtype=dtype, sampling=False)
        engines[name] = assemble(report, target, draft, SamplingConfig()).engine
    out = {name: {"prompts": 0, "identical": 0, "new_tokens": 0, "drafted": 0, "accepted": 0, "mismatches": []}
           for name in drafts}
    iterator = zip(conversations, prompts)
    if progress:
        from rich.progress import track

        iterator = track(list(iterator), description="greedy equivalence")
    for conv, ids in iterator:
        reference, _ = _greedy(engines["none"], ids, max_new)
        for name, engine in engines.items():
            tokens, stats = _greedy(engine, ids, max_new) if name != "none" else (reference, None)
            row = out[name]
            row["prompts"] += 1
            row["new_tokens"] += len(tokens)
            if stats:
                row["drafted"] += stats.drafted_tokens
                row["accepted"] += stats.accepted_tokens
            if tokens == reference:
                row["identical"] += 1
            else:
                pos = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
                row["mismatches"].append({"question_id": conv.question_id, "position": pos})
    return out


MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(MT_BENCH) if MT_BENCH.exists() else None)
    ap.add_argument("--dtype", default="fp32", help="the target's weights: fp32, bf16 or q4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = check_greedy_equivalence(args.prompts, args.limit, args.max_new_tokens, Path(tmp), progress=True,
                                          dtype=args.dtype)
    print("| drafter | prompts | identical | new tokens | drafted | accepted | acceptance |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report.items():
        print(f"| {name} | {row['prompts']} | {row['identical']} | {row['new_tokens']} | {row['drafted']} | "
              f"{row['accepted']} | {row['accepted'] / max(1, row['drafted']):.2f} |")
        for m in row["mismatches"]:
            print(f"  MISMATCH question {m['question_id']} at new token {m['position']}")
    sys.exit(0 if all(r["identical"] == r["prompts"] for r in report.values()) else 1)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("greedy_equivalence"):
        main()
