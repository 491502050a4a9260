"""Facts about this machine that both the plan and the runtime read: the CPU's name, vector
flags and kernel class, and the NVML handle of torch's first CUDA device. Read once per process;
nothing here imports torch.
"""

import functools
import os
import platform
import shutil

# /proc/cpuinfo flags that decide kernel choices here (bf16 and int4 GEMM paths), as people name them.
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}

# Classes of CPUs whose kernels measure alike (torch's bf16 and int4 paths branch on these), best first.
CPU_CLASSES = [("amx_bf16", "amx"), ("avx512_bf16", "avx512-bf16"), ("avx512f", "avx512"), ("avx2", "avx2")]


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    info = cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def cpu_class(name: str | None = None) -> str:
    """This CPU's kernel class ("amx", "avx512-bf16", "avx512", "avx2" or "baseline"), or that of
    a host as cpu_name() wrote it. Measured costs (cost curves, a drafter's c, speedups) carry
    over between hosts of one class only: on an AVX2-only CPU torch's bf16 products convert the
    weight on every call and cost in proportion to the rows, where AVX512-BF16 keeps them flat."""
    if name is None:
        flags = cpu_flags()
    else:
        labels = set(name.rstrip(")").rpartition("(")[2].rpartition("; ")[2].split(", "))
        flags = {flag for flag, label in VECTOR_FLAGS.items() if label in labels}
    return next((cls for flag, cls in CPU_CLASSES if flag in flags), "baseline")


def cpu_name() -> str:
    """The CPU as figures should name it: model name, family/model and vector extensions, e.g.
    "AMD EPYC (family 25 model 17; AVX2, AVX-512, AVX512-BF16)"; hosts of one name differ."""
    fields = cpuinfo()
    if not fields:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.machine()
    flags = cpu_flags()
    vector = ", ".join(label for flag, label in VECTOR_FLAGS.items() if flag in flags) or "no AVX2"
    family = f"family {fields['cpu family']} model {fields['model']}; " if "cpu family" in fields else ""
    return f"{name} ({family}{vector})"


def c_compiler() -> str | None:
    """The C compiler specmemo's kernels build with (CC, else cc or gcc on PATH), or None; None
    too under SPECMEMO_NATIVE=0, which turns the compiled kernels off."""
    if os.environ.get("SPECMEMO_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return cc if cc and shutil.which(cc) else None


def nvml_index(visible: str | None = None) -> int | str | None:
    """The NVML handle of torch's cuda:0: the first entry of CUDA_VISIBLE_DEVICES (an index or a
    GPU-/MIG- UUID), 0 when unset, None when it hides every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is None:
        return 0
    first = visible.split(",")[0].strip()
    if not first or first == "-1" or first.lower() == "nodevfiles":
        return None
    return int(first) if first.isdigit() else first


def nvml_handle(pynvml):
    index = nvml_index()
    if index is None:
        raise RuntimeError("CUDA_VISIBLE_DEVICES hides every GPU")
    if isinstance(index, int):
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    return pynvml.nvmlDeviceGetHandleByUUID(index)


def gpu_free_bytes() -> int:
    """Free memory of torch's cuda:0 through NVML; raises RuntimeError where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(pynvml)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVML missing, no driver, no GPU: all mean "no CUDA device here"
        raise RuntimeError(f"no CUDA device found through NVML ({type(e).__name__})") from None


def gpu_name() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetName(nvml_handle(pynvml))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver or no GPU
        return None
