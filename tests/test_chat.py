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
    from specmemo.models.text import encode_template
    from specmemo.models.load import load_tokenizer
    from specmemo.models.resolve import resolve

    log = tmp_path / "log.jsonl"
    r = chat_pipe(["Write a haiku about rain.", "Now rewrite it about snow."], "--json-log", log,
                  "--max-new-tokens", 48)
    assert r.returncode == 0, r.stderr
    turns = read_log(log)
    assert [t["turn"] for t in turns] == [1, 2] and all(t["new_tokens"] > 0 for t in turns)
    for key in ("context_tokens", "prefilled_tokens", "new_tokens", "drafted_tokens", "accepted_tokens",
                "tokens_per_s", "prefill_tokens_per_s", "peak_bytes", "budget_bytes", "evicted_tokens"):
        assert key in turns[0]
    assert turns[0]["forward"] == "specmemo"
    # q4 runs bf16 activations: exact attention through the compiled kernel where this machine builds it
    from specmemo.budget.devices import load_device
    from specmemo.models import quant
    from specmemo.models.kernels import native

    here = load_device("cpu").kernels
    assert turns[0]["attention"] == ("native" if native.exact_attention() else "torch")
    assert turns[0]["products"] == ("compiled" if quant.native_kernels("q4", here) or quant.native_kernels("head", here)
                                    else "torch")
    # Turn 2 feeds: the token left pending at the end of turn 1, then the template's closing of
    # the reply plus the new user message and generation prompt. Nothing of turn 1 again.
    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    new_part = "\n<|im_start|>user\nNow rewrite it about snow.<|im_end|>\n<|im_start|>assistant\n"
    if turns[0]["stop_reason"] != "stop_token":
        new_part = "<|im_end|>" + new_part
    assert turns[1]["prefilled_tokens"] == 1 + len(encode_template(tok, new_part))
    assert turns[1]["context_tokens"] == turns[0]["context_tokens"] + turns[1]["prefilled_tokens"] - 1 + turns[1]["new_tokens"]


def test_multi_turn_with_cache_reuse_equals_the_conversation_from_scratch():
    from specmemo.chat.session import ChatSession
    from specmemo.decoding.events import Step
    from specmemo.pipeline import RunRequest, open_pipeline

    rt = open_pipeline(RunRequest("smollm2-135m-instruct", "ngram", context=1024))
    session = ChatSession(rt, None, 40)
    for question in ["Name a fruit.", "Why is it healthy?", "Say that again in five words."]:
        list(session.ask(question))
    # The last reply, generated on caches carried over from the earlier turns.
    prompt_end = len(rt.engine.tokens) - session.turns[-1].stats.new_tokens
    conversation = list(rt.engine.tokens[:prompt_end])
    cached_reply = list(rt.engine.tokens[prompt_end:])
    # The same conversation replayed into empty caches in one prefill.
    rt.engine.reset()
    fresh = [t for ev in rt.engine.generate(conversation, 40, session.stops) if isinstance(ev, Step) for t in ev.tokens]
    assert session.turns[-1].prefilled_tokens < len(conversation) // 2
    assert len(cached_reply) > 0 and fresh == cached_reply


def rss_watch(proc, samples: list, interval=0.02):
    """Sample a child's resident memory from outside (/proc) until it exits."""
    import threading

    def watch():
        path = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            samples.append(int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(interval)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_plan_budget_holds_the_whole_chat_process_through_six_turns_with_eviction(tmp_path):
    # The plan's default dtype on a CPU is the one chat runs (q4 for this 4-bit GGUF): no --dtype needed.
    # The drafter chat picks (auto), as the plan counts it.
    plan = subprocess.run([*SPECMEMO, "plan", "--target", "smollm2-135m-instruct", "--context", "512",
                           "--json"], capture_output=True, text=True, check=True)
    out = json.loads(plan.stdout)
    budget = out["total_bytes"]
    assert out["dtype"] == "q4" and out["components"]["process_baseline"] > 0
    log = tmp_path / "log.jsonl"
    questions = [line for line in """
Explain in detail how a bicycle works. Cover the frame, the wheels, the chain, the gears and the brakes, one paragraph each.
Now explain in detail how a car engine works. Describe the pistons, the valves, the spark plugs and the crankshaft, one paragraph each.
Compare the two machines in detail. Which parts do similar jobs? Which are completely different? Write at least three paragraphs.
Which one is better for the environment and why? Give five reasons, and explain each reason in two or three sentences.
Write a long poem about riding a bicycle through a city at night. It should rhyme and have four stanzas.
Summarize everything we discussed so far, in one paragraph per topic.
""".splitlines() if line]
    proc = subprocess.Popen([*SPECMEMO, "chat", "--temperature", "0", "--budget", str(budget), "--json-log", str(log),
                             "--max-new-tokens", "160"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    samples: list[int] = []
    watcher = rss_watch(proc, samples)
    stdout, stderr = proc.communicate("\n".join(questions) + "\n", timeout=900)
    watcher.join()
    assert proc.returncode == 0, stderr
    turns = read_log(log)
    assert len(turns) == 6 and all(t["new_tokens"] > 0 for t in turns)
    assert sum(t["evicted_tokens"] for t in turns) > 0
    assert all(t["context_tokens"] <= t["context_limit"] for t in turns)
    # The budget, not the model's 8k maximum, sets the context: the plan's 512 tokens, a little more
    # when greedy (no sampling buffers).
    assert 512 <= turns[0]["context_limit"] < 1024
    # From outside: the whole process, loading included, never went over the budget.
    assert samples and max(samples) <= budget, (max(samples), budget)
    # From inside: each turn's peak is the whole process's (at least what it held once loaded).
    assert all(max(samples) * 0.8 <= t["peak_bytes"] <= budget and not t["over_budget"] for t in turns)
    # An eviction reports the tokens it dropped and leaves headroom: the next turn appends.
    evictions = [i for i, t in enumerate(turns) if t["evicted_turns"]]
    assert evictions
    for i in evictions:
        assert turns[i]["reprefill_reason"] == "eviction"
        assert turns[i]["evicted_tokens"] > 100 and turns[i]["prefilled_tokens"] <= turns[i]["context_limit"] // 2
        if i + 1 < len(turns):
            assert turns[i + 1]["evicted_turns"] == 0 and turns[i + 1]["reprefilled_tokens"] == 0
    assert "dropped the oldest" in stdout and "loading" not in stdout


def test_a_message_longer_than_the_context_gets_a_clear_message_on_stderr_and_in_the_log(tmp_path):
    log = tmp_path / "log.jsonl"
    r = chat_pipe(["word " * 400, "Hello!"], "--context", 256, "--max-new-tokens", 8, "--json-log", log)
    assert r.returncode == 0, r.stderr
    assert "does not fit the 256-token context" in r.stderr and "does not fit" not in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    rows = read_log(log)
    assert "does not fit" in rows[0]["error"] and rows[1]["new_tokens"] > 0


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
    child.expect("detailed.")         # the echo of the line typed …
    child.expect(r"\w+ \w+ \w+")      # … then the reply is streaming
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
