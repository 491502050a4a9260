"""Conversation state and the token delta each turn adds to the caches.

The engine's committed tokens are the truth: the assistant's tokens stay exactly as generated,
never re-tokenized. A new user turn adds only the template's text between the end of what the
caches hold and the new generation prompt, tokenized on its own.
"""

from dataclasses import dataclass, field


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict] = field(default_factory=list)   # {"role", "content"}, system excluded

    def with_user(self, text: str) -> list[dict]:
        return self._prefix() + self.messages + [{"role": "user", "content": text}]

    def kept(self, turns_dropped: int, text: str) -> list[dict]:
        """The conversation without its oldest `turns_dropped` user/assistant exchanges."""
        return self._prefix() + self.messages[2 * turns_dropped :] + [{"role": "user", "content": text}]

    def _prefix(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    @property
    def exchanges(self) -> int:
        return len(self.messages) // 2

    def drop_oldest(self, n: int) -> None:
        del self.messages[: 2 * n]

    def reset(self) -> None:
        self.messages.clear()


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def turn_delta(tokenizer, cached: list[int], messages: list[dict]) -> list[int] | None:
    """Tokens to append to `cached` so it reads as `messages` + generation prompt; None if the
    cached tokens are not a prefix of that rendering (then the caller re-prefills)."""
    full = render(tokenizer, messages)
    held = tokenizer.decode(cached, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not full.startswith(held):
        return None
    return encode_text(tokenizer, full[len(held):])
