"""Conversation state: the messages a chat holds (the system prompt is never dropped).

The engine's committed tokens are the truth: the assistant's tokens stay exactly as generated,
never re-tokenized. A new user turn adds only the template's text between the end of what the
caches hold and the new generation prompt (models/text.turn_delta).
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
