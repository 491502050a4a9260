"""Hardening (issue 9): the budget is the whole process, bad input never crashes, the engine's
internals agree with the plan. One test (or more) per numbered item; the slow ones run the real
default model."""

import json
import os
import random
import stat
import subprocess
import sys

import pytest
import torch

from specmemo.host import nvml_index
from specmemo.errors import BadInput
from specmemo.pipeline import cuda_cap_fraction
from tests.tiny import VOCAB, make_engine, run, tiny_llama

TARGET = tiny_llama(0, scale=8.0)
DRAFT = tiny_llama(0, scale=8.0)
SPECMEMO = [sys.executable, "-m", "specmemo"]


def repetitive(n, seed=0):
    rng = random.Random(seed)
    base = [rng.randrange(VOCAB) for _ in range(7)]
    return (base * (n // 7 + 1))[:n]


# -- A. the budget ------------------------------------------------------------------------------


def test_plan_counts_the_process_before_loading_and_defaults_to_the_devices_dtype(cli):
    out = json.loads(cli("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--json").stdout)
    assert out["dtype"] == "q4"  # what chat and generate run on a CPU for this 4-bit GGUF (test_quant.py)
    dense = json.loads(cli("plan", "--target", "tinyllama-1.1b-chat", "--context", "512", "--json").stdout)
    assert dense["dtype"] == "fp32"  # the CPU's default for anything that is not a 4-bit GGUF
    assert out["components"]["process_baseline"] >= 300 * 2**20
    assert sum(out["components"].values()) == out["total_bytes"]


def test_refusal_names_the_dtype(cli):
    r = cli("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--budget", "300MiB")
    assert r.exit_code == 3 and "in q4 (KV bf16)" in r.stderr
    r = cli("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--budget", "300MiB", "--dtype", "fp32")
    assert r.exit_code == 3 and "in fp32" in r.stderr


def test_half_precision_on_a_cpu_plans_its_kernel_scratch(cli):
    fp32 = json.loads(cli("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--dtype", "fp32",
                          "--json").stdout)
    bf16 = json.loads(cli("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--dtype", "bf16",
                          "--json").stdout)
    assert bf16["components"]["kernel_scratch"] - fp32["components"]["kernel_scratch"] >= 20 * 2**20


@pytest.mark.parametrize("args,needle", [
    (["--batch", "4", "--draft", "smollm2-135m-instruct"], "batch 4 with --draft model"),
    (["--kv-dtype", "int8"], "--kv-dtype int8"),
    (["--dtype", "fp8"], "--dtype fp8"),
])
def test_plan_marks_what_the_engine_cannot_run(cli, args, needle):
    r = cli("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--budget", "64GiB", *args, "--json")
    out = json.loads(r.stdout)
    assert out["runnable"] is False and any(needle in why for why in out["not_runnable"])
    assert "not runnable yet" in cli("plan", "--target", "smollm2-135m-instruct", "--context", "512",
                                     "--budget", "64GiB", *args).stdout


def test_a_runnable_plan_says_so(cli):
    out = json.loads(cli("plan", "--target", "smollm2-135m-instruct", "--kv-dtype", "bf16", "--json").stdout)
    assert out["runnable"] is True and out["not_runnable"] == []


def test_generate_refuses_a_plan_it_cannot_run():
    r = subprocess.run([*SPECMEMO, "generate", "-p", "Hi", "--kv-dtype", "int8"], capture_output=True, text=True)
    assert r.returncode == 1 and "not runnable yet" in r.stderr and "Traceback" not in r.stderr


def test_cuda_allocator_cap_leaves_the_context_outside_the_budget():
    gib = 2**30
    assert cuda_cap_fraction(8 * gib, 600 * 2**20, 80 * gib) == pytest.approx((8 * gib - 600 * 2**20) / (80 * gib))
    assert cuda_cap_fraction(100 * gib, 0, 80 * gib) == 1.0
    assert cuda_cap_fraction(100, 600, 80 * gib) == 0.0


@pytest.mark.parametrize("visible,expected", [
    (None, 0), ("", None), ("-1", None), ("3", 3), ("2,0", 2), ("GPU-8f2a-11", "GPU-8f2a-11"),
    ("MIG-4d1c", "MIG-4d1c"),
])
def test_nvml_follows_cuda_visible_devices(monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_index() == expected


# -- B. bad input and interaction ------------------------------------------------------------------


@pytest.mark.parametrize("context", [0, -1, 100000])
def test_generate_validates_the_context_like_plan(cli, context):
    r = cli("generate", "-p", "Hello", "--context", str(context))
    assert r.exit_code == 1 and "--context must be between 1 and the model's maximum of 8192" in r.stderr


def test_generate_context_one_leaves_no_room(cli):
    r = cli("generate", "-p", "Hello", "--context", "1")
    assert r.exit_code == 1 and "it needs at least" in r.stderr


def test_usage_errors_exit_2_and_do_not_share_it_with_does_not_fit():
    r = subprocess.run([*SPECMEMO, "generate", "--no-such-flag"], capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run([*SPECMEMO, "plan", "--target", "smollm2-135m-instruct", "--budget", "1MiB"],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "does not fit" in r.stderr


def test_ctrl_c_during_a_long_prefill_stops_between_chunks_and_the_caches_stay_consistent():
    prompt = repetitive(120)
    reference, _ = run(make_engine(TARGET, "ngram", chunk=16), prompt, 20)
    engine = make_engine(TARGET, "ngram", chunk=16)
    calls = []
    events = list(engine.generate(prompt, 20, should_stop=lambda: calls.append(1) or len(calls) > 2))
    stats = events[-1].stats
    assert stats.stop_reason == "interrupted" and stats.new_tokens == 0
    assert engine.store.length == 2 * 16  # two chunks ran, then it stopped
    out, _ = run(engine, [], 20)  # the next call feeds the rest of the prompt and goes on
    assert out == reference


def test_tokens_per_second_excludes_the_prefill():
    _, stats = run(make_engine(TARGET, "none", chunk=16), repetitive(200), 5)
    assert stats.prefill_seconds > 0 and stats.prefilled_tokens == 200
    assert stats.tokens_per_s == pytest.approx(stats.new_tokens / stats.decode_seconds)
    assert stats.prefill_tokens_per_s == pytest.approx(200 / stats.prefill_seconds)


def test_a_json_log_path_that_cannot_be_written_fails_before_the_model_loads(tmp_path):
    r = subprocess.run([*SPECMEMO, "chat", "--json-log", str(tmp_path)], capture_output=True, text=True,
                       input="Hello\n", timeout=60)
    assert r.returncode == 1 and "Is a directory" in r.stderr and "loading" not in r.stdout + r.stderr


def test_atomic_write_keeps_the_usual_mode_and_needs_an_existing_directory(tmp_path):
    from specmemo.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "a.json", "{}")
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "{}")


# -- C. internals that must agree with the plan -------------------------------------------------------


def test_the_draft_models_prefill_is_chunked_like_the_targets():
    sizes = []
    handle = DRAFT.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        for window in (None, 40):
            sizes.clear()
            engine = make_engine(TARGET, "model", DRAFT, chunk=16, window=window, k=4)
            out, _ = run(engine, repetitive(150), 10)
            assert sizes and max(sizes) <= 16, (window, sizes[:12])
            assert out == run(make_engine(TARGET, "none", chunk=16), repetitive(150), 10)[0]
    finally:
        handle.remove()


def test_the_target_store_holds_exactly_the_context_and_candidates_stay_inside_it():
    engine = make_engine(TARGET, "ngram", context=60, k=8)
    assert engine.store.capacity == 60
    out, stats = run(engine, repetitive(30), 100)  # the ngram drafter proposes right to the end
    assert len(out) == 30 and stats.stop_reason == "context_full" and stats.drafted_tokens > 0
    with pytest.raises(BadInput, match="leaves no room"):
        run(make_engine(TARGET, "none", context=30), repetitive(30), 5)


def test_a_bf16_kv_store_under_an_fp32_model_halves_kv_and_speculation_stays_exact():
    plain = make_engine(TARGET, "none", kv_dtype=torch.bfloat16)
    assert plain.store.keys.dtype == torch.bfloat16
    assert plain.store.nbytes * 2 == make_engine(TARGET, "none").store.nbytes
    out, _ = run(plain, repetitive(40), 30)
    assert out == run(make_engine(TARGET, "ngram", kv_dtype=torch.bfloat16), repetitive(40), 30)[0]


def test_the_ngram_index_notices_a_rewritten_conversation():
    from specmemo.decoding.drafters import NgramDrafter

    drafter = NgramDrafter("cpu")
    tokens = [5, 6, 7, 8, 5, 6]
    assert drafter.propose(tokens, 3).tokens.tolist() == [7, 8, 5]
    tokens[:] = [1, 1, 1, 1, 5, 6]  # the engine's list, rewritten in place
    assert drafter.propose(tokens, 3).tokens.tolist() == []  # (5, 6) occurs nowhere earlier now


@pytest.mark.parametrize("make,reason", [
    (lambda: __import__("transformers").MistralConfig(sliding_window=4096, max_position_embeddings=32768), "sliding"),
    (lambda: __import__("transformers").Gemma2Config(), "sliding"),
    (lambda: __import__("transformers").LlamaConfig(), None),
    (lambda: __import__("transformers").Qwen2Config(use_sliding_window=False, sliding_window=4096), None),
    (lambda: __import__("transformers").MistralConfig(sliding_window=None), None),
])
def test_attention_features_the_adapter_cannot_run_are_named(make, reason):
    from specmemo.memory.hf_adapter import unsupported_reason

    found = unsupported_reason(make())
    assert (found is None) if reason is None else (reason in found)


def test_softcapping_is_refused():
    from transformers import LlamaConfig

    from specmemo.memory.hf_adapter import unsupported_reason

    cfg = LlamaConfig()
    cfg.attn_logit_softcapping = 50.0
    assert "soft-capping" in unsupported_reason(cfg)


@pytest.mark.slow
def test_a_sliding_window_model_is_refused_with_one_line(tmp_path):
    from transformers import MistralConfig

    from specmemo.models.synthetic import save_random_model

    cfg = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=64, max_position_embeddings=512)
    draft = save_random_model(cfg, tmp_path / "mistral")
    r = subprocess.run([*SPECMEMO, "generate", "--draft", str(draft), "-p", "Hello", "-m", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "sliding-window attention (64 tokens)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


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


# -- real default model: chat and generate ----------------------------------------------------------


@pytest.mark.slow
def test_text_that_is_not_utf8_is_replaced_not_a_crash():
    r = subprocess.run([*SPECMEMO, "generate", "-p", b"caf\xe9 au lait?", "-m", "4", "--json"], capture_output=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*SPECMEMO, "chat", "--temperature", "0", "-m", "4"], input=b"caf\xe9\nHello\n",
                       capture_output=True, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_chat_commands_fail_softly_and_piped_slash_lines_are_messages(tmp_path):
    log = tmp_path / "log.jsonl"
    out = tmp_path / "saved.json"
    lines = ["/help", "Hi!", f"/save {tmp_path}", f"/save {tmp_path}/missing/x.json", f"/save {out}",
             "/usr/bin holds programs. Say yes.", "//stats is not a command here", "/reset", "/stats", "Bye!"]
    r = subprocess.run([*SPECMEMO, "chat", "--temperature", "0", "-m", "6", "--json-log", str(log)],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "/stats" in r.stdout.split("Hi")[0] and "unknown command" not in r.stdout  # /help is help
    assert "is a directory" in r.stderr and "no such directory" in r.stderr
    assert stat.S_IMODE(out.stat().st_mode) & 0o044  # readable like any file the user writes
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 4  # Hi, the /usr line, the //stats line, Bye
    saved = json.loads(out.read_text())
    assert len(saved["messages"]) == 2
    # /reset cleared the stats table: it shows no row for the turns before it
    after_reset = r.stdout.split("conversation cleared")[1]
    assert "│ 1 " not in after_reset.split("Bye")[0]
    assert "loading models" not in r.stdout


@pytest.mark.slow
def test_a_turn_over_budget_is_reported_and_the_next_turn_shrinks_into_it():
    from specmemo.chat.session import ChatSession
    from specmemo.pipeline import open_pipeline

    rt = open_pipeline("smollm2-135m-instruct", "ngram", context=512)
    session = ChatSession(rt, None, 32)
    list(session.ask("Tell me about bicycles."))
    list(session.ask("And about cars?"))
    held = len(rt.engine.tokens)
    # Pretend the budget was a little less than this process holds now: the next turn's peak is at
    # least what it holds when the turn starts (the kernel's high-water mark is reset to it), so it
    # is over whatever its own allocations do.
    from specmemo.memory.measure import rss_bytes

    object.__setattr__(rt.report, "budget_bytes", rss_bytes() - 4 * 2**20)
    record = [e for e in session.ask("And trains?") if hasattr(e, "over_budget")][0]
    assert record.over_budget and session.context_cap < 512
    cap = session.context_cap
    object.__setattr__(rt.report, "budget_bytes", record.peak_bytes + 64 * 2**20)
    nxt = [e for e in session.ask("Which is fastest?") if hasattr(e, "over_budget")][0]
    assert not nxt.over_budget and nxt.context_limit == session.context_cap == cap
    # The conversation is kept within the lower limit (evicted or re-prefilled if it held more).
    assert held > 0 and nxt.context_tokens <= session.context_cap


@pytest.mark.slow
def test_a_template_that_rerenders_history_is_detected_and_logged():
    from specmemo.chat.session import ChatSession
    from specmemo.pipeline import open_pipeline

    rt = open_pipeline("smollm2-135m-instruct", "ngram", context=1024)
    tok = rt.tokenizer
    # Like templates that strip earlier reasoning: past assistant turns are rendered shortened.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'][:10] }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    session = ChatSession(rt, None, 24)
    first = list(session.ask("Name three rivers."))[-1]
    second = list(session.ask("Which is longest?"))[-1]
    assert first.reprefilled_tokens == 0
    assert second.reprefill_reason == "template" and second.reprefilled_tokens == second.prefilled_tokens > 10


@pytest.mark.slow
def test_bf16_generation_stays_within_its_plan():
    r = subprocess.run([*SPECMEMO, "generate", "--chat", "-p", "Name three colors.", "-m", "32", "--ignore-eos",
                        "--dtype", "bf16", "--json"], capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout)
    assert out["generation_peak_bytes"] <= out["predicted_generation_bytes"]
    assert out["process_peak_bytes"] <= out["plan_total_bytes"]


@pytest.mark.slow
def test_profile_compares_hf_ar_with_and_without_its_cache(tmp_path):
    r = subprocess.run([*SPECMEMO, "profile", "--limit", "1", "--turns", "2", "--max-new-tokens", "8",
                        "--engines", "specmemo-ar,hf-ar,hf-ar-cached", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["engine"]: row for row in report["runs"]}
    assert rows["hf-ar-cached"]["turns"] == 2 and rows["hf-ar-cached"]["turns_identical_to_hf_ar"] == 2
    assert "past_key_values" in (tmp_path / "report.md").read_text()
