"""Incremental detokenization: text deltas as tokens arrive, never splitting a UTF-8 character."""


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the newly printable text."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta
