"""Peak memory, measured the way the plan predicts it.

CPU: resident memory. The kernel's high-water mark (VmHWM) is reset by writing 5 to
/proc/self/clear_refs, so a peak can be measured from any starting point.
CUDA: torch's allocator peak (max_memory_allocated), reset with reset_peak_memory_stats.
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


def reset_peak(device: str) -> None:
    """Start a new peak window: VmHWM on the CPU, the allocator's peak on CUDA."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_bytes(device: str) -> int:
    """Peak since reset_peak: process RSS on the CPU, memory reserved by torch's allocator on CUDA
    (what the process actually holds on the GPU, beside its fixed CUDA context)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved()
    return peak_rss_bytes()


def current_bytes(device: str) -> int:
    """What the process holds now, measured the same way as peak_bytes."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_reserved()
    return rss_bytes()


@dataclass
class PeakMeter:
    """Peak memory above a baseline taken at `start()`."""
    device: str = "cpu"
    baseline: int = 0

    def start(self) -> None:
        reset_peak(self.device)
        self.baseline = current_bytes(self.device)

    def peak(self) -> int:
        """Peak since start(), minus the baseline."""
        return max(0, peak_bytes(self.device) - self.baseline)
