"""How the plan counts the whole process and what the engine can run: the process baseline, kernel
scratch, runnable plans, the CUDA allocator cap, KV stores that hold exactly the plan; the slow ones
measure the real default model against its plan."""

import json
import random
import subprocess
import sys

import pytest
import torch

from specmemo.host import nvml_index
from specmemo.errors import BadInput
from specmemo.pipeline import cuda_cap_fraction
from tests.tiny import VOCAB, make_engine, run, tiny

TARGET = tiny(0, scale=8.0)
SPECMEMO = [sys.executable, "-m", "specmemo"]


def repetitive(n, seed=0):
    rng = random.Random(seed)
    base = [rng.randrange(VOCAB) for _ in range(7)]
    return (base * (n // 7 + 1))[:n]


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


def test_the_target_store_holds_exactly_the_context_and_candidates_stay_inside_it():
    engine = make_engine(TARGET(), "ngram", context=60, k=8)
    assert engine.store.capacity == 60
    out, stats = run(engine, repetitive(30), 100)  # the ngram drafter proposes right to the end
    assert len(out) == 30 and stats.stop_reason == "context_full" and stats.drafted_tokens > 0
    with pytest.raises(BadInput, match="leaves no room"):
        run(make_engine(TARGET(), "none", context=30), repetitive(30), 5)


def test_a_bf16_kv_store_under_an_fp32_model_halves_kv_and_speculation_stays_exact():
    plain = make_engine(TARGET(), "none", kv_dtype=torch.bfloat16)
    assert plain.store.keys.dtype == torch.bfloat16
    assert plain.store.nbytes * 2 == make_engine(TARGET(), "none").store.nbytes
    out, _ = run(plain, repetitive(40), 30)
    assert out == run(make_engine(TARGET(), "ngram", kv_dtype=torch.bfloat16), repetitive(40), 30)[0]


@pytest.mark.slow
def test_bf16_generation_stays_within_its_plan():
    r = subprocess.run([*SPECMEMO, "generate", "--chat", "-p", "Name three colors.", "-m", "32", "--ignore-eos",
                        "--dtype", "bf16", "--json"], capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout)
    assert out["generation_peak_bytes"] <= out["predicted_generation_bytes"]
    assert out["process_peak_bytes"] <= out["plan_total_bytes"]
