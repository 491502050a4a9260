"""One-shot generation: the library side of `specmemo generate` (chat/ is its multi-turn sibling)."""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from specmemo.decoding.events import Finished, GenerationStats, Step
from specmemo.decoding.sampling import SamplingConfig
from specmemo.errors import BadInput
from specmemo.models.load import load_tokenizer, weights_nbytes
from specmemo.models.resolve import resolve_pair
from specmemo.models.text import StreamDecoder, clean_text, decode_reply, encode_prompt, stop_ids
from specmemo.pipeline import open_pipeline


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    new_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    steps: int
    tokens_per_s: float           # decoding only
    prefill_tokens_per_s: float
    prefill_seconds: float
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
    acceptance_rate: float
    stop_reason: str
    seconds: float
    dtype: str
    kv_dtype: str
    forward: str
    drafter: str                  # what drafted: model, head, ngram or none (--draft auto picks one)
    accepted_histogram: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def check_context(context: int | None, limit: int) -> None:
    if context is not None and not 1 <= context <= limit:
        raise BadInput(f"--context must be between 1 and the model's maximum of {limit} tokens, got {context}")


def generate(target: str, draft: str, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
             ignore_eos: bool = False, sampling: SamplingConfig = SamplingConfig(), budget: int | None = None,
             device: str = "cpu", dtype: str | None = None, kv_dtype: str | None = None,
             draft_dtype: str | None = None, context: int | None = None, draft_len: int | None = None,
             draft_window: int | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
             on_text: Callable[[str], None] | None = None, forward: str = "auto",
             cuda_graphs: bool = True) -> GenerateResult:
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    prompt = clean_text(prompt)
    if not prompt.strip():
        raise BadInput("the prompt is empty")
    refs = resolve_pair(target, draft)
    limit = refs[0].arch.max_position
    check_context(context, limit)
    tokenizer = load_tokenizer(refs[0], trust_remote_code)
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    room = (context or limit) - len(prompt_ids)
    if room < 1:
        raise BadInput(f"prompt of {len(prompt_ids)} tokens is longer than the context of {context or limit} tokens "
                       f"(it needs at least {len(prompt_ids) + 1})")
    # The planned context is exactly what this run can fill: the prompt plus the new tokens.
    planned = context or min(limit, len(prompt_ids) + max_new_tokens)
    rt = open_pipeline(target, draft, device=device, budget=budget, context=planned, draft_len=draft_len,
                       draft_window=draft_window, dtype=dtype, kv_dtype=kv_dtype, draft_dtype=draft_dtype,
                       sampling=sampling, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, refs=refs,
                       tokenizer=tokenizer, forward=forward, cuda_graphs=cuda_graphs)
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
    plan = rt.report.plan
    weights = weights_nbytes(rt.target.model) + (weights_nbytes(rt.draft.model) if rt.draft else 0)
    return GenerateResult(
        text=decode_reply(tokenizer, new), token_ids=new, new_tokens=stats.new_tokens,
        drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens, steps=stats.steps,
        tokens_per_s=stats.tokens_per_s, prefill_tokens_per_s=stats.prefill_tokens_per_s,
        prefill_seconds=stats.prefill_seconds, generation_peak_bytes=rt.meter.above_baseline(),
        process_peak_bytes=rt.process_peak_bytes(), predicted_generation_bytes=plan.generation_bytes,
        weights_bytes=weights, load_peak_bytes=rt.load_peak_bytes, plan_total_bytes=plan.total_bytes,
        budget_bytes=rt.report.budget_bytes, prompt_tokens=len(prompt_ids), context=plan.request.context,
        draft_len=plan.request.draft_len, draft_window=plan.request.draft_window,
        acceptance_rate=stats.acceptance_rate, stop_reason=stats.stop_reason,
        seconds=stats.prefill_seconds + stats.decode_seconds, dtype=plan.request.dtype, kv_dtype=plan.request.kv,
        forward=rt.target.forward_path, drafter=rt.report.drafter, accepted_histogram=dict(sorted(stats.accepted_histogram.items())),
    )
