"""One-shot generation: the library side of `specmemo generate`."""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from specmemo.decoding.detokenize import Detokenizer
from specmemo.decoding.events import Finished, GenerationStats, Step
from specmemo.decoding.sampling import SamplingConfig
from specmemo.errors import BadInput
from specmemo.models.load import load_tokenizer, weights_nbytes
from specmemo.planning import resolve_pair
from specmemo.runtime import open_runtime


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    new_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    steps: int
    tokens_per_s: float
    generation_peak_bytes: int
    predicted_generation_bytes: int
    weights_bytes: int
    load_peak_bytes: int
    budget_bytes: int
    prompt_tokens: int
    context: int
    draft_len: int
    draft_window: int
    acceptance_rate: float
    stop_reason: str
    seconds: float
    accepted_histogram: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def stop_ids(tokenizer, model) -> set[int]:
    """EOS from the tokenizer and the generation config (chat models often list several)."""
    ids = set()
    tok, cfg = tokenizer, getattr(model, "generation_config", None)
    for value in (getattr(tok, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    if not chat:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("--chat: this model's tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def generate(target: str, draft: str, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
             ignore_eos: bool = False, sampling: SamplingConfig = SamplingConfig(), budget: int | None = None,
             device: str = "cpu", dtype: str = "fp32", draft_dtype: str | None = None, context: int | None = None,
             draft_len: int | None = None, draft_window: int | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False, on_text: Callable[[str], None] | None = None) -> GenerateResult:
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    refs = resolve_pair(target, draft)
    tokenizer = load_tokenizer(refs[0], trust_remote_code)
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    limit = refs[0].arch.max_position
    if len(prompt_ids) >= limit or (context is not None and len(prompt_ids) >= context):
        raise BadInput(f"prompt of {len(prompt_ids)} tokens is longer than the context "
                       f"of {context or limit} tokens")
    # The planned context is exactly what this run can fill: the prompt plus the new tokens.
    planned = context or min(limit, len(prompt_ids) + max_new_tokens)
    rt = open_runtime(target, draft, device=device, budget=budget, context=planned, draft_len=draft_len,
                      draft_window=draft_window, dtype=dtype, draft_dtype=draft_dtype, sampling=sampling, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, refs=refs, tokenizer=tokenizer)
    stops = set() if ignore_eos else stop_ids(rt.tokenizer, rt.target.model)
    new: list[int] = []
    detok = Detokenizer(tokenizer)
    stats = GenerationStats()
    start = time.perf_counter()
    for event in rt.engine.generate(prompt_ids, max_new_tokens, stops):
        if isinstance(event, Step):
            new.extend(event.tokens)
            if on_text:
                on_text(detok.push(event.tokens))
        elif isinstance(event, Finished):
            stats = event.stats
    seconds = time.perf_counter() - start
    peak = rt.meter.peak()
    plan = rt.report.plan
    weights = weights_nbytes(rt.target.model) + (weights_nbytes(rt.draft.model) if rt.draft else 0)
    return GenerateResult(
        text=tokenizer.decode(new, skip_special_tokens=True), token_ids=new, new_tokens=stats.new_tokens,
        drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens, steps=stats.steps,
        tokens_per_s=stats.new_tokens / seconds if seconds > 0 else 0.0, generation_peak_bytes=peak,
        predicted_generation_bytes=plan.generation_bytes, weights_bytes=weights,
        load_peak_bytes=rt.load_peak_bytes, budget_bytes=rt.report.budget_bytes, prompt_tokens=len(prompt_ids),
        context=plan.request.context, draft_len=plan.request.draft_len, draft_window=plan.request.draft_window,
        acceptance_rate=stats.acceptance_rate, stop_reason=stats.stop_reason, seconds=seconds,
        accepted_histogram=dict(sorted(stats.accepted_histogram.items())),
    )
