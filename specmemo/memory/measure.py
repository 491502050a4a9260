"""Peak memory, measured the way the plan predicts it (PeakMeter is the one path).

CPU: resident memory. The kernel's high-water mark (VmHWM) is reset by writing 5 to
/proc/self/clear_refs, so a peak can be measured from any starting point.
CUDA: torch's caching allocator (max_memory_reserved), reset with reset_peak_memory_stats.
"""

from dataclasses import dataclass

import psutil


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (non-Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else rss_bytes()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved()
    return peak_rss_bytes()


def _current(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_reserved()
    return rss_bytes()


@dataclass
class PeakMeter:
    """The one way specmemo measures memory, as the budget means it: the whole process.

    CPU: resident memory; its high-water mark is reset at `start`/`reset`. CUDA: memory reserved
    by torch's caching allocator plus `fixed_bytes` (the CUDA context, which torch does not see;
    the device profile's runtime overhead). `baseline` is what the process held at `start`, so
    `above_baseline()` is the memory a stage added (e.g. generation, against the plan's
    generation_bytes)."""
    device: str = "cpu"
    fixed_bytes: int = 0
    baseline: int = 0

    def start(self) -> None:
        self.reset()
        self.baseline = self.current()

    def reset(self) -> None:
        """Start a new peak window without moving the baseline."""
        _reset_peak(self.device)

    def current(self) -> int:
        return _current(self.device) + self.fixed_bytes

    def peak(self) -> int:
        """Whole-process peak since the last start/reset."""
        return _peak(self.device) + self.fixed_bytes

    def above_baseline(self) -> int:
        return max(0, self.peak() - self.baseline)
