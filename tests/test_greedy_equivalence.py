"""Greedy speculative output is token-identical to plain greedy decoding, with every drafter."""

import random

import pytest
import torch

from tests.tiny import VOCAB, make_engine, run, tiny

TARGET = tiny(0, scale=8.0)
GOOD_DRAFT = tiny(0, scale=8.0)  # the target's own weights in a second model: accepts everything
BAD_DRAFT = tiny(123, hidden=32, heads=2, kv_heads=1, inter=64)  # unrelated: almost always rejected


def prompts(n=4, seed=0):
    rng = random.Random(seed)
    # Repetitive prompts give the n-gram drafter something to find.
    out = []
    for _ in range(n):
        base = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))]
        out.append((base * 4)[: rng.randint(10, 45)])
    return out


def hf_greedy(prompt, n):
    ids = torch.tensor([prompt])
    out = TARGET().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prompt", prompts())
def test_plain_engine_matches_hf_generate(prompt):
    out, _ = run(make_engine(TARGET(), "none"), prompt, 40)
    assert out == hf_greedy(prompt, 40)


@pytest.mark.parametrize("drafter,draft,window", [
    ("ngram", None, None),
    ("model", GOOD_DRAFT(), None),
    ("model", GOOD_DRAFT(), 8),      # ring-buffer draft window, much smaller than the context
    ("model", BAD_DRAFT(), None),
])
@pytest.mark.parametrize("prompt", prompts())
def test_speculative_greedy_equals_plain(prompt, drafter, draft, window):
    plain, _ = run(make_engine(TARGET(), "none"), prompt, 60)
    spec, stats = run(make_engine(TARGET(), drafter, draft, window=window, k=5), prompt, 60)
    assert spec == plain
    assert stats.new_tokens == 60


def test_drafters_actually_draft():
    prompt = prompts()[0]
    _, good = run(make_engine(TARGET(), "model", GOOD_DRAFT(), k=5), prompt, 60)
    _, bad = run(make_engine(TARGET(), "model", BAD_DRAFT(), k=5), prompt, 60)
    _, ngram = run(make_engine(TARGET(), "ngram", k=5), prompt, 60)
    assert good.acceptance_rate > 0.5 and good.steps < 60
    assert bad.drafted_tokens > 0 and bad.acceptance_rate < 0.2
    assert ngram.accepted_tokens > 0


def test_stop_token_ends_generation_and_is_kept():
    prompt = prompts()[1]
    plain, _ = run(make_engine(TARGET(), "none"), prompt, 30)
    stop = plain[7]
    first = plain.index(stop)
    out, stats = run(make_engine(TARGET(), "ngram"), prompt, 30, stop_ids={stop})
    assert out == plain[: first + 1] and stats.stop_reason == "stop_token"


def test_kv_storage_pointers_never_change_during_generation():
    engine = make_engine(TARGET(), "model", GOOD_DRAFT(), window=8, k=5)
    target_ptrs = engine.store.data_ptrs()
    draft_ptrs = engine.drafter.store.data_ptrs()
    seen = []
    for _ in engine.generate(prompts()[2], 80):
        seen.append((engine.store.data_ptrs(), engine.drafter.store.data_ptrs()))
    assert len(seen) > 10
    assert all(t == target_ptrs and d == draft_ptrs for t, d in seen)


def test_prompt_longer_than_context_is_refused():
    from specmemo.errors import BadInput

    with pytest.raises(BadInput, match="leaves no room to generate"):
        run(make_engine(TARGET(), "none", context=20), list(range(30)), 5)


def test_generation_stops_when_the_planned_context_is_full():
    out, stats = run(make_engine(TARGET(), "ngram", context=40), prompts()[0][:20], 100)
    assert len(out) == 20 and stats.stop_reason == "context_full"
