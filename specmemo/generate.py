"""One-shot generation: the library side of `specmemo generate` (chat/ is its multi-turn sibling)."""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from specmemo.decoding.events import Finished, GenerationStats, Step
from specmemo.errors import BadInput
from specmemo.models.load import load_tokenizer, weights_nbytes
from specmemo.models.resolve import resolve_pair
from specmemo.models.text import StreamDecoder, clean_text, decode_reply, encode_prompt, stop_ids
from specmemo.pipeline import RunRequest, open_pipeline


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats        # tokens, acceptance, speeds (decoding only; the prefill apart), stop reason
    generation_peak_bytes: int    # what generation added, against predicted_generation_bytes
    process_peak_bytes: int       # the whole process, loading included: what the budget bounds
    predicted_generation_bytes: int
    weights_bytes: int
    load_peak_bytes: int          # what loading added at its peak
    plan_total_bytes: int
    budget_bytes: int
    prompt_tokens: int
    context: int
    draft_len: int
    draft_window: int
    dtype: str
    kv_dtype: str
    forward: str
    attention: str | None         # "native" / "torch": how half precision attends exactly (None: fp32)
    products: str | None          # "compiled" / "torch": which kernels multiply the matrices (None: transformers)
    drafter: str                  # what drafted: model, head, ngram or none (--draft auto picks one)
    calibrated: bool = False      # the plan reserved what this host measured (budget.calibration), not the profile's

    def to_json(self) -> dict:
        own = {k: v for k, v in self.__dict__.items() if k != "stats"}
        return {**own, **self.stats.to_json(), "seconds": self.stats.seconds}


def check_context(context: int | None, limit: int) -> None:
    if context is not None and not 1 <= context <= limit:
        raise BadInput(f"--context must be between 1 and the model's maximum of {limit} tokens, got {context}")


def generate(run: RunRequest, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
             ignore_eos: bool = False, on_text: Callable[[str], None] | None = None) -> GenerateResult:
    """One prompt through the single-sequence engine; run.context None plans exactly what this run
    fills (the prompt plus max_new_tokens). on_text(delta) streams the reply."""
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    prompt = clean_text(prompt)
    if not prompt.strip():
        raise BadInput("the prompt is empty")
    refs = resolve_pair(run.target, run.draft)
    limit, context = refs[0].arch.max_position, run.context
    check_context(context, limit)
    tokenizer = load_tokenizer(refs[0], run.trust_remote_code)
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    room = (context or limit) - len(prompt_ids)
    if room < 1:
        raise BadInput(f"prompt of {len(prompt_ids)} tokens is longer than the context of {context or limit} tokens "
                       f"(it needs at least {len(prompt_ids) + 1})")
    # The planned context is exactly what this run can fill: the prompt plus the new tokens.
    planned = context or min(limit, len(prompt_ids) + max_new_tokens)
    rt = open_pipeline(run.with_(context=planned, batch=None), refs=refs, tokenizer=tokenizer)
    stops = set() if ignore_eos else stop_ids(rt.tokenizer, rt.target.model)
    new: list[int] = []
    stream = StreamDecoder(tokenizer)
    stats = GenerationStats()
    for event in rt.engine.generate(prompt_ids, max_new_tokens, stops):
        if isinstance(event, Step):
            new.extend(event.tokens)
            if on_text:
                on_text(stream.push(event.tokens))
        elif isinstance(event, Finished):
            stats = event.stats
    rt.calibrate()
    plan = rt.report.plan
    weights = weights_nbytes(rt.target.model) + (weights_nbytes(rt.draft.model) if rt.draft else 0)
    return GenerateResult(
        text=decode_reply(tokenizer, new), token_ids=new, stats=stats, generation_peak_bytes=rt.meter.above_baseline(),
        process_peak_bytes=rt.process_peak_bytes(), predicted_generation_bytes=plan.generation_bytes,
        weights_bytes=weights, load_peak_bytes=rt.load_peak_bytes, plan_total_bytes=plan.total_bytes,
        budget_bytes=rt.report.budget_bytes, prompt_tokens=len(prompt_ids), context=plan.request.context,
        draft_len=plan.request.draft_len, draft_window=plan.request.draft_window, dtype=plan.request.dtype,
        kv_dtype=plan.request.kv, forward=rt.target.forward_path, attention=rt.target.attention,
        products=rt.target.products, drafter=rt.report.drafter, calibrated=plan.calibrated,
    )


# -- many prompts at once: the batch engine (decoding/batch.py) ---------------------------------

BATCH_CAP = 8   # --batch's default ceiling: past 8 rows a 2-core CPU gains little per row (see README)


def read_prompts(path: str) -> list[str]:
    """One prompt per line; or JSONL with a "prompt" field (or MT-Bench's "turns", whose first turn
    is the prompt). Blank lines are skipped."""
    from pathlib import Path

    file = Path(path)
    if file.is_dir():
        raise BadInput(f"prompt file {path} is a directory")
    if not file.is_file():
        raise BadInput(f"prompt file {path} does not exist")
    out = []
    for n, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                text = obj["prompt"] if "prompt" in obj else obj["turns"][0]
                if not isinstance(text, str):
                    raise TypeError("not a string")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise BadInput(f"{path}:{n}: a JSON line needs a \"prompt\" string ({e})") from None
        else:
            text = line
        text = clean_text(text)
        if not text.strip():
            raise BadInput(f"{path}:{n}: the prompt is empty")
        out.append(text)
    if not out:
        raise BadInput(f"{path} holds no prompts")
    return out


@dataclass
class BatchSummary:
    prompts: int
    batch: int
    new_tokens: int
    seconds: float                # prefills and decoding, first admission to last token
    tokens_per_s: float           # all sequences' new tokens over `seconds`
    mean_latency_seconds: float   # per sequence: from the start of the run to its last token
    forwards: int
    generation_peak_bytes: int
    predicted_generation_bytes: int
    process_peak_bytes: int
    plan_total_bytes: int
    budget_bytes: int
    weights_bytes: int
    context: int
    draft_len: int
    drafter: str
    dtype: str
    kv_dtype: str
    forward: str
    attention: str | None
    products: str | None

    def to_json(self) -> dict:
        return asdict(self)


def sequence_json(tokenizer, done) -> dict:
    """One prompt's line of `generate --prompts`: the single-prompt fields that apply per sequence."""
    s = done.stats
    return {"index": done.index, "text": decode_reply(tokenizer, done.tokens), "token_ids": done.tokens,
            **s.to_json(), "prompt_tokens": s.prefilled_tokens, "row": done.row,
            "latency_seconds": done.latency_seconds}


def largest_batch(refs, *, context: int, budget: int | None, device: str, dtype: str | None,
                  kv_dtype: str | None, draft_len: int | None, sampling: bool, cap: int) -> int:
    """--batch's default: the most rows (≤ cap) whose plan fits the budget at this context.
    refs: the resolved (target, draft, drafter) of a batch (batch_pair)."""
    from specmemo.models.resolve import plan_pair

    for batch in range(cap, 0, -1):
        report = plan_pair(refs, device=device, budget=budget, context=context, dtype=dtype, kv_dtype=kv_dtype,
                           draft_len=draft_len, batch=batch, sampling=sampling)
        if report.fits:
            return batch
    return 1


def batch_pair(target: str, draft: str):
    """resolve_pair for a batch: a drafter batches can draft with (plan.BATCH_DRAFTERS: `auto` always
    picks one; a draft model is not one, refused in one line whatever the batch size)."""
    from specmemo.budget.plan import BATCH_DRAFTERS

    refs = resolve_pair(target, draft)
    if refs[2] not in BATCH_DRAFTERS:
        raise BadInput(f"--prompts with --draft {draft}: batches draft with {', '.join(BATCH_DRAFTERS)} so far")
    return refs


def generate_batch(run: RunRequest, prompts: list[str], *, chat: bool = False, max_new_tokens: int = 128,
                   ignore_eos: bool = False, on_sequence: Callable[[dict], None] | None = None
                   ) -> tuple[list[dict], BatchSummary]:
    """Generate from every prompt with the batch engine, run.batch sequences at a time (None: the
    most the budget holds, up to BATCH_CAP and the number of prompts). on_sequence(line) is called
    in input order as soon as a prompt and every prompt before it have finished."""
    from specmemo.decoding.batch import BatchStats, SequenceDone

    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    batch, context = run.batch, run.context
    if batch is not None and batch < 1:
        raise BadInput(f"--batch must be ≥ 1, got {batch}")
    refs = batch_pair(run.target, run.draft)
    limit = refs[0].arch.max_position
    check_context(context, limit)
    tokenizer = load_tokenizer(refs[0], run.trust_remote_code)
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    longest = max(len(p) for p in ids)
    # Every row can hold the longest prompt plus its new tokens: rows are reused by any prompt.
    planned = context or min(limit, longest + max_new_tokens)
    if longest >= planned:
        raise BadInput(f"the longest prompt has {longest} tokens, which leaves no room to generate within the "
                       f"context of {planned} tokens")
    if batch is not None:
        batch = min(batch, len(prompts))   # rows beyond the prompts would only hold memory
    else:
        batch = largest_batch(refs, context=planned, budget=run.budget, device=run.device, dtype=run.dtype,
                              kv_dtype=run.kv_dtype, draft_len=run.draft_len, sampling=not run.sampling.greedy,
                              cap=min(BATCH_CAP, len(prompts)))
    rt = open_pipeline(run.with_(context=planned, batch=batch, forward="specmemo"), refs=refs, tokenizer=tokenizer)
    stops = set() if ignore_eos else stop_ids(rt.tokenizer, rt.target.model)
    lines: dict[int, dict] = {}
    shown, stats = 0, None
    for event in rt.engine.run(ids, max_new_tokens, stops):
        if isinstance(event, BatchStats):
            stats = event
        if not isinstance(event, SequenceDone):
            continue
        lines[event.index] = sequence_json(tokenizer, event)
        while shown in lines and on_sequence:
            on_sequence(lines[shown])
            shown += 1
    plan = rt.report.plan
    out = [lines[i] for i in range(len(prompts))]
    summary = BatchSummary(
        prompts=len(prompts), batch=batch, new_tokens=stats.new_tokens, seconds=stats.seconds,
        tokens_per_s=stats.tokens_per_s, mean_latency_seconds=sum(l["latency_seconds"] for l in out) / len(out),
        forwards=stats.forwards, generation_peak_bytes=rt.meter.above_baseline(),
        predicted_generation_bytes=plan.generation_bytes, process_peak_bytes=rt.process_peak_bytes(),
        plan_total_bytes=plan.total_bytes, budget_bytes=rt.report.budget_bytes,
        weights_bytes=weights_nbytes(rt.target.model), context=plan.request.context,
        draft_len=plan.request.draft_len, drafter=rt.report.drafter, dtype=plan.request.dtype,
        kv_dtype=plan.request.kv, forward=rt.target.forward_path, attention=rt.target.attention,
        products=rt.target.products)
    return out, summary
