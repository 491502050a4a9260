"""Where the project's data files live. Profiles sit beside the package in the repository
(see README: the supported install is editable, from a clone); SPECMEMO_PROFILES overrides.
What is built once per machine goes to the cache (SPECMEMO_CACHE)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def profiles_dir() -> Path:
    return Path(os.environ.get("SPECMEMO_PROFILES", REPO_ROOT / "profiles"))


def cache_root() -> Path:
    """What specmemo builds once per machine (dense copies of GGUF files, compiled kernels):
    SPECMEMO_CACHE, default ~/.cache/specmemo."""
    return Path(os.environ.get("SPECMEMO_CACHE", Path.home() / ".cache" / "specmemo"))


def default_prompts_file() -> Path:
    return REPO_ROOT / "prompts" / "default.jsonl"
