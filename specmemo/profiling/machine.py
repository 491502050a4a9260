"""Facts about the machine a profile ran on, and its measured memory read bandwidth."""

import os
import time

import psutil

from specmemo.host import cpu_name, gpu_name


def read_bandwidth_bytes_per_s(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best of a few full reads of a large fp32 tensor: what a decode step's weight read can hope for."""
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def machine_facts() -> dict:
    import torch
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "read_bandwidth_bytes_per_s": read_bandwidth_bytes_per_s(),
    }
