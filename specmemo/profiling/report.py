"""The one report builder of `specmemo profile`: engines' results into report.json, report.md and
plots, outputs compared with a reference run. The single-sequence profile (conversations against
hf-ar) is built here; the batch profile (profiling/batch.py: each batch size against batch 1)
builds its rows and renders through the same pieces: first_difference, top2_margin,
machine_line, write_report.

Where an engine's greedy output differs from its reference, the report names where, and the
target's top-2 logit margin there. Only a margin below 1e-4 is numerics (two near-tied logits
flipped by summation order); anything else is a bug.
"""

import json
from pathlib import Path

from specmemo.atomic import atomic_write_text
from specmemo.budget.speedup import pair_file

NUMERICS_MARGIN = 1e-4
STAND_IN_NOTE = ("The draft model is a stand-in: the target's own weights loaded in {dtype}. "
                 "Its acceptance is higher than a real small draft's would be.")



def first_difference(mine: list[int], theirs: list[int]) -> int:
    """The first position where two token lists differ (the shorter's length if one extends the other)."""
    return next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))


def top2_margin(logits) -> dict:
    """The target's top-2 logit margin at a divergence ([V] logits), and whether it is numerics."""
    import torch

    top = torch.topk(logits.float(), 2).values
    margin = float(top[0] - top[1])
    return {"top2_margin": margin, "numerics": margin < NUMERICS_MARGIN}


def machine_line(m: dict) -> str:
    """The host as every report names it."""
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.1f} GiB"
            f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, transformers {m['transformers']}; "
            f"measured read bandwidth {m['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.")


def write_report(out: Path, report: dict, markdown_of, plots: list[str], extra: dict[str, str] | None = None) -> None:
    """report.json, report.md (markdown_of(report, plots)) and any extra files, each written atomically."""
    report["plots"] = [Path(p).name for p in plots]
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown_of(report, plots))
    for name, text in (extra or {}).items():
        atomic_write_text(out / name, text)


def progress_console() -> dict:
    """Where a profile's progress bars go: stderr (stdout carries the report), on a terminal only
    (elsewhere rich leaves blank lines)."""
    from rich.console import Console

    console = Console(stderr=True)
    return {"console": console, "disable": not console.is_terminal}


def first_acceptance(histogram: dict) -> float | None:
    """Of the steps that drafted, the share whose first draft token was accepted (greedy: the
    draft's top-1 agreed with the target's)."""
    steps = sum(histogram.values())
    return 1 - histogram.get("0", histogram.get(0, 0)) / steps if steps else None


def first_divergences(runs: dict) -> dict[str, list[dict]]:
    """For each engine, the first differing position of each (conversation, turn) against hf-ar."""
    ref = {o["question_id"]: o["turns"] for o in runs["hf-ar"]["outputs"]}
    out = {}
    for name, run in runs.items():
        diffs = []
        for o in run["outputs"]:
            for turn, (mine, theirs) in enumerate(zip(o["turns"], ref[o["question_id"]])):
                if mine != theirs:
                    diffs.append({"conversation": o["question_id"], "turn": turn + 1,
                                  "position": first_difference(mine, theirs)})
                    break  # later turns see different histories; the first divergence is what matters
        out[name] = diffs
    return out


def identical_turns(runs: dict, name: str, reference: str = "hf-ar") -> tuple[int, int]:
    """(turns, turns whose tokens equal the reference engine's) for one engine."""
    ref = {o["question_id"]: o["turns"] for o in runs[reference]["outputs"]}
    pairs = [(mine, theirs) for o in runs[name]["outputs"] for mine, theirs in zip(o["turns"], ref[o["question_id"]])]
    return len(pairs), sum(mine == theirs for mine, theirs in pairs)


HF_AR_NOTE = ("hf-ar calls `generate` on the whole conversation every turn, as most code does, so turn 2 "
              "prefills turn 1 again; hf-ar-cached passes the previous turn's `past_key_values`, so turn 2 "
              "prefills only its new tokens, as specmemo does. Every engine's time covers prefill and decoding.")


def add_margins(base: dict, runs: dict, divergences: dict[str, list[dict]], tokenizer) -> None:
    """The target's top-2 logit margin at each divergence, on hf-ar's own token history."""
    if not any(divergences.values()):
        return
    import torch

    from specmemo.models.load import load_model
    from specmemo.models.resolve import resolve
    from specmemo.profiling.worker import conversation_ids

    from specmemo.profiling.worker import baseline_dtype

    model = load_model(resolve(base["target"]), baseline_dtype(base["dtype"]), with_tokenizer=False,
                       forward="transformers").model
    convs = {c["question_id"]: c for c in base["conversations"]}
    ref = {o["question_id"]: o["turns"] for o in runs["hf-ar"]["outputs"]}
    for diffs in divergences.values():
        for d in diffs:
            outs = ref[d["conversation"]]
            ids = conversation_ids(tokenizer, convs[d["conversation"]]["turns"], outs, d["turn"] - 1)
            ids = ids + outs[d["turn"] - 1][: d["position"]]
            with torch.inference_mode():
                d.update(top2_margin(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]))


def build_report(facts: dict, base: dict, runs: dict, tokenizer) -> dict:
    from specmemo.budget.footprint import compute_dtype

    divergences = first_divergences(runs)
    add_margins(base, runs, divergences, tokenizer)
    hf = runs["hf-ar"]
    bandwidth = facts["read_bandwidth_bytes_per_s"]
    rows = []
    for name, r in runs.items():
        turns, same = identical_turns(runs, name)
        rows.append({
            "turns": turns,
            "turns_identical_to_hf_ar": same,
            # The exactness check that holds in every dtype: speculation equals plain decoding.
            "turns_identical_to_specmemo_ar": identical_turns(runs, name, "specmemo-ar")[1]
            if name == "specmemo" and "specmemo-ar" in runs else None,
            "engine": name,
            "forward": r.get("forward", "transformers"),
            "attention": r.get("attention"),
            "tokens_per_s": r["tokens_per_s"],
            "speedup_vs_hf_ar": r["tokens_per_s"] / hf["tokens_per_s"] if hf["tokens_per_s"] else None,
            "new_tokens": r["new_tokens"],
            "generation_peak_bytes": r["generation_peak_bytes"],
            "predicted_generation_bytes": r["predicted_generation_bytes"],
            "weights_bytes": r["weights_bytes"],
            "load_peak_bytes": r["load_peak_bytes"],
            "acceptance_rate": r["acceptance_rate"],
            "first_acceptance": first_acceptance(r["accepted_histogram"]),
            "mean_accepted_per_step": r["mean_accepted_per_step"],
            # Fraction of the memory-bandwidth bound: every generated token reads every weight once
            # in plain decoding, so tokens/s × weight bytes / bandwidth is 1.0 at the bound.
            "bandwidth_fraction": r["tokens_per_s"] * r["weights_bytes"] / bandwidth,
            "outputs_sha256": r["outputs_sha256"],
            "identical_to_hf_ar": not divergences[name],
            "divergences": divergences[name],
            "accepted_histogram": r["accepted_histogram"],
        })
    notes = []
    if "hf-ar-cached" in runs:
        notes.append(HF_AR_NOTE)
    if base.get("draft_dtype") and base["draft"] == base["target"]:
        notes.append(STAND_IN_NOTE.format(dtype=base["draft_dtype"]))
    from specmemo.profiling.worker import baseline_dtype

    if baseline_dtype(base["dtype"]) != base["dtype"]:
        notes.append(f"specmemo runs {base['dtype']} weights; the transformers baselines run "
                     f"{baseline_dtype(base['dtype'])} (they cannot run packed weights), so their text may differ.")
    if "llama.cpp" in runs:
        notes.append("llama.cpp runs the same GGUF with its own kernels and numerics: its greedy text is "
                     "not expected to be identical; the identical-turns column measures agreement.")
    return {
        "machine": facts,
        "target": base["target"],
        "draft": base["draft"],
        "dtype": base["dtype"],
        "kv_dtype": base.get("kv_dtype") or compute_dtype(base["dtype"]),
        "draft_dtype": base.get("draft_dtype"),
        "prompts": {"count": len(base["conversations"]), "turns": base["turns"],
                    "max_new_tokens": base["max_new_tokens"], "context": base["context"]},
        "runs": rows,
        "notes": notes,
    }


def _mib(n):
    return "" if n is None else f"{n / 2**20:.1f}"


def markdown(report: dict, plots: list[str]) -> str:
    m = report["machine"]
    p = report["prompts"]
    lines = [
        f"# specmemo profile: {report['target']} + {report['draft']}",
        "",
        f"{p['count']} conversations × {p['turns']} turns, {p['max_new_tokens']} new tokens per turn, greedy, "
        f"{report['dtype']} (KV {report.get('kv_dtype', report['dtype'])}). {machine_line(m)}",
        "",
        "| engine | forward | tok/s | × hf-ar | × hf-ar-cached | of bandwidth bound | generation peak MiB | plan MiB | acceptance | first-token acceptance | accepted/step | turns identical to hf-ar |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    cached = next((r["tokens_per_s"] for r in report["runs"] if r["engine"] == "hf-ar-cached"), None)
    for r in report["runs"]:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        mean = "" if r["mean_accepted_per_step"] is None else f"{r['mean_accepted_per_step']:.2f}"
        first = "" if r.get("first_acceptance") is None else f"{r['first_acceptance']:.2f}"
        ident = f"{r['turns_identical_to_hf_ar']}/{r['turns']}"
        if r.get("turns_identical_to_specmemo_ar") is not None:
            ident += f" (specmemo-ar: {r['turns_identical_to_specmemo_ar']}/{r['turns']})"
        vs_cached = f"{r['tokens_per_s'] / cached:.2f}" if cached else ""
        lines.append(f"| {r['engine']} | {r['forward']} | {r['tokens_per_s']:.2f} | {r['speedup_vs_hf_ar']:.2f} | {vs_cached} | "
                     f"{r['bandwidth_fraction']:.0%} | {_mib(r['generation_peak_bytes'])} | "
                     f"{_mib(r['predicted_generation_bytes'])} | {acc} | {first} | {mean} | {ident} |")
    from specmemo.profiling.worker import baseline_dtype

    diverged = [(r["engine"], d) for r in report["runs"] for d in r["divergences"]]
    if diverged:
        lines += ["", "## Divergences from hf-ar", "",
                  "| engine | conversation | turn | position | top-2 margin | verdict |", "|---|---|---:|---:|---:|---|"]
        for name, d in diverged:
            margin = d.get("top2_margin")
            verdict = ("numerics (< 1e-4)" if d.get("numerics") else
                       "expected: another engine's numerics" if name == "llama.cpp" else
                       f"expected: {report['dtype']} weights vs hf-ar's {baseline_dtype(report['dtype'])}"
                       if baseline_dtype(report["dtype"]) != report["dtype"] else
                       f"expected: KV in {report['kv_dtype']}" if report.get("kv_dtype", report["dtype"]) != report["dtype"]
                       else "BUG: margin too large for numerics")
            lines.append(f"| {name} | {d['conversation']} | {d['turn']} | {d['position']} | "
                         f"{margin:.2e} | {verdict} |")
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, runs: dict, out: Path) -> None:
    from specmemo.profiling.plots import make_plots

    write_report(out, report, markdown, make_plots(report, runs, out))


MIN_RANK_VISITS = 30


def save_pair_profile(target: str, draft: str, runs: dict, dtype: str | None = None,
                      curve: list[float] | None = None, host: str = "") -> Path:
    """Measured α (per drafted token), c (draft cost per token / target cost per step) and, when
    given, the target's verification cost curve for `dtype` on `host`."""
    spec, ar = runs.get("specmemo"), runs.get("specmemo-ar")
    if not spec or not ar or not spec["drafted_tokens"]:
        raise ValueError("--save-profile needs the specmemo and specmemo-ar engines, with drafting")
    alpha = spec["accepted_tokens"] / spec["drafted_tokens"]
    target_step = ar["seconds"] / ar["new_tokens"]
    c = (spec["draft_seconds"] / spec["drafted_tokens"]) / target_step
    lookup = spec.get("lookup") or [0, 0, 0, 0.0]
    if lookup[0] and spec["drafted_tokens"] > lookup[1]:
        # ngram+head: c is the head's own (its seconds per token it drafted); the lookup's part apart.
        c = ((spec["draft_seconds"] - lookup[3]) / (spec["drafted_tokens"] - lookup[1])) / target_step
    path = pair_file(target, draft)
    text = f"# Measured by specmemo profile on {len(spec['outputs'])} conversations.\nalpha = {alpha:.4f}\nc = {c:.4f}\n"
    if lookup[0] and lookup[1]:
        text += (f"# Lookup chains (ngram+head): {lookup[0]} of {spec['steps']} steps; c above is the head's alone.\n"
                 f"lookup_share = {lookup[0] / spec['steps']:.4f}\nlookup_alpha = {lookup[2] / lookup[1]:.4f}\n")
    drafting = sum((spec.get("accepted_histogram") or {}).values())   # steps that drafted
    if spec.get("steps") and drafting:
        text += f"drafted_share = {drafting / spec['steps']:.4f}  # of {spec['steps']} steps, {drafting} drafted\n"
    # Only the ranks nodes offered often enough were measured (a chain offers rank 1 alone): a rank
    # saved from a handful of offers (0 of 3, say) would keep the engine's trees from ever offering
    # it again, and so from measuring it; the later ranks come from the head's card.
    ranks = []
    for h, v in zip(spec.get("rank_hits") or [], spec.get("rank_visits") or []):
        if v < MIN_RANK_VISITS:
            break
        ranks.append(round(h / v, 4))
    if ranks:
        text += ("# Candidate trees: how often the target's token was a node's r-th candidate, where offered.\n"
                 f"ranks = {json.dumps(ranks)}\n")
    if spec.get("tokens_per_s") and ar.get("tokens_per_s"):
        text += f"speedup = {spec['tokens_per_s'] / ar['tokens_per_s']:.4f}  # specmemo / specmemo-ar, measured\n"
    if curve:
        text += (f"# The target's forward over n = 1..{len(curve)} tokens in one-token forwards ({dtype}).\n"
                 f"host = {json.dumps(host)}\ncost_curve_{dtype} = {json.dumps(curve)}\n")
    atomic_write_text(path, text)
    return path
