"""Model text: everything between strings and token ids, in one place.

Prompts and chat templates in, stop tokens, streamed text and replies out. Replies are decoded
with the same settings (`decode_reply`) that `turn_delta` uses to compare a cached conversation
with its re-rendering, so a chat turn never re-prefills because two decodes disagreed.
"""

from specmemo.errors import BadInput

DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def clean_text(text: str) -> str:
    """Text from argv or a terminal that was not UTF-8 (Python keeps such bytes as lone
    surrogates, which no tokenizer can encode) with each bad byte replaced by U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def stop_ids(tokenizer, model) -> set[int]:
    """EOS from the tokenizer and the generation config (chat models often list several)."""
    ids = set()
    cfg = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def encode_text(tokenizer, text: str) -> list[int]:
    """Text someone typed (or a model wrote): a control token's spelling in it ("<|im_end|>") is
    encoded as plain text, so typed text can never end a turn or open a system role."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_template(tokenizer, text: str) -> list[int]:
    """A chat template's own text: its markers are the control tokens they spell."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict]) -> str:
    """The chat template's text for `messages`, ending with the generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_MARK = "\ue000{}\ue001"   # private-use characters stand in for each message while the template renders


def pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, typed) pieces: the template's own text, and each
    message's content (typed = True). A template that changes a message's content as it renders
    (cuts it, say) is taken whole as the template's text."""
    marked = render(tokenizer, [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)])
    out, at = [], 0
    for i, m in enumerate(messages):
        found = marked.find(_MARK.format(i), at)
        if found < 0:
            return [(render(tokenizer, messages), False)]
        out += [(marked[at:found], False), (m["content"], True)]
        at = found + len(_MARK.format(i))
    out.append((marked[at:], False))
    whole = render(tokenizer, messages)
    return out if "".join(text for text, _ in out) == whole else [(whole, False)]


def encode_pieces(tokenizer, parts: list[tuple[str, bool]]) -> list[int]:
    ids: list[int] = []
    for text, typed in parts:
        if text:
            ids += encode_text(tokenizer, text) if typed else encode_template(tokenizer, text)
    return ids


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation's tokens under the chat template, ending with the generation prompt."""
    return encode_pieces(tokenizer, pieces(tokenizer, messages))


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    if not chat:
        return tokenizer(prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("--chat: this model's tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_messages(tokenizer, messages)


def decode_reply(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, **DECODE)


def turn_delta(tokenizer, cached: list[int], messages: list[dict]) -> list[int] | None:
    """Tokens to append to `cached` so it reads as `messages` + generation prompt; None if the
    cached tokens are not a prefix of that rendering (the caller then prefills it whole)."""
    parts = pieces(tokenizer, messages)
    full = "".join(text for text, _ in parts)
    held = tokenizer.decode(cached, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not full.startswith(held):
        return None
    rest, skip = [], len(held)
    for text, typed in parts:   # the pieces past what the cache holds
        rest.append((text[skip:], typed))
        skip = max(0, skip - len(text))
    return encode_pieces(tokenizer, rest)


class StreamDecoder:
    """Text deltas as tokens arrive, in constant time per token, never splitting a UTF-8
    character: tokenizers' DecodeStream, which keeps only a small window of recent ids."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            piece = self.stream.step(self.backend, i)
            if piece:
                out.append(piece)
        return "".join(out)
