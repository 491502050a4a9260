"""Measured generation memory against the plan, at contexts the run fills (--ignore-eos).

Each point runs `specmemo generate --json` in its own process, so every peak is its own; with
--chat, also a 6-turn `specmemo chat` whose --budget is `plan --context C`'s total, each message long
enough that two turns fill the context (the worst turn is reported). Plans are the host's calibrated
ones where a run like it was measured before (budget.calibration; "calibrated" in each point).
Writes bench/results/memory-<cpu class>.json (bench/result.py).
Usage: python bench/memory.py [--contexts 1000,4000] [--rounds 3] [--drafters none,ngram] [--max-new-tokens 200]
       [--dtype fp32] [--draft-dtype bf16] [--chat]   (a drafter may be a model: --drafters smollm2-135m-instruct)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def filler(tokens: int) -> str:
    """Real text of about `tokens` SmolLM2 tokens: MT-Bench questions, else the shipped prompts."""
    source = MT_BENCH if MT_BENCH.exists() else ROOT / "prompts" / "default.jsonl"
    words = " ".join(" ".join(json.loads(l)["turns"]) for l in source.open()).split()
    while len(words) < tokens:
        words = words + words
    return " ".join(words[: int(tokens / 1.35)])  # about 1.35 tokens per English word


def run(context: int, drafter: str, max_new: int, target: str, dtype: str, draft_dtype: str | None) -> dict:
    cmd = [sys.executable, "-m", "specmemo", "generate", "--target", target, "--draft", drafter,
           "--prompt", "-", "--max-new-tokens", str(max_new), "--ignore-eos", "--dtype", dtype, "--json"]
    if draft_dtype and drafter not in ("none", "ngram"):
        cmd += ["--draft-dtype", draft_dtype]
    out = subprocess.run(cmd, input=filler(context - max_new), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def chat_turns(budget: int, messages: list[str], drafter: str, max_new: int, target: str, dtype: str,
               env: dict | None = None, context: int | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "turns.jsonl"
        subprocess.run([sys.executable, "-m", "specmemo", "chat", "--target", target, "--draft", drafter,
                        "--dtype", dtype, "--temperature", "0", "--budget", str(budget),
                        "--max-new-tokens", str(max_new), "--json-log", str(log),
                        *(["--context", str(context)] if context else [])],
                       input="\n".join(messages) + "\n", capture_output=True, text=True, check=True,
                       env={**os.environ, **(env or {})})
        return [json.loads(line) for line in log.read_text().splitlines()]


def chat(context: int, drafter: str, max_new: int, target: str, dtype: str) -> dict:
    """A 6-turn chat under the budget `plan --context` gives, at (a little under) the context chat
    plans in that budget, its messages sized so that two turns fill it: each turn prefills as much as a long message does, and every other one evicts.
    Its worst turn against the chat's plan."""
    from specmemo.models.load import load_tokenizer
    from specmemo.budget import calibration
    from specmemo.models.resolve import resolve_pair

    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "specmemo", "plan", "--target", target, "--draft", drafter, "--context", str(context),
         "--dtype", dtype, "--json"], capture_output=True, text=True, check=True).stdout)
    budget = plan["total_bytes"]
    # The context chat plans in this budget, from a one-turn chat against a copy of the calibration
    # (its record would move the plan this chat is measured against).
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "calibration.json"
        if calibration.path() and calibration.path().exists():
            shutil.copy(calibration.path(), probe)
        limit = chat_turns(budget, ["Hello!"], drafter, 4, target, dtype, {"SPECMEMO_CALIBRATION": str(probe)}
                           )[0]["context_limit"]
    # The chat then holds a little less than the probe (it measures its own process before loading,
    # which may hold a little more), so that it always fits the budget; two turns of template (~24
    # tokens), message and reply fill it.
    limit -= max(16, limit // 50)
    share = limit // 2 - max_new - 24 - 8
    tokenizer = load_tokenizer(resolve_pair(target, drafter)[0])
    message = tokenizer.decode(tokenizer.encode(filler(2 * share), add_special_tokens=False)[:share]).replace("\n", " ")
    turns = chat_turns(budget, [message + " Summarize this."] * 6, drafter, max_new, target, dtype,
                       context=limit)
    worst = max(turns, key=lambda t: t["generation_peak_bytes"])
    return {"context": worst["context_limit"], "filled": max(t["context_tokens"] for t in turns),
            "dtype": dtype, "drafter": drafter, "turns": len(turns),
            "over_budget_turns": sum(t["over_budget"] for t in turns), "calibrated": plan["calibrated"],
            "generation_peak_bytes": worst["generation_peak_bytes"],
            "predicted_generation_bytes": worst["predicted_generation_bytes"],
            "process_peak_bytes": max(t["peak_bytes"] for t in turns), "plan_total_bytes": worst["plan_total_bytes"],
            "budget_bytes": budget}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1000,4000")
    ap.add_argument("--drafters", default="none,ngram")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--draft-dtype", default=None)
    ap.add_argument("--chat", action="store_true", help="also a budgeted 6-turn chat at each context")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every point this many times: the first round of a fresh calibration file "
                         "(SPECMEMO_CALIBRATION) plans with the profile's reserves, later ones with what it recorded; "
                         "figures are the last round's, points every round's")
    args = ap.parse_args()
    print("| round | run | context | drafter | calibrated | measured MiB | plan MiB | measured/plan | process peak MiB | plan total MiB |")
    print("|---:|---|---:|---|---|---:|---:|---:|---:|---:|")
    from bench.result import figure, save

    worst_ok, figures, points = True, [], []
    for round_, context, drafter in [(i, c, d) for i in range(1, args.rounds + 1)
                                     for c in map(int, args.contexts.split(",")) for d in args.drafters.split(",")]:
        runs = [("generate", run(context, drafter, args.max_new_tokens, args.target, args.dtype, args.draft_dtype))]
        if args.chat:
            runs.append(("chat", chat(context, drafter, args.max_new_tokens, args.target, args.dtype)))
        for kind, r in runs:
            ratio = r["generation_peak_bytes"] / r["predicted_generation_bytes"]
            whole = r["process_peak_bytes"] / r["plan_total_bytes"]
            worst_ok &= ratio <= 1.0 and r["process_peak_bytes"] <= r["plan_total_bytes"]
            worst_ok &= not r.get("over_budget_turns")
            label = (f"{args.target} {r['dtype']}, {drafter}, {kind}, context {r['context']}"
                     f"{', calibrated plan' if r.get('calibrated') else ', first run: profile reserves'}")
            if round_ == args.rounds:
                figures += [figure(f"generation peak / plan: {label}", round(ratio, 3)),
                            figure(f"process peak / plan total: {label}", round(whole, 3))]
            points.append({"round": round_, "run": kind, **{k: r.get(k) for k in (
                "context", "filled", "dtype", "drafter", "calibrated", "turns", "over_budget_turns", "generation_peak_bytes",
                "predicted_generation_bytes", "process_peak_bytes", "plan_total_bytes")}})
            print(f"| {round_} | {kind} | {r['context']}{' (filled ' + str(r['filled']) + ')' if 'filled' in r else ''} | {drafter} | {r.get('calibrated')} | "
                  f"{r['generation_peak_bytes'] / 2**20:.1f} | {r['predicted_generation_bytes'] / 2**20:.1f} | "
                  f"{ratio:.3f} | {r['process_peak_bytes'] / 2**20:.0f} | {r['plan_total_bytes'] / 2**20:.0f} |",
                  flush=True)
    save("memory", figures, {"points": points})
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
