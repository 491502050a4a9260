"""Prompt sets in MT-Bench format: one JSON object per line with question_id, category, turns."""

import json
from dataclasses import dataclass
from pathlib import Path

from specmemo.errors import BadInput
from specmemo.paths import default_prompts_file


@dataclass(frozen=True)
class Conversation:
    question_id: int | str
    category: str
    turns: list[str]


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Conversation]:
    path = Path(path) if path else default_prompts_file()
    if not path.is_file():
        raise BadInput(f"prompt file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            turns = obj["turns"]
            if not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("turns must be a non-empty list of strings")
            out.append(Conversation(obj.get("question_id", n), obj.get("category", ""), turns))
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{path}:{n}: not an MT-Bench record ({e})") from None
        if limit and len(out) >= limit:
            break
    if not out:
        raise BadInput(f"{path} holds no prompts")
    return out
