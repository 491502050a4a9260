"""The standard speculative-decoding speedup model (Leviathan et al. 2023, eq. 1 and thm 3.8).

With per-token acceptance α, draft length k, and c = cost of one draft step / cost of one target
step, the expected tokens per target step are (1 − α^(k+1)) / (1 − α), and a step costs k·c + 1
target-step units, so

    speedup(k) = (1 − α^(k+1)) / ((1 − α)(k·c + 1)).
"""

import tomllib
from dataclasses import dataclass
from pathlib import Path

from specmemo.paths import profiles_dir

# Defaults when no measured pair profile exists. A small model draft of the same family
# typically accepts 0.6–0.8 of tokens (Leviathan et al. report 0.5–0.9); we take the cautious end.
# N-gram lookup in chat accepts less often but costs nothing (c ≈ 0; its index lookup is
# microseconds against a target step of tens of milliseconds).
DEFAULT_MODEL_ALPHA, DEFAULT_MODEL_C = 0.6, 0.05
DEFAULT_NGRAM_ALPHA, DEFAULT_NGRAM_C = 0.35, 0.0
MAX_DRAFT_LEN = 16
KEEP_FRACTION = 0.96  # the speedup budget keeps ≥ 96% of the best predicted speedup


@dataclass(frozen=True)
class PairProfile:
    alpha: float
    c: float
    source: str  # "measured: <file>" or "default"


def expected_tokens_per_step(alpha: float, k: int) -> float:
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, c: float, k: int) -> float:
    """1.0 for k = 0 (plain decoding)."""
    return expected_tokens_per_step(alpha, k) / (k * c + 1)


def pair_file(target: str, draft: str) -> Path:
    return profiles_dir() / "pairs" / f"{target}__{draft}.toml".replace("/", "_")


def pair_profile(target: str, draft: str, drafter_kind: str) -> PairProfile:
    """Measured α and c from profiles/pairs/ if `specmemo profile --save-profile` wrote one."""
    path = pair_file(target, draft)
    if path.exists():
        data = tomllib.loads(path.read_text())
        return PairProfile(float(data["alpha"]), float(data["c"]), f"measured: {path.name}")
    if drafter_kind == "ngram":
        return PairProfile(DEFAULT_NGRAM_ALPHA, DEFAULT_NGRAM_C, "default")
    return PairProfile(DEFAULT_MODEL_ALPHA, DEFAULT_MODEL_C, "default")
