"""`specmemo plan` end to end through the CLI: the figures, exit codes and every bad input."""

import json

import pytest

from specmemo.budget.units import parse_size
from specmemo.errors import BadInput

DONE_WHEN = ["plan", "--target", "llama-2-7b-chat", "--draft", "vicuna-68m", "--device", "titan-rtx",
             "--context", "2048", "--draft-len", "5", "--dtype", "fp16"]


def test_llama2_7b_with_vicuna_68m_on_titan_rtx(cli):
    r = cli(*DONE_WHEN, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    c = out["components"]
    assert c["target_kv"] == 2048 * 524_288
    assert abs(c["target_weights"] - 6_738_415_616 * 2) / (6_738_415_616 * 2) < 0.01
    assert sum(c.values()) == out["total_bytes"]
    assert {"target_weights", "draft_weights", "target_kv", "draft_kv"} <= set(c)
    for key in ("fits", "budget_bytes", "lower_bound_bytes", "speedup_budget_bytes", "max_context",
                "draft_len", "draft_window"):
        assert key in out
    assert out["fits"] and out["draft_len"] == 5
    assert out["lower_bound_bytes"] <= out["speedup_budget_bytes"] <= out["total_bytes"]


def test_same_pair_under_4gib_exits_3_naming_the_lower_bound(cli):
    r = cli(*DONE_WHEN[:-6], "--context", "2048", "--budget", "4GiB", "--json")
    assert r.exit_code == 3
    assert "lower bound" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert json.loads(r.stdout)["fits"] is False


def test_human_output_shows_components_and_budgets(cli):
    r = cli(*DONE_WHEN)
    assert r.exit_code == 0
    for word in ("target_kv", "draft_weights", "lower bound", "speedup budget", "fits"):
        assert word in r.stdout


def test_without_context_plans_the_largest_context_that_fits(cli):
    out = json.loads(cli("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram",
                         "--budget", "1200MiB", "--dtype", "fp32", "--json").stdout)
    assert out["context"] == out["max_context"] and out["fits"]
    assert out["total_bytes"] <= 1200 * 2**20


@pytest.mark.parametrize("text,expected", [
    ("8GiB", 8 * 2**30), ("800MB", 800 * 10**6), ("8G", 8 * 2**30), ("123", 123), ("1.5GiB", 3 * 2**29),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1GiB", "0MB", "lots", "8XB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(BadInput):
        parse_size(text)


@pytest.mark.parametrize("args,needle", [
    (["--target", "no-such-model"], "unknown model alias"),
    (["--target", "/etc"], "not a model directory"),
    (["--target", "/etc/hostname"], "not a model"),
    (["--target", "llama-2-7b-chat", "--draft", "qwen3-0.6b"], "vocabulary"),
    (["--target", "llama-2-7b-chat", "--budget", "0"], "positive"),
    (["--target", "llama-2-7b-chat", "--budget", "-4GiB"], "positive"),
    (["--target", "llama-2-7b-chat", "--context", "100000"], "maximum of 4096"),
    (["--target", "llama-2-7b-chat", "--device", "toaster"], "unknown device"),
])
def test_bad_input_is_one_line_and_exit_1(cli, args, needle):
    r = cli("plan", *args)
    assert r.exit_code == 1, r.output
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_an_8b_model_fits_an_8gib_laptop_gpu_in_q4_but_not_in_fp16(cli):
    # On a GPU a q4 plan holds the layers in 4 bits, the untied embedding too and the LM head in q8
    # (as GGUF files hold them; the device profile's quantized_head), and a draft without a GGUF in
    # the target's format (nothing runs packed there yet): with n-gram drafting or a 1B model
    # draft, 8,192 tokens fit. In fp16 they do not.
    args = ["plan", "--target", "llama-3.1-8b-instruct", "--device", "rtx-4060-laptop-8gb", "--context", "8192",
            "--json"]
    q4 = cli(*args, "--draft", "ngram", "--dtype", "q4")
    fp16 = cli(*args, "--draft", "ngram", "--dtype", "fp16")
    with_draft = cli(*args, "--draft", "llama-3.2-1b-instruct", "--dtype", "q4")
    assert q4.exit_code == 0 and json.loads(q4.stdout)["fits"]
    assert json.loads(q4.stdout)["kv_dtype"] == "bf16"
    assert json.loads(q4.stdout)["runnable"] is False  # packed weights run on a CPU so far
    pair = json.loads(with_draft.stdout)
    assert with_draft.exit_code == 0 and pair["fits"] and pair["draft_dtype"] == "q4" and pair["context"] == 8192
    assert pair["total_bytes"] <= pair["budget_bytes"] == 8 << 30
    assert fp16.exit_code == 3 and not json.loads(fp16.stdout)["fits"]


def test_batch_plans_are_runnable_with_batch_drafters_and_scale_the_kv(cli):
    args = ["plan", "--target", "smollm2-135m-instruct", "--context", "512", "--json", "--dtype", "fp32"]
    one = json.loads(cli(*args, "--draft", "ngram").stdout)
    four = json.loads(cli(*args, "--draft", "ngram", "--batch", "4").stdout)
    head = json.loads(cli(*args, "--draft", "head", "--batch", "4").stdout)
    model = json.loads(cli(*args, "--draft", "smollm2-135m-instruct", "--batch", "4").stdout)
    assert four["runnable"] and four["batch"] == 4 and head["runnable"]
    assert four["components"]["target_kv"] == 4 * one["components"]["target_kv"]
    assert not model["runnable"] and "batch 4 with --draft model" in " ".join(model["not_runnable"])


def test_lookup_then_head_is_planned_with_the_heads_weights(cli):
    args = ["plan", "--target", "smollm2-135m-instruct", "--context", "512", "--json", "--dtype", "q4"]
    head = json.loads(cli(*args, "--draft", "head").stdout)
    both = json.loads(cli(*args, "--draft", "ngram+head").stdout)
    assert both["draft"] == "ngram+head" and both["runnable"]
    assert both["components"]["draft_weights"] == head["components"]["draft_weights"] > 0
