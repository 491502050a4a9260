"""The chat: caches carried across turns, eviction within the budget, and the real terminal path.

These run the real default model (SmolLM2-135M-Instruct) greedily, so replies are deterministic.
"""

import json
import os
import re
import subprocess
import sys
import time

import pexpect
import pytest

pytestmark = pytest.mark.slow
SPECMEMO = [sys.executable, "-m", "specmemo"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def chat_pipe(lines, *args, timeout=600):
    return subprocess.run([*SPECMEMO, "chat", "--temperature", "0", *map(str, args)], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=timeout)


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_piped_turns_are_answered_and_turn_two_prefills_only_its_new_tokens(tmp_path):
    from specmemo.chat.conversation import encode_text
    from specmemo.models.load import load_tokenizer
    from specmemo.models.resolve import resolve

    log = tmp_path / "log.jsonl"
    r = chat_pipe(["Write a haiku about rain.", "Now rewrite it about snow."], "--json-log", log,
                  "--max-new-tokens", 48)
    assert r.returncode == 0, r.stderr
    turns = read_log(log)
    assert [t["turn"] for t in turns] == [1, 2] and all(t["new_tokens"] > 0 for t in turns)
    for key in ("context_tokens", "prefilled_tokens", "new_tokens", "drafted_tokens", "accepted_tokens",
                "tokens_per_s", "peak_bytes", "budget_bytes", "evicted_tokens"):
        assert key in turns[0]
    # Turn 2 feeds: the token left pending at the end of turn 1, then the template's closing of
    # the reply plus the new user message and generation prompt. Nothing of turn 1 again.
    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    new_part = "\n<|im_start|>user\nNow rewrite it about snow.<|im_end|>\n<|im_start|>assistant\n"
    if turns[0]["stop_reason"] != "stop_token":
        new_part = "<|im_end|>" + new_part
    assert turns[1]["prefilled_tokens"] == 1 + len(encode_text(tok, new_part))
    assert turns[1]["context_tokens"] == turns[0]["context_tokens"] + turns[1]["prefilled_tokens"] - 1 + turns[1]["new_tokens"]


def test_multi_turn_with_cache_reuse_equals_the_conversation_from_scratch():
    from specmemo.chat.session import ChatSession
    from specmemo.decoding.events import Step
    from specmemo.runtime import open_runtime

    rt = open_runtime("smollm2-135m-instruct", "ngram", context=1024)
    session = ChatSession(rt, None, 40, preload_rss=0)
    for question in ["Name a fruit.", "Why is it healthy?", "Say that again in five words."]:
        list(session.ask(question))
    # The last reply, generated on caches carried over from the earlier turns.
    prompt_end = len(rt.engine.tokens) - session.turns[-1].new_tokens
    conversation = list(rt.engine.tokens[:prompt_end])
    cached_reply = list(rt.engine.tokens[prompt_end:])
    # The same conversation replayed into empty caches in one prefill.
    rt.engine.reset()
    fresh = [t for ev in rt.engine.generate(conversation, 40, session.stops) if isinstance(ev, Step) for t in ev.tokens]
    assert session.turns[-1].prefilled_tokens < len(conversation) // 2
    assert len(cached_reply) > 0 and fresh == cached_reply


def test_long_conversation_evicts_and_stays_within_a_512_token_budget(tmp_path):
    plan = subprocess.run([*SPECMEMO, "plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "512",
                           "--dtype", "fp32", "--json"], capture_output=True, text=True, check=True)
    budget = json.loads(plan.stdout)["total_bytes"]
    log = tmp_path / "log.jsonl"
    questions = [
        "Explain how a bicycle works in detail.", "Now explain how a car engine works.",
        "Compare the two machines.", "Which one is better for the environment and why?",
        "Write a short poem about riding a bicycle.", "Summarize everything we discussed.",
    ]
    r = chat_pipe(questions, "--budget", budget, "--json-log", log, "--max-new-tokens", 120)
    assert r.returncode == 0, r.stderr
    turns = read_log(log)
    assert len(turns) == 6 and all(t["new_tokens"] > 0 for t in turns)
    assert sum(t["evicted_tokens"] for t in turns) > 0
    assert all(t["context_tokens"] <= t["context_limit"] for t in turns)
    assert turns[0]["context_limit"] < 1024  # the budget, not the model's 8k maximum, set the context
    assert all(t["peak_bytes"] <= budget for t in turns), [t["peak_bytes"] for t in turns]
    assert "dropped the oldest" in r.stdout


def test_a_message_longer_than_the_context_gets_a_clear_message(tmp_path):
    r = chat_pipe(["word " * 400, "Hello!"], "--context", 256, "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    assert "does not fit" in r.stdout and "Traceback" not in r.stdout + r.stderr


# -- the real terminal, through a pseudo-terminal -------------------------------------------------------------


@pytest.fixture
def terminal(tmp_path):
    """Start `specmemo chat` on a pseudo-terminal; returns (child, json log path)."""
    children = []

    def start(max_new_tokens: int):
        log = tmp_path / "log.jsonl"
        child = pexpect.spawn(sys.executable, ["-m", "specmemo", "chat", "--temperature", "0", "--stats",
                                               "--json-log", str(log), "--max-new-tokens", str(max_new_tokens)],
                              env={**os.environ, "COLUMNS": "200", "TERM": "xterm"}, encoding="utf-8", timeout=300,
                              dimensions=(50, 200))
        children.append(child)
        child.expect("you> ")
        return child, log

    yield start
    for child in children:
        child.close(force=True)


def test_terminal_streams_replies_shows_stats_and_saves(terminal, tmp_path):
    child, log = terminal(96)
    child.sendline("Write a haiku about rain.")
    child.expect(r"\w+")              # the first words of the reply …
    first_text = time.monotonic()
    child.expect("tok/s")             # … arrive well before the turn's summary line
    assert time.monotonic() - first_text > 0.3
    child.expect("you> ")
    child.sendline("/stats")
    child.expect("accepted/drafted")
    child.expect("you> ")
    out = tmp_path / "conversation.json"
    child.sendline(f"/save {out}")
    child.expect("saved 2 messages")
    child.expect("you> ")
    saved = json.loads(out.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][1]["content"].strip()
    child.sendeof()                   # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_the_next_turn_continues_from_consistent_caches(terminal, tmp_path):
    child, log = terminal(400)
    child.sendline("Write a long story about a dragon who learns to cook. Make it very detailed.")
    child.expect(r"\w+ \w+ \w+")      # the reply is streaming
    child.sendintr()                  # Ctrl-C
    child.expect(r"\(reply stopped\)")
    child.expect("you> ")
    child.sendline("Give the dragon a name in one word.")
    child.expect("tok/s")
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    turns = read_log(log)
    assert turns[0]["stop_reason"] == "interrupted" and turns[0]["new_tokens"] < 400
    assert turns[1]["new_tokens"] > 0
    # The second turn continued the cached conversation: it prefilled only its own tokens.
    assert turns[1]["prefilled_tokens"] < 40
    assert turns[1]["context_tokens"] == turns[0]["context_tokens"] + turns[1]["prefilled_tokens"] - 1 + turns[1]["new_tokens"]
