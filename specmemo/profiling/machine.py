"""Facts about the machine a profile ran on, and its measured memory read bandwidth."""

import os
import platform
import time

import psutil


# /proc/cpuinfo flags that decide kernel choices here (bf16 and int4 GEMM paths), as people name them.
_VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


# Classes of CPUs whose kernels measure alike (torch's bf16 and int4 paths branch on these), best first.
_CPU_CLASSES = [("amx_bf16", "amx"), ("avx512_bf16", "avx512-bf16"), ("avx512f", "avx512"), ("avx2", "avx2")]


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_class(name: str | None = None) -> str:
    """This CPU's kernel class ("amx", "avx512-bf16", "avx512", "avx2" or "baseline"), or that of
    a host as cpu_name() wrote it. Measured costs (cost curves, a drafter's c, speedups) carry
    over between hosts of one class only: on an AVX2-only CPU torch's bf16 products convert the
    weight on every call and cost in proportion to the rows, where AVX512-BF16 keeps them flat."""
    if name is None:
        flags = _cpu_flags()
    else:
        labels = set(name.rstrip(")").rpartition("(")[2].rpartition("; ")[2].split(", "))
        flags = {flag for flag, label in _VECTOR_FLAGS.items() if label in labels}
    return next((cls for flag, cls in _CPU_CLASSES if flag in flags), "baseline")


def cpu_name() -> str:
    """The CPU as figures should name it: model name, family/model and vector extensions, e.g.
    "AMD EPYC (family 25 model 17; AVX2, AVX-512, AVX512-BF16)"; hosts of one name differ."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.machine()
    flags = set(fields.get("flags", "").split())
    vector = ", ".join(label for flag, label in _VECTOR_FLAGS.items() if flag in flags) or "no AVX2"
    family = f"family {fields['cpu family']} model {fields['model']}; " if "cpu family" in fields else ""
    return f"{name} ({family}{vector})"


def gpu_name() -> str | None:
    try:
        import pynvml

        from specmemo.budget.devices import nvml_handle

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetName(nvml_handle(pynvml))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver or no GPU
        return None


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
