"""`specmemo generate` end to end on the real default model (SmolLM2-135M-Instruct GGUF)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from specmemo.models.synthetic import llama_config, save_random_model
from specmemo.paths import profiles_dir

pytestmark = pytest.mark.slow


def generate(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "specmemo", "generate", *map(str, args)],
                          capture_output=True, text=True, input=stdin, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def eager_head(tmp_path) -> dict:
    """An environment whose profiles say the draft head pays (α 0.9, free): whether it drafts
    then does not hang on the head's last measured profile on this machine (which may find it
    slower than none) or on forward times measured in the run."""
    profiles = tmp_path / "profiles"
    shutil.copytree(profiles_dir(), profiles)
    (profiles / "pairs" / "smollm2-135m-instruct__head.toml").write_text("alpha = 0.9\nc = 0.0\n")
    return {"SPECMEMO_PROFILES": str(profiles)}


def json_runs(drafters, prompt, max_new, env=None):
    """generate --json once per drafter: {drafter: its JSON}."""
    runs = {}
    for drafter in drafters:
        r = generate("--draft", drafter, "--prompt", prompt, "--chat", "--max-new-tokens", max_new, "--json", env=env)
        assert r.returncode == 0, r.stderr
        runs[drafter] = json.loads(r.stdout)
    return runs


def test_json_output_has_every_field_and_ngram_equals_plain():
    runs = json_runs(("none", "ngram"), "Write a haiku about rain.", 48)
    out = runs["ngram"]
    for key in ("text", "token_ids", "new_tokens", "drafted_tokens", "accepted_tokens", "steps", "tokens_per_s",
                "generation_peak_bytes", "predicted_generation_bytes", "weights_bytes", "load_peak_bytes",
                "budget_bytes"):
        assert key in out
    assert out["token_ids"] == runs["none"]["token_ids"]
    assert out["new_tokens"] == len(out["token_ids"]) and out["text"]
    assert out["drafted_tokens"] >= out["accepted_tokens"] > 0
    assert out["steps"] < out["new_tokens"]          # speculation committed several tokens in some step
    # q4 (the CPU default for this 4-bit GGUF): the plan's 123,048,576 bytes + the RoPE frequencies
    assert out["dtype"] == "q4" and out["weights_bytes"] == 123_048_576 + 128
    assert out["forward"] == "specmemo"  # the Llama family runs on our own decoder
    assert out["attention"] in ("native", "torch")   # q4: bf16 activations attend exactly, one of two ways
    from specmemo.budget.devices import load_device
    from specmemo.models.quant import native_kernels

    here = load_device("cpu").kernels
    assert out["products"] == ("compiled" if native_kernels("q4", here) or native_kernels("head", here) else "torch")
    assert 0 < out["generation_peak_bytes"]


def test_streams_text_to_stdout():
    r = generate("--prompt", "Name three colors.", "--chat", "--max-new-tokens", 16)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr


def test_tokenizerless_draft_with_matching_vocabulary_is_accepted(tmp_path):
    draft = save_random_model(llama_config(49152), tmp_path / "draft")
    r = generate("--draft", draft, "--prompt", "Hello", "--max-new-tokens", 8, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["drafted_tokens"] > 0


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    draft = save_random_model(llama_config(1000), tmp_path / "draft")
    r = generate("--draft", draft, "--prompt", "Hello")
    assert r.returncode == 1 and "vocabulary" in r.stderr and "Traceback" not in r.stderr


def test_pickled_weights_are_refused_without_allow_pickle(tmp_path):
    import torch

    draft = save_random_model(llama_config(49152), tmp_path / "draft")
    for f in draft.glob("*.safetensors"):
        f.unlink()
    torch.save({}, draft / "pytorch_model.bin")
    r = generate("--draft", draft, "--prompt", "Hello")
    assert r.returncode == 1 and "--allow-pickle" in r.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["--target", "/no/such/model.gguf"], 1, "no such file"),
    (["--budget", "100MB"], 3, "lower bound"),
    (["--context", 8], 1, "longer than the context"),
    (["--max-new-tokens", 0], 1, "max-new-tokens"),
])
def test_bad_input_is_one_clear_line(args, code, needle):
    r = generate("--prompt", "Tell me a story about a dragon.", *args)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_budget_refusal_shows_the_plan_breakdown():
    r = generate("--prompt", "Hi", "--budget", "100MB")
    assert r.returncode == 3
    assert "target_weights" in r.stderr and "target_kv" in r.stderr


def test_the_shipped_draft_head_drafts_and_leaves_the_output_unchanged(tmp_path):
    runs = json_runs(("none", "head"), "Explain how a rainbow forms.", 64, env=eager_head(tmp_path))
    head = runs["head"]
    assert head["token_ids"] == runs["none"]["token_ids"]          # greedy: exactly the target's tokens
    assert head["drafted_tokens"] >= head["accepted_tokens"] > 0  # and the head's drafts were accepted
    assert head["drafter"] == "head" and runs["none"]["drafter"] == "none"
    # The head is built while the target loads and counted with the weights (8-32 MB: int8, bf16 or
    # fp32 by this CPU): drafting adds only its activations to what generation holds, well under the
    # head's own bytes, and stays within the plan.
    from specmemo.budget.footprint import draft_head_bytes
    from specmemo.budget.devices import load_device
    from specmemo.models.quant import draft_head_weights
    from specmemo.models.resolve import head_file, head_header

    head_bytes = draft_head_bytes(*head_header(head_file("smollm2-135m-instruct"))[0],
                                  draft_head_weights(load_device("cpu").kernels))
    assert head["generation_peak_bytes"] - runs["none"]["generation_peak_bytes"] < 0.75 * head_bytes
    assert head["generation_peak_bytes"] <= head["predicted_generation_bytes"]
    assert head["process_peak_bytes"] <= head["plan_total_bytes"]


def test_train_draft_writes_a_head_and_its_card(tmp_path):
    def train(out):
        args = ["--prompts", 104, "--max-new-tokens", 6, "--epochs", 1, "--out", out, "--work", tmp_path / "work"]
        return subprocess.run([sys.executable, "-m", "specmemo", "train-draft", *map(str, args)],
                              capture_output=True, text=True, timeout=600)

    r = train(tmp_path / "head.safetensors")
    assert r.returncode == 0, r.stderr
    from specmemo.models.draft_head import load_head

    head, card = load_head(tmp_path / "head.safetensors")
    assert card["recipe"]["prompts"] == 104 and card["corpus_tokens"] > 0
    assert 0 <= card["evaluation"]["first"] <= 1 and len(card["evaluation"]["ranks"]) == 4
    assert (tmp_path / "head.md").read_text().startswith("# Draft head for smollm2-135m-instruct")
    assert (tmp_path / "work" / "corpus.safetensors").exists()
    # A second run with the same corpus settings reuses the corpus instead of generating it again.
    again = train(tmp_path / "head2.safetensors")
    assert again.returncode == 0 and "reusing" in again.stderr
    # Its card says the corpus came from the earlier run, with that run's writing time.
    assert not card["corpus_reused"] and card["corpus_seconds"] > 0
    _, card2 = load_head(tmp_path / "head2.safetensors")
    assert card2["corpus_reused"] and card2["corpus_seconds"] == card["corpus_seconds"]
    assert "by an earlier run" in (tmp_path / "head2.md").read_text()


BATCH_PROMPTS = ["Name three colors.", "Write a haiku about rain.", "What is 2 + 2?", "Say hello in French."]


def test_prompts_file_gives_one_line_per_prompt_in_order_each_equal_to_its_single_run(tmp_path):
    """--prompts with --batch 2: four prompts through two rows (the pool refills a finished row),
    each line's tokens equal to `generate --prompt` for that prompt alone, in input order."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in BATCH_PROMPTS) + "\n")
    r = generate("--prompts", prompts, "--batch", 2, "--chat", "--draft", "ngram", "-m", 24, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.strip().splitlines()]
    summary = lines.pop()["summary"]
    assert [l["index"] for l in lines] == [0, 1, 2, 3]
    assert summary["batch"] == 2 and summary["prompts"] == 4 and summary["drafter"] == "ngram"
    assert summary["new_tokens"] == sum(l["new_tokens"] for l in lines)
    assert {l["row"] for l in lines} == {0, 1}
    assert summary["generation_peak_bytes"] <= summary["predicted_generation_bytes"]
    for prompt, line in zip(BATCH_PROMPTS, lines):
        alone = json.loads(generate("--prompt", prompt, "--chat", "--draft", "ngram", "-m", 24, "--json").stdout)
        assert line["token_ids"] == alone["token_ids"] and line["text"] == alone["text"]


def test_prompts_as_plain_lines_default_batch_and_summary_on_stderr(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(BATCH_PROMPTS[:3]) + "\n\n")
    r = generate("--prompts", prompts, "-m", 4)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert len(lines) == 3 and all(l["new_tokens"] >= 1 for l in lines)
    assert "3 prompts, batch 3" in r.stderr   # the budget holds all three: the default is min(8, prompts)


@pytest.mark.parametrize("content,needle", [
    ("", "holds no prompts"),
    ('{"text": "hi"}\n', 'needs a "prompt" string'),
    ('{"prompt": 3}\n', 'needs a "prompt" string'),
])
def test_bad_prompts_file_is_one_line(tmp_path, content, needle):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(content)
    r = generate("--prompts", prompts, "-m", 4)
    assert r.returncode == 1 and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_batch_with_a_draft_model_is_refused_in_one_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    draft = save_random_model(llama_config(49152), tmp_path / "draft")
    r = generate("--prompts", prompts, "--draft", draft, "-m", 4)
    assert r.returncode == 1 and "batches draft with ngram, head, ngram+head, none" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_batch_with_the_draft_head_equals_each_prompt_alone(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(BATCH_PROMPTS[:2]) + "\n")
    r = generate("--prompts", prompts, "--batch", 2, "--chat", "--draft", "head", "-m", 24, env=eager_head(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert sum(l["accepted_tokens"] for l in lines) > 0
    for prompt, line in zip(BATCH_PROMPTS, lines):
        alone = json.loads(generate("--prompt", prompt, "--chat", "--draft", "none", "-m", 24, "--json").stdout)
        assert line["token_ids"] == alone["token_ids"]
