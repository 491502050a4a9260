"""specmemo's own decoder against transformers, teacher-forced on real prompts.

Both run SmolLM2-135M-Instruct (the same weights, fp32 by default) over the first turn of each
MT-Bench question in its chat template followed by transformers' own greedy reply (64 tokens),
and we compare their next-token choice at every position: top-1 agreement, the largest
|Δlogit|, and where they differ, transformers' top-2 margin there (a near-tie flips on rounding).
Usage: python bench/forward_agreement.py [--limit N] [--dtype fp32] [--prompts FILE]
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.budget.fit import fit  # noqa: E402
from specmemo.memory.allocator import allocate_target  # noqa: E402
from specmemo.budget.devices import load_device  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.models.text import encode_prompt  # noqa: E402
from specmemo.profiling.prompts import load_prompts  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--reply-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(MT_BENCH) if MT_BENCH.exists() else None)
    args = ap.parse_args()
    ref = resolve("smollm2-135m-instruct")
    hf = load_model(ref, args.dtype, forward="transformers")
    ours = load_model(ref, args.dtype, with_tokenizer=False, forward="specmemo", kernels=load_device("cpu").kernels).model
    tok = hf.tokenizer
    convs = load_prompts(args.prompts, args.limit)
    positions = agree = 0
    max_delta, flips = 0.0, []
    for conv in convs:
        prompt = encode_prompt(tok, conv.turns[0], chat=True)
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            out = hf.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.reply_tokens,
                                    do_sample=False, pad_token_id=0)
            seq = out[0].tolist()
            ref_logits = hf.model(torch.tensor([seq])).logits[0].float()            # [T, V]
            report = fit(ref.arch, None, "none", context=len(seq), dtype=args.dtype, sampling=False, budget=1 << 40)
            store = allocate_target(report.plan, ours.dtype, "cpu")
            got = torch.cat([ours(store, torch.tensor([seq[i:i + 256]]), len(seq[i:i + 256]))[0]
                             for i in range(0, len(seq), 256)])                    # [T, V]
        a, b = got.argmax(-1), ref_logits.argmax(-1)
        positions += len(seq)
        agree += int((a == b).sum())
        max_delta = max(max_delta, float((got - ref_logits).abs().max()))
        for p in (a != b).nonzero().flatten().tolist():
            top = torch.topk(ref_logits[p], 2).values
            flips.append((conv.question_id, p, float(top[0] - top[1])))
    print(f"| prompts | positions | top-1 agreement | max abs Δlogit | disagreements (top-2 margin) |")
    print(f"|---:|---:|---:|---:|---|")
    detail = ", ".join(f"q{q}@{p} ({m:.1e})" for q, p, m in flips[:10]) or "none"
    print(f"| {len(convs)} | {positions} | {agree / positions:.4%} | {max_delta:.2e} | {detail} |")
    sys.exit(0 if agree / positions >= 0.995 else 1)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("forward_agreement"):
        main()
