"""Byte sizes as users write them, and back."""

import re

from specmemo.errors import BadInput

# Single letters (8G) follow the binary convention of `ls -h`, llama.cpp and PyTorch's memory reports.
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'8GiB' -> 8589934592, '800MB' -> 800000000, '8G' -> 8 GiB, '123' -> 123 bytes."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise BadInput(f"cannot read size {text!r}: use e.g. 8GiB, 800MB, 8G or a number of bytes")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise BadInput(f"size must be positive, got {text!r}")
    return size


def format_bytes(n: int) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def count(n: int, noun: str) -> str:
    """"1 token", "2 tokens", "4,096 tokens"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
