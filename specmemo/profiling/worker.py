"""One engine of a profile, in its own process so that its peak memory is its own.

    python -m specmemo.profiling.worker CONFIG.json RESULT.json

Prints "progress" lines on stdout as turns finish; writes RESULT.json at the end.
"""

import hashlib
import json
import sys
import time
from dataclasses import dataclass

from specmemo.atomic import atomic_write_text
from specmemo.decoding.events import GenerationStats
from specmemo.memory.malloc import tame_glibc_malloc
from specmemo.memory.measure import PeakMeter
from specmemo.models.text import decode_reply, encode_messages, encode_prompt, turn_delta
from specmemo.profiling.timeline import RssTimeline


def conversation_ids(tokenizer, turns_text, outputs, turn):
    """The token sequence an engine sees at `turn`: its own earlier outputs kept as generated."""
    ids = encode_prompt(tokenizer, turns_text[0], chat=True)
    messages = [{"role": "user", "content": turns_text[0]}]
    for t in range(1, turn + 1):
        held = ids + outputs[t - 1]
        reply = decode_reply(tokenizer, outputs[t - 1])
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": turns_text[t]}]
        delta = turn_delta(tokenizer, held, messages)
        if delta is None:  # the template does not extend what was held: render it whole
            ids = encode_messages(tokenizer, messages)
        else:
            ids = held + delta
    return ids


@dataclass
class Built:
    engine: object
    tokenizer: object
    stops: set[int]
    predicted_bytes: int | None    # the plan's generation memory (specmemo engines only)
    weights_bytes: int
    load_peak_bytes: int
    plan_total_bytes: int | None
    forward: str = "transformers"   # which forward pass ran: specmemo's own decoder or transformers
    attention: str | None = None    # specmemo engines in half precision: "native" or "torch" (LoadedModel.attention)
    products: str | None = None     # specmemo engines: "compiled" or "torch" (LoadedModel.products)


def build_engine(cfg) -> Built:
    from specmemo.decoding.sampling import SamplingConfig
    from specmemo.models.load import load_model, weights_nbytes
    from specmemo.models.resolve import resolve
    from specmemo.models.text import stop_ids
    from specmemo.pipeline import RunRequest, open_pipeline
    from specmemo.profiling.engines import HFEngine, SpecmemoEngine

    name = cfg["engine"]
    meter = PeakMeter("cpu")
    meter.start()
    if name in ("specmemo", "specmemo-ar"):
        draft = cfg["draft"] if name == "specmemo" else "none"
        rt = open_pipeline(RunRequest(cfg["target"], draft, budget=cfg.get("budget"), context=cfg["context"],
                                      dtype=cfg["dtype"], kv_dtype=cfg.get("kv_dtype"), draft_dtype=cfg.get("draft_dtype"),
                                      sampling=SamplingConfig()))
        weights = weights_nbytes(rt.target.model) + (weights_nbytes(rt.draft.model) if rt.draft else 0)
        return Built(SpecmemoEngine(rt), rt.tokenizer, stop_ids(rt.tokenizer, rt.target.model),
                     rt.report.plan.generation_bytes, weights, meter.above_baseline(), rt.report.plan.total_bytes,
                     rt.target.forward_path, rt.target.attention, rt.target.products)
    if name == "llama.cpp":
        return _llama_cpp(cfg, meter)
    # transformers runs dense weights only: with quantized specmemo weights, its baselines run fp32.
    dtype = baseline_dtype(cfg["dtype"])
    target = load_model(resolve(cfg["target"]), dtype, forward="transformers")
    assistant = None
    if name == "hf-assisted":
        assistant = load_model(resolve(cfg["draft"]), baseline_dtype(cfg.get("draft_dtype") or cfg["dtype"]),
                               with_tokenizer=False,
                               forward="transformers").model
    weights = weights_nbytes(target.model) + (weights_nbytes(assistant) if assistant is not None else 0)
    return Built(HFEngine(target.model, name, assistant), target.tokenizer, stop_ids(target.tokenizer, target.model),
                 None, weights, meter.above_baseline(), None)


def baseline_dtype(dtype: str) -> str:
    """The dtype a transformers baseline runs for a specmemo dtype: itself, or fp32 for q4/q8."""
    from specmemo.budget.footprint import is_quantized

    return "fp32" if is_quantized(dtype) else dtype


def _llama_cpp(cfg, meter) -> Built:
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from specmemo.models.gguf_file import open_gguf
    from specmemo.models.load import dense_location, load_tokenizer
    from specmemo.models.resolve import resolve
    from specmemo.models.text import stop_ids
    from specmemo.profiling.engines import LlamaCppEngine

    ref = resolve(cfg["target"])
    path = Path(ref.location) / ref.gguf_file
    tokenizer = load_tokenizer(ref)
    # The same end-of-turn tokens as the other engines: the tokenizer's and the generation config's.
    gen = Path(dense_location(ref, False)) / "generation_config.json"
    config = SimpleNamespace(generation_config=SimpleNamespace(**json.loads(gen.read_text()) if gen.is_file() else {}))
    engine = LlamaCppEngine(str(path), cfg["context"], len(os.sched_getaffinity(0)))
    weights = sum(t.row_bytes * t.rows for t in open_gguf(path).tensors.values())
    return Built(engine, tokenizer, stop_ids(tokenizer, config), None, weights, meter.above_baseline(), None,
                 "llama.cpp")


def main(config_path: str, result_path: str) -> None:
    tame_glibc_malloc()
    cfg = json.loads(open(config_path).read())
    process = PeakMeter("cpu")
    process.start()
    built = build_engine(cfg)
    engine, tok, stops = built.engine, built.tokenizer, built.stops
    process_peak = process.peak()  # loading's peak, before the per-turn windows reset it
    turn_meter = PeakMeter("cpu")
    turn_meter.start()  # generation memory is measured from here: just before the first prefill
    baseline = turn_meter.baseline
    peak = 0
    outputs, turn_rows = [], []
    timeline = None
    for ci, conv in enumerate(cfg["conversations"]):
        engine.new_conversation()
        outs = []
        for turn in range(min(cfg["turns"], len(conv["turns"]))):
            ids = conversation_ids(tok, conv["turns"], outs, turn)
            if ci == 0 and turn == 0:
                timeline = RssTimeline().__enter__()
            # The peak window covers the generate call only, not tokenizing the next turn.
            turn_meter.reset()
            r = engine.generate(ids, cfg["max_new_tokens"], stops)
            peak = max(peak, turn_meter.above_baseline())
            process_peak = max(process_peak, turn_meter.peak())
            outs.append(r.tokens)
            s = r.stats or GenerationStats()
            turn_rows.append({"conversation": conv["question_id"], "turn": turn + 1, "prompt_tokens": len(ids),
                              "new_tokens": len(r.tokens), "seconds": r.seconds, "drafted": s.drafted_tokens,
                              "accepted": s.accepted_tokens, "steps": s.steps, "draft_seconds": s.draft_seconds,
                              "histogram": dict(s.accepted_histogram), "rank_hits": list(s.rank_hits) if r.stats else [],
                              "rank_visits": list(s.rank_visits) if r.stats else [],
                              "lookup": list(s.lookup) if r.stats else []})
            print("progress", flush=True)
        if ci == 0 and timeline:
            timeline.__exit__(None, None, None)
        outputs.append({"question_id": conv["question_id"], "turns": outs})
    new_tokens = sum(t["new_tokens"] for t in turn_rows)
    seconds = sum(t["seconds"] for t in turn_rows)
    drafted = sum(t["drafted"] for t in turn_rows)
    accepted = sum(t["accepted"] for t in turn_rows)
    steps = sum(t["steps"] for t in turn_rows)
    histogram = {}
    for t in turn_rows:
        for k, v in t["histogram"].items():
            histogram[str(k)] = histogram.get(str(k), 0) + v
    result = {
        "engine": cfg["engine"],
        "forward": built.forward,
        "attention": built.attention,
        "products": built.products,
        "tokens_per_s": new_tokens / seconds if seconds else 0.0,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "generation_peak_bytes": peak,
        "predicted_generation_bytes": built.predicted_bytes,
        "plan_total_bytes": built.plan_total_bytes,
        "weights_bytes": built.weights_bytes,
        "load_peak_bytes": built.load_peak_bytes,
        "process_peak_bytes": process_peak,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_per_step": accepted / steps if steps else None,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "steps": steps,
        "draft_seconds": sum(t["draft_seconds"] for t in turn_rows),
        "accepted_histogram": histogram,
        "rank_hits": [sum(col) for col in zip(*[t["rank_hits"] for t in turn_rows if t["rank_hits"]])],
        "rank_visits": [sum(col) for col in zip(*[t["rank_visits"] for t in turn_rows if t["rank_visits"]])],
        "lookup": [sum(col) for col in zip(*[t["lookup"] for t in turn_rows if t["lookup"]])],
        "outputs_sha256": hashlib.sha256(json.dumps(outputs).encode()).hexdigest(),
        "outputs": outputs,
        "turns": turn_rows,
        "timeline": [(round(t, 3), b - baseline) for t, b in (timeline.samples if timeline else [])],
        "finished_at": time.time(),
    }
    atomic_write_text(result_path, json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
