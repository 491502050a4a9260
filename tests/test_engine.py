"""The engine's internals: interrupted prefills, the draft model's chunked prefill, the n-gram index
after a rewrite, speeds that exclude the prefill, streamed text equal to the whole decode."""

import random

import pytest

from tests.tiny import VOCAB, make_engine, run, tiny

TARGET = tiny(0, scale=8.0)
DRAFT = tiny(0, scale=8.0)


def repetitive(n, seed=0):
    rng = random.Random(seed)
    base = [rng.randrange(VOCAB) for _ in range(7)]
    return (base * (n // 7 + 1))[:n]


def test_ctrl_c_during_a_long_prefill_stops_between_chunks_and_the_caches_stay_consistent():
    prompt = repetitive(120)
    reference, _ = run(make_engine(TARGET(), "ngram", chunk=16), prompt, 20)
    engine = make_engine(TARGET(), "ngram", chunk=16)
    calls = []
    events = list(engine.generate(prompt, 20, should_stop=lambda: calls.append(1) or len(calls) > 2))
    stats = events[-1].stats
    assert stats.stop_reason == "interrupted" and stats.new_tokens == 0
    assert engine.store.length == 2 * 16  # two chunks ran, then it stopped
    out, _ = run(engine, [], 20)  # the next call feeds the rest of the prompt and goes on
    assert out == reference


def test_tokens_per_second_excludes_the_prefill():
    _, stats = run(make_engine(TARGET(), "none", chunk=16), repetitive(200), 5)
    assert stats.prefill_seconds > 0 and stats.prefilled_tokens == 200
    assert stats.tokens_per_s == pytest.approx(stats.new_tokens / stats.decode_seconds)
    assert stats.prefill_tokens_per_s == pytest.approx(200 / stats.prefill_seconds)


def test_the_draft_models_prefill_is_chunked_like_the_targets():
    sizes = []
    handle = DRAFT().register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        for window in (None, 40):
            sizes.clear()
            engine = make_engine(TARGET(), "model", DRAFT(), chunk=16, window=window, k=4)
            out, _ = run(engine, repetitive(150), 10)
            assert sizes and max(sizes) <= 16, (window, sizes[:12])
            assert out == run(make_engine(TARGET(), "none", chunk=16), repetitive(150), 10)[0]
    finally:
        handle.remove()


def test_the_ngram_index_notices_a_rewritten_conversation():
    from specmemo.decoding.drafters import NgramDrafter

    drafter = NgramDrafter("cpu")
    tokens = [5, 6, 7, 8, 5, 6]
    assert drafter.propose(tokens, 3).tokens.tolist() == [7, 8, 5]
    tokens[:] = [1, 1, 1, 1, 5, 6]  # the engine's list, rewritten in place
    assert drafter.propose(tokens, 3).tokens.tolist() == []  # (5, 6) occurs nowhere earlier now


@pytest.mark.slow
def test_streamed_text_equals_the_whole_decode():
    from specmemo.models.load import load_tokenizer
    from specmemo.models.resolve import resolve
    from specmemo.models.text import StreamDecoder, decode_reply

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    text = "Café naïve — 東京 🚲🚲 don't  stop\n\n  spaces, tabs\tand <|im_end|> tokens: x² ≠ y."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for step in (1, 2, 5):
        stream = StreamDecoder(tok)
        pieces = [stream.push(ids[i:i + step]) for i in range(0, len(ids), step)]
        assert "".join(pieces) == decode_reply(tok, ids)
        assert all("\ufffd" not in p for p in pieces)
