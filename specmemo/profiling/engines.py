"""The engines a profile compares, behind one interface: generate(input_ids, max_new) -> tokens.

specmemo: our engine with the given drafter; specmemo-ar: our engine with no draft; hf-ar:
`model.generate` on the whole conversation each turn (as most people call it); hf-ar-cached:
`model.generate` with the previous turn's `past_key_values`, so turn 2 prefills only its new
tokens, as our engine does; hf-lookup: `prompt_lookup_num_tokens`; hf-assisted: `assistant_model`;
llama.cpp: llama-cpp-python on the target's GGUF file (an optional extra), reusing its cache across
turns by common prefix. Every engine is greedy, stops at the same end-of-turn tokens, and sees the same token sequence.
Each turn's seconds cover its prefill and its decoding, for every engine.
"""

from dataclasses import dataclass

import torch

from specmemo.decoding.events import GenerationStats, collect

ENGINES = ("specmemo", "specmemo-ar", "hf-ar", "hf-ar-cached", "hf-lookup", "hf-assisted", "llama.cpp")
LLAMA_CPP_MISSING = ("the llama.cpp engine needs llama-cpp-python: pip install 'specmemo[llama]' "
                     "(it builds llama.cpp from source, a few minutes)")
PROMPT_LOOKUP_TOKENS = 10  # transformers' documented example value


@dataclass
class TurnResult:
    tokens: list[int]
    seconds: float
    stats: GenerationStats | None = None   # our engine's (the baselines count tokens and time only)


class SpecmemoEngine:
    """Our engine; the caches carry over between the turns of one conversation."""

    def __init__(self, pipeline):
        self.engine = pipeline.engine

    def new_conversation(self):
        self.engine.reset()

    def generate(self, input_ids: list[int], max_new: int, stops: set[int]) -> TurnResult:
        held = self.engine.tokens
        if input_ids[: len(held)] != held:  # not a continuation: start over
            self.engine.reset()
            held = []
        tokens, stats = collect(self.engine.generate(input_ids[len(held):], max_new, stops))
        return TurnResult(tokens, stats.seconds, stats)


class HFEngine:
    """`model.generate` as people use it today: a fresh call per turn, on the whole conversation."""

    def __init__(self, model, mode: str, assistant=None):
        self.model, self.mode, self.assistant = model, mode, assistant
        self.past = None  # hf-ar-cached: the KV cache `generate` returned for the previous turn
        if model.config._attn_implementation != "sdpa":
            model.set_attn_implementation("sdpa")  # HF's own attention for the HF baselines

    def new_conversation(self):
        self.past = None

    @torch.inference_mode()
    def generate(self, input_ids: list[int], max_new: int, stops: set[int]) -> TurnResult:
        import time

        ids = torch.tensor([input_ids], device=self.model.device)
        kwargs = {"max_new_tokens": max_new, "do_sample": False, "eos_token_id": sorted(stops) or None,
                  "pad_token_id": sorted(stops)[0] if stops else 0, "attention_mask": torch.ones_like(ids)}
        if self.mode == "hf-lookup":
            kwargs["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
        elif self.mode == "hf-assisted":
            kwargs["assistant_model"] = self.assistant
        elif self.mode == "hf-ar-cached":
            # The cache holds the previous turn's prompt and reply (but its last token); generate
            # prefills only the tokens beyond it.
            kwargs.update(past_key_values=self.past, return_dict_in_generate=True)
        start = time.perf_counter()
        out = self.model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
        if self.mode == "hf-ar-cached":
            self.past, out = out.past_key_values, out.sequences
        return TurnResult(out[0, len(input_ids):].tolist(), seconds)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python on the same GGUF file, fed our token ids (its vocabulary
    is the file's, as ours is). Greedy (top-k 1, no repetition penalty); it keeps the evaluated
    tokens and re-evaluates only what follows the common prefix, so turn 2 prefills its new tokens."""

    def __init__(self, gguf_path: str, context: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf_path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def new_conversation(self):
        self.llm.reset()

    def generate(self, input_ids: list[int], max_new: int, stops: set[int]) -> TurnResult:
        import time

        out = []
        start = time.perf_counter()
        # reset=True is what reuses the cache: llama-cpp-python then keeps the longest common prefix
        # of the evaluated tokens and evaluates the rest (reset=False would append everything).
        for tok in self.llm.generate(input_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            out.append(int(tok))
            if tok in stops or len(out) >= max_new:
                break
        return TurnResult(out, time.perf_counter() - start)
