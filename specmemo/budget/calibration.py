"""What this host measured a run to need beside the tensors its plan counts, recorded by each run
and read by the next plan of the same run: the process before loading, what loading adds beside the
weights, and the kernels' scratch. The device profile's reserves stand in where nothing was measured.

A record belongs to one host (CPU name and class, torch version) and one pair of models in one pair
of dtypes, whichever command ran it (a plan for chat is then the plan chat makes). The scratch is kept per size of run
(`bucket`: the quarter octave at or above the KV slots it touched): a short run's fixed buffers weigh
more against its few tokens than a long run's. Each figure keeps the largest value seen, so a plan
never shrinks below a run it has seen. The file is SPECMEMO_CALIBRATION, default
<cache>/calibration.json; "off" turns calibration off."""

import functools
import json
import math
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from specmemo.atomic import atomic_write_text
from specmemo.host import cpu_class, cpu_name
from specmemo.paths import cache_root

# Resident memory is counted in pages and malloc's arenas move by a few hundred KiB between runs of
# one shape: a measured figure is planned with this much on top.
MARGIN_BYTES = 2 * 2**20


def bucket(tokens: int) -> int:
    """The run size `tokens` belongs to: the quarter octave (2^(i/4), rounded up) at or above it, at
    least 64. Finer than octaves because the scratch beside the counted tensors falls as a run grows."""
    t = max(64, tokens)
    i = math.ceil(4 * math.log2(t) - 1e-9)
    while math.ceil(2 ** (i / 4) - 1e-9) < t:
        i += 1
    return math.ceil(2 ** (i / 4) - 1e-9)


@dataclass(frozen=True)
class Calibration:
    baseline_bytes: int = 0   # the process just before loading
    overhead_bytes: int = 0   # the load peak above the process before it, less the weights
    scratch: dict = field(default_factory=dict)   # bucket -> generation peak less the counted generation memory

    def merged(self, other: "Calibration") -> "Calibration":
        scratch = dict(self.scratch)
        for b, v in other.scratch.items():
            scratch[b] = max(v, scratch.get(b, 0))
        return Calibration(max(self.baseline_bytes, other.baseline_bytes),
                           max(self.overhead_bytes, other.overhead_bytes), dict(sorted(scratch.items())))

    def scratch_bytes(self, context: int) -> int | None:
        """The kernel scratch to plan at `context`, margin included: the largest recorded over the
        octave of run sizes up to this context's (one run's figure moves by a MiB or two), else that
        of the largest run below it; None when every recorded run was larger (budget.plan then
        plans what the smallest of them needed)."""
        top = bucket(context)
        below = [b for b in self.scratch if b <= top]
        if not below:
            return None
        near = [b for b in below if 2 * b >= top] or [max(below)]
        return max(self.scratch[b] for b in near) + MARGIN_BYTES

    @property
    def smallest_run(self) -> int:
        return min(self.scratch)

    @property
    def planned_overhead_bytes(self) -> int:
        return self.overhead_bytes + MARGIN_BYTES

    def to_json(self) -> dict:
        return {"baseline_bytes": self.baseline_bytes, "overhead_bytes": self.overhead_bytes,
                "scratch_bytes": {str(b): v for b, v in self.scratch.items()}}

    @staticmethod
    def from_json(entry: dict) -> "Calibration":
        return Calibration(int(entry["baseline_bytes"]), int(entry["overhead_bytes"]),
                           {int(b): int(v) for b, v in entry["scratch_bytes"].items()})


def path() -> Path | None:
    where = os.environ.get("SPECMEMO_CALIBRATION")
    if where == "off":
        return None
    return Path(where) if where else cache_root() / "calibration.json"


@functools.cache
def host_key() -> str:
    try:
        torch = metadata.version("torch")   # without importing torch: `plan` stays instant
    except metadata.PackageNotFoundError:
        torch = "none"
    return f"{cpu_name()} [{cpu_class()}], torch {torch}"


def run_key(target: str, draft: str, dtype: str, draft_dtype: str | None, device: str) -> str:
    return f"{device}: {target} {dtype} + {draft}{' ' + draft_dtype if draft_dtype else ''}"


def _read_all() -> dict:
    where = path()
    if where is None or not where.exists():
        return {}
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError):
        return {}   # a damaged record is measured again
    return data if isinstance(data, dict) else {}


def _parse(entry) -> Calibration | None:
    try:
        return Calibration.from_json(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _host(data: dict) -> dict:
    """This host's records in the file's data (a damaged entry reads as none)."""
    runs = data.get(host_key())
    return runs if isinstance(runs, dict) else {}


def _entry(data: dict, key: str) -> Calibration | None:
    entry = _host(data).get(key)
    return _parse(entry) if isinstance(entry, dict) else None


def read(key: str) -> Calibration | None:
    return _entry(_read_all(), key)


def record(key: str, measured: Calibration) -> Calibration:
    """Merge what a run measured into its record (each figure: the larger value); returns the record.
    A record that cannot be written (a read-only cache) is skipped: the next plan reserves more."""
    where = path()
    if where is None:
        return measured
    data = _read_all()
    old = _entry(data, key)
    new = old.merged(measured) if old else measured
    if new != old:
        data[host_key()] = {**_host(data), key: new.to_json()}
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(where, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass
    return new
