"""Draft-head variants against the shipped recipe, on one corpus and MT-Bench's first turns.

The target (q4, as chat runs it) answers --prompts training prompts (training/prompts.py, seed
--seed; cached in --work) and MT-Bench's first turns (--reply-tokens each; evaluation only),
keeping the outputs of layers 4 and 14 beside the last hidden state. Each variant trains with
the recipe's settings (training/draft_head.HeadRecipe) and reports, teacher-forced, the share of
positions whose drafts were all right to depth 1/2/3 on the held-out prompts, on MT-Bench, and
on the first 200 training prompts (how far it overfits):
  base     the shipped recipe
  layers   the first step starts from a fused state of layers 4, 14 and the last (EAGLE-3's idea)
  noise    uniform noise of 0.2 × the row's RMS on the first state while training (EAGLE's)
  vocab    the head's vocabulary also holds every token id below 8,192 (BPE merge order: the
           tokenizer's commonest pieces), for words the training replies never used
Usage: python bench/head_variants.py [--prompts 1000] [--seed 7] [--variants base,layers,...]
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.memory.malloc import tame_glibc_malloc  # noqa: E402
from specmemo.models.draft_head import TargetParts, unit_rms  # noqa: E402
from specmemo.budget.devices import load_device  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.models.text import encode_prompt, stop_ids  # noqa: E402
from specmemo.host import cpu_name  # noqa: E402
from specmemo.profiling.prompts import load_prompts  # noqa: E402
from specmemo.training.draft_head import (HeadRecipe, Positions, cached_corpus, evaluate, head_vocab,  # noqa: E402
                                          train_head, write_corpus)
from specmemo.training.prompts import training_prompts  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"
LAYERS = (4, 14)
VARIANTS = ("base", "layers", "noise", "vocab")


class FusedLayers(nn.Module):
    """The first step's state from the last hidden state and the kept layers' outputs:
    one linear [(1 + L)·E -> E] over each one scaled to unit RMS."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.fuse = nn.Linear((1 + layers) * hidden, hidden, bias=False)

    def forward(self, pos, p):
        parts = [unit_rms(pos.H[p])] + [unit_rms(pos.L[p, j]) for j in range(pos.L.shape[1])]
        return self.fuse(torch.cat(parts, dim=-1))


def corpus_for(model, tok, prompts: list[str], max_new: int, batch: int, path: Path) -> list[dict]:
    key = {"prompts": prompts, "max_new": max_new, "layers": list(LAYERS)}
    corpus, seconds, reused = cached_corpus(path, key, lambda: write_corpus(
        model, [encode_prompt(tok, p, chat=True) for p in prompts], stop_ids(tok, model), max_new, batch))
    if not reused:
        print(f"{path.name}: {sum(len(c['reply']) for c in corpus)} reply tokens in {seconds:.0f} s", flush=True)
    return corpus


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7, help="of the training prompts (the shipped head used 0)")
    ap.add_argument("--mt-bench", default=str(MT_BENCH))
    ap.add_argument("--limit", type=int, help="MT-Bench questions (default all 80)")
    ap.add_argument("--reply-tokens", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=HeadRecipe.epochs)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "head-variants")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    tame_glibc_malloc()
    recipe = replace(HeadRecipe(), prompts=args.prompts, holdout=min(100, args.prompts // 5), epochs=args.epochs)
    model_loaded = load_model(resolve(recipe.target), recipe.dtype, forward="specmemo", kernels=load_device("cpu").kernels)
    model, tok = model_loaded.model, model_loaded.tokenizer
    model.feature_layers = LAYERS
    args.work.mkdir(parents=True, exist_ok=True)
    train = corpus_for(model, tok, training_prompts(args.prompts, args.seed), recipe.max_new_tokens,
                       recipe.gen_batch, args.work / f"train_{args.prompts}_{args.seed}.safetensors")
    questions = [c.turns[0] for c in load_prompts(args.mt_bench, args.limit)]
    mt = corpus_for(model, tok, questions, args.reply_tokens, 8, args.work / f"mt_bench_{len(questions)}.safetensors")
    print(f"host: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.prompts} prompts (seed {args.seed}), {recipe.epochs} epochs", flush=True)
    fitted = train[: -recipe.holdout]
    seen = Positions(fitted[:200], recipe.depth)
    for name in variants:
        torch.manual_seed(recipe.seed)
        first = FusedLayers(model.cfg.hidden_size, len(LAYERS)) if name == "layers" else None
        vocab = None
        if name == "vocab":
            vocab = torch.unique(torch.cat([head_vocab(fitted, recipe.vocab), torch.arange(recipe.vocab)]))
        head, result = train_head(recipe, model, train, log=lambda *_: None, vocab=vocab, first=first,
                                  noise=0.2 if name == "noise" else 0.0)
        index = torch.full((model.cfg.vocab_size,), -100, dtype=torch.long)
        index[head.vocab] = torch.arange(len(head.vocab))
        parts = TargetParts(model, head.vocab)
        on_mt = evaluate(head, parts, Positions(mt, recipe.depth), index, recipe.depth, first)
        on_seen = evaluate(head, parts, seen, index, recipe.depth, first)
        print(json.dumps({"variant": name, "vocab": len(head.vocab), "train_seconds": result["train_seconds"],
                          "heldout": result["chain"], "mt_bench": on_mt["chain"], "trained_on": on_seen["chain"]}),
              flush=True)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("head_variants"):
        main()
