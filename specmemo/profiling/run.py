"""`specmemo profile`: run each engine in its own process on the same prompts, then report."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specmemo.atomic import atomic_write_text
from specmemo.errors import BadInput
from specmemo.profiling.engines import ENGINES
from specmemo.profiling.prompts import load_prompts
from specmemo.profiling.report import progress_console


def planned_context(tokenizer, conversations, turns: int, max_new: int, limit: int) -> int:
    """Enough context for the longest conversation: its user turns, template, and every reply."""
    from specmemo.models.text import encode_messages

    longest = 0
    for conv in conversations:
        msgs = []
        for text in conv.turns[:turns]:
            msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        longest = max(longest, len(encode_messages(tokenizer, msgs)) + turns * (max_new + 8))
    return min(limit, longest)


def run_worker(cfg: dict, workdir: Path, progress: Progress, task, module: str = "specmemo.profiling.worker",
               name: str | None = None) -> dict:
    """Run one engine in its own process (`python -m module CONFIG RESULT`), advancing the progress
    bar on each "progress" line it prints; its result, or one line naming what failed."""
    name = name or cfg["engine"]
    config = workdir / f"{name}.config.json"
    result = workdir / f"{name}.result.json"
    config.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", module, str(config), str(result)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("progress"):
            progress.advance(task)
    err = proc.stderr.read()
    if proc.wait() != 0:
        last = [l for l in err.strip().splitlines() if l.strip()][-1:] or ["no output"]
        raise RuntimeError(f"engine {name} failed: {last[0]}")
    return json.loads(result.read_text())


def measured_cost_curve(ref, dtype: str) -> list[float]:
    """The target's verification cost curve on this machine, with a progress bar."""
    from specmemo.profiling.cost_curve import cost_curve, forward_times

    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  **progress_console()) as bar:
        task = bar.add_task("cost curve", total=None)
        return cost_curve(forward_times(ref, dtype, 16, progress=lambda done, total: bar.update(task, completed=done,
                                                                                                  total=total)))


def profile(target: str, draft: str, out: Path, *, prompts: str | None = None, turns: int = 2, limit: int | None = None,
            max_new_tokens: int = 128, budget: int | None = None, engines: list[str] | None = None,
            dtype: str = "fp32", kv_dtype: str | None = None, draft_dtype: str | None = None,
            save_profile: bool = False) -> dict:
    from specmemo.models.load import load_tokenizer
    from specmemo.models.resolve import resolve_pair
    from specmemo.profiling.machine import machine_facts
    from specmemo.profiling.report import build_report, save_pair_profile, write_outputs

    if turns not in (1, 2):
        raise BadInput("--turns must be 1 or 2")
    t_ref, d_ref, drafter = resolve_pair(target, draft)
    if drafter == "none":
        raise BadInput("--draft must be a draft model or ngram; specmemo-ar already runs without a draft")
    engines = engines or ["specmemo", "specmemo-ar", "hf-ar", "hf-lookup"] + (["hf-assisted"] if d_ref else [])
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise BadInput(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if "llama.cpp" in engines:
        if not t_ref.gguf_file:
            raise BadInput(f"the llama.cpp engine runs a GGUF file; {target} is not one")
        import importlib.util

        from specmemo.profiling.engines import LLAMA_CPP_MISSING

        if importlib.util.find_spec("llama_cpp") is None:
            raise BadInput(LLAMA_CPP_MISSING)
    if "hf-assisted" in engines and d_ref is None:
        raise BadInput("hf-assisted needs a draft model, not ngram")
    if "hf-ar" not in engines:
        engines = ["hf-ar", *engines]  # every report compares outputs against it
    conversations = load_prompts(prompts, limit)
    tokenizer = load_tokenizer(t_ref)
    context = planned_context(tokenizer, conversations, turns, max_new_tokens, t_ref.arch.max_position)
    base = {"target": target, "draft": draft, "draft_dtype": draft_dtype, "dtype": dtype, "kv_dtype": kv_dtype,
            "turns": turns,
            "max_new_tokens": max_new_tokens, "budget": budget, "context": context,
            "conversations": [c.__dict__ for c in conversations]}
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    per_engine = sum(min(turns, len(c.turns)) for c in conversations)
    with tempfile.TemporaryDirectory() as tmp, Progress(
        TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), **progress_console()
    ) as progress:
        for name in engines:
            task = progress.add_task(name, total=per_engine)
            runs[name] = run_worker({**base, "engine": name}, Path(tmp), progress, task)
    facts = machine_facts()
    report = build_report(facts, base, runs, tokenizer)
    write_outputs(report, runs, out)
    if save_profile:
        curve = measured_cost_curve(t_ref, dtype)
        report["cost_curve"] = curve
        report["saved_profile"] = str(save_pair_profile(t_ref.name, d_ref.name if d_ref else drafter, runs, dtype,
                                                        curve, facts.get("cpu", "")))
        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")   # with the curve saved
    return report
