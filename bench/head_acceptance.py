"""The shipped draft head's acceptance on held-out conversations, teacher-forced.

The target (SmolLM2-135M-Instruct in the weights chat runs, q4) answers each prompt's first turn
greedily (--reply-tokens tokens); at every reply position the head predicts the target's next
token from the target's hidden state and the token just chosen, regressively for 3 steps:
  first   the head's top-1 equals the target's token (a first draft token's greedy acceptance)
  chain   the head's drafts agree with the target at every depth so far (depth 1, 2, 3)
  ranks   the target's token was the head's r-th candidate (r = 1..4: a tree's acceptance vector)
Usage: python bench/head_acceptance.py [--head FILE] [--prompts FILE] [--limit N] [--reply-tokens 128]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.memory.malloc import tame_glibc_malloc  # noqa: E402
from specmemo.models.draft_head import TargetParts, load_head  # noqa: E402
from specmemo.budget.devices import load_device  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.resolve import resolve, shipped_head  # noqa: E402
from specmemo.models.text import encode_prompt, stop_ids  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402
from specmemo.profiling.prompts import load_prompts  # noqa: E402
from specmemo.training.draft_head import Positions, evaluate, write_corpus  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="q4")
    ap.add_argument("--head", help="a head file (default: the one shipped for the target)")
    ap.add_argument("--prompts", default=str(MT_BENCH) if MT_BENCH.exists() else None)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--reply-tokens", type=int, default=128)
    args = ap.parse_args()
    tame_glibc_malloc()
    loaded = load_model(resolve(args.target), args.dtype, forward="specmemo", kernels=load_device("cpu").kernels)
    model, tok = loaded.model, loaded.tokenizer
    head, card = load_head(Path(args.head) if args.head else shipped_head(args.target))
    convs = load_prompts(args.prompts, args.limit)
    ids = [encode_prompt(tok, c.turns[0], chat=True) for c in convs]
    t0 = time.perf_counter()
    corpus = write_corpus(model, ids, stop_ids(tok, model), args.reply_tokens, batch=8)
    index = torch.full((model.cfg.vocab_size,), -100, dtype=torch.long)
    index[head.vocab] = torch.arange(len(head.vocab))
    result = evaluate(head, TargetParts(model, head.vocab), Positions(corpus, 3), index, 3)
    coverage = float(torch.isin(torch.cat([c["reply"] for c in corpus]), head.vocab).float().mean())
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"prompts: {args.prompts or 'shipped default'} ({len(convs)} first turns), target {args.target} "
          f"{args.dtype}, {sum(len(c['reply']) for c in corpus)} reply tokens ({time.perf_counter() - t0:.0f} s)")
    print(json.dumps({**result, "vocab_coverage": round(coverage, 4),
                      "card_heldout_first": card.get("evaluation", {}).get("first")}))


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("head_acceptance"):
        main()
