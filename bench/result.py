"""The one format every bench writes: a JSON result that names where, when and how it was measured.

    {"bench": name, "host": cpu_name(), "cpu_class": ..., "torch": ..., "commit": ..., "command": ...,
     "date": ..., "figures": [{"figure": ..., "value": ..., "unit": ...}], "data": {...}}

`figures` are the headline numbers that bench/figures.py turns into the README's table and
docs/performance.md; `data` is whatever else the bench measured (tables, curves, raw runs).
"""

import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def git_commit() -> str:
    """The checkout's commit, with "+dirty" when the working tree differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def envelope(bench: str) -> dict:
    import torch

    from specmemo.host import cpu_class, cpu_name, gpu_name

    return {"bench": bench, "host": gpu_name() or cpu_name(), "cpu": cpu_name(), "cpu_class": cpu_class(),
            "torch": torch.__version__, "commit": git_commit(),
            "command": shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else bench,
            "date": datetime.date.today().isoformat()}


def save(bench: str, figures: list[dict], data: dict | None = None, out: Path | None = None) -> Path:
    """Write the result atomically to `out` (default bench/results/<bench>-<cpu class>.json) and return its path."""
    from specmemo.atomic import atomic_write_text

    result = {**envelope(bench), "figures": figures, "data": data or {}}
    path = out or RESULTS / f"{bench}-{result['cpu_class']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
    return path


def figure(name: str, value: float, unit: str = "", note: str = "") -> dict:
    return {"figure": name, "value": value, "unit": unit, **({"note": note} if note else {})}


class recorded:
    """`with recorded("q4_kernels"): main()`: what the bench prints, kept as its result's output
    (data.output) beside the envelope; figures may be added with `figures.append(figure(...))`."""

    def __init__(self, bench: str):
        self.bench, self.figures, self.lines = bench, [], []

    def __enter__(self) -> "recorded":
        self.stdout = sys.stdout
        outer = self

        class Tee:
            def write(self, text):
                outer.lines.append(text)
                return outer.stdout.write(text)

            def flush(self):
                outer.stdout.flush()

            def __getattr__(self, name):
                return getattr(outer.stdout, name)

        sys.stdout = Tee()
        return self

    def __exit__(self, kind, error, tb) -> None:
        sys.stdout = self.stdout
        code = 0 if kind is None else getattr(error, "code", 1) if kind is SystemExit else 1
        asked_for_help = any(a in ("-h", "--help") for a in sys.argv[1:])
        if (kind is None or kind is SystemExit) and not asked_for_help:   # a crash measured nothing
            save(self.bench, self.figures, {"output": "".join(self.lines), "exit": code})
