"""Check that every drafter gives exactly the plain engine's greedy tokens on real prompts."""

from pathlib import Path

from specmemo.decoding.events import Finished, Step
from specmemo.decoding.sampling import SamplingConfig
from specmemo.generation import encode_prompt
from specmemo.models.load import load_model
from specmemo.models.resolve import resolve
from specmemo.models.synthetic import llama_config, save_random_model
from specmemo.planning import build_report
from specmemo.profiling.prompts import load_prompts
from specmemo.runtime import assemble

TARGET = "smollm2-135m-instruct"


def _greedy(engine, prompt_ids, max_new):
    engine.reset()
    tokens, stats = [], None
    for ev in engine.generate(prompt_ids, max_new):
        if isinstance(ev, Step):
            tokens.extend(ev.tokens)
        elif isinstance(ev, Finished):
            stats = ev.stats
    return tokens, stats


def check_greedy_equivalence(prompts_file, limit, max_new: int, workdir: Path, progress: bool = False) -> dict:
    """Returns {drafter: {prompts, identical, new_tokens, drafted, accepted, mismatches}}."""
    target_ref = resolve(TARGET)
    target = load_model(target_ref, "fp32", fast_layout=True)
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
        draft = load_model(ref, dtype, with_tokenizer=False, fast_layout=True) if ref else None
        report = build_report(target_ref, ref, kind, budget=1 << 40, context=context, dtype="fp32",
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
