"""Device profiles: how much memory a device offers and what its runtime reserves.

Named devices come from profiles/devices/*.toml. `cpu` and `cuda` are measured at run time:
available RAM from psutil, free GPU memory from NVML (nvidia-ml-py).
"""

import tomllib
from dataclasses import dataclass

from specmemo.errors import UnknownDevice
from specmemo.paths import profiles_dir


@dataclass(frozen=True)
class Device:
    name: str
    kind: str                  # "cpu" or "cuda"
    memory_bytes: int          # what the process may use, before the runtime overhead
    overhead_bytes: int        # reserved by the runtime itself (see overhead_reason)
    overhead_reason: str
    unified: bool = False      # CPU and GPU share the memory (Jetson, Apple)
    workspace_pct: int = 100   # measured: forward scratch as a percentage of the live-tensor count
    engine_bytes: int = 0      # measured: fixed scratch the first forward allocates
    verify_bytes: int = 0      # measured: fixed scratch of the verification (k+1 token) kernels


def _read(name: str) -> dict:
    path = profiles_dir() / "devices" / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (profiles_dir() / "devices").glob("*.toml")))
        raise UnknownDevice(f"unknown device {name!r}; known: {known}")
    return tomllib.loads(path.read_text())


def _cuda_free_bytes() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVML missing, no driver, no GPU: all mean "no CUDA device here"
        raise UnknownDevice(f"no CUDA device found through NVML ({type(e).__name__})") from None


def load_device(name: str) -> Device:
    data = _read(name)
    if data.get("measured") == "psutil":
        import psutil

        memory = int(psutil.virtual_memory().available)
    elif data.get("measured") == "nvml":
        memory = _cuda_free_bytes()
    else:
        memory = int(data["memory_bytes"])
    return Device(
        name=name,
        kind=data.get("kind", "cuda"),
        memory_bytes=memory,
        overhead_bytes=int(data["overhead_bytes"]),
        overhead_reason=data["overhead_reason"],
        unified=bool(data.get("unified", False)),
        workspace_pct=int(data.get("workspace_pct", 100)),
        engine_bytes=int(data.get("engine_bytes", 0)),
        verify_bytes=int(data.get("verify_bytes", 0)),
    )
