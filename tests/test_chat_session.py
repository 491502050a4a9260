"""The chat session on the real default model: commands that fail softly, a turn over the budget,
a template that re-renders history."""

import json
import stat
import subprocess
import sys

import pytest


SPECMEMO = [sys.executable, "-m", "specmemo"]


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
    from specmemo.pipeline import RunRequest, open_pipeline

    rt = open_pipeline(RunRequest("smollm2-135m-instruct", "ngram", context=512))
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
    from specmemo.pipeline import RunRequest, open_pipeline

    rt = open_pipeline(RunRequest("smollm2-135m-instruct", "ngram", context=1024))
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
def test_a_budget_whose_context_cannot_hold_a_message_and_a_reply_is_refused_at_startup(cli):
    """Just above the lower bound the plan fits a few tokens of context: chat refuses to start
    (exit 3, the context it would need) instead of refusing every message and exiting 0."""
    # A first chat records what a chat process holds (budget.calibration), so that `plan` counts the
    # process as the next chat measures it. A MiB above the plan at 1 token then holds ~45 tokens of
    # KV, where this chat needs about 30 + SHORTEST_EXCHANGE.
    first = subprocess.run([*SPECMEMO, "chat", "--draft", "ngram", "--max-new-tokens", "4"], input="Hello!\n",
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    plan = json.loads(cli("plan", "--draft", "ngram", "--context", "1", "--json").stdout)
    assert plan["calibrated"]
    budget = plan["total_bytes"] + 2**20
    r = subprocess.run([*SPECMEMO, "chat", "--draft", "ngram", "--budget", str(budget)], input="Hello!\n",
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    # (Where this process holds more before loading than the first one did, the plan itself no
    # longer fits: refused as over the budget, also exit 3.)
    assert r.returncode == 3 and len(lines) == 1 and ("needs at least" in lines[0] or "does not fit" in lines[0])
    r = subprocess.run([*SPECMEMO, "chat", "--context", "20"], input="Hello!\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "a chat needs at least" in r.stderr
