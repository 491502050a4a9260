"""Device profiles: how much memory a device offers and what its runtime reserves.

Named devices come from profiles/devices/*.toml. `cpu` and `cuda` are measured at run time:
available RAM from psutil, free GPU memory from NVML (nvidia-ml-py).

What a budget means: on a CPU, the whole process's resident memory from start to exit, so the
plan counts the process as it stands before any model loads (`baseline_bytes`: interpreter,
torch, transformers). On CUDA, the device memory the process holds, its CUDA context included.
"""

import tomllib
from dataclasses import dataclass

from specmemo.errors import UnknownDevice
from specmemo.host import cpu_class, gpu_free_bytes
from specmemo.paths import profiles_dir


@dataclass(frozen=True)
class Kernels:
    """Which kernels and layouts this machine runs, as its device profile measured them fastest:
    decided once (by the command, from load_device) and handed to the loader and the model. Each
    is still checked against what runs here (a probe, a compiler) where it is used."""
    packed_q4: bool = False    # a GGUF with 4-bit layers runs packed (q4) by default
    packed_head: bool = False  # a bf16 LM head (q4's too) packed once for oneDNN (models/quant.py)
    packed_layers: tuple = ()  # dense dtypes whose layer matrices are packed once for oneDNN
    native_attention: bool = False  # half-precision exact attention through the compiled kernel (models/kernels/native.py)
    native_q4: bool = False    # q4 layer matrices through the compiled row-exact kernel (models/quant.NativeQ4)
    native_head: bool = False  # a q4 model's bf16 LM head through that kernel (models/quant.NativeHead)
    draft_head_weights: str = ""  # "int8": a draft head's matrices in int8 (models/quant.Int8Matrix)
    out_major_dtypes: tuple = ()  # dense dtypes whose matrices decode faster [out, in] (models/layout.py)

    @property
    def head_dtype(self) -> str:
        """What a draft head drafts in here, as RunningHead.for_machine builds it and the plan counts it."""
        return "bf16" if self.packed_head else "int8" if self.draft_head_weights == "int8" else "fp32"


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
    baseline_bytes: int = 0    # measured: the process before any model loads (CPU; 0 on CUDA)
    half_scratch_bytes: int = 0  # measured: extra scratch of bf16/fp16 kernels on this device
    graph_bytes: int = 0       # measured: fixed cost of CUDA-graph capture (0: no graphs on this device)
    kernels: Kernels = Kernels()  # measured kernel and layout choices for this machine (see Kernels)
    # A q4/q8 model's embedding and LM head held quantized too (footprint.weight_bytes), as GGUF files
    # hold them; False where the runtime holds them in half precision (the CPU: models/load.py).
    quantized_head: bool = True
    # measured: the target's forward time for n = 1.. tokens over one token's, per weight dtype
    # (`cost_curve_<dtype>` keys; bench/cost_curve.py). A device-wide fallback for pair profiles.
    cost_curves: tuple = ()    # ((dtype, (1.0, t(2)/t(1), ...)), ...)
    # A CPU's curves are those measured on CPUs of this machine's class (host.cpu_class),
    # else the profile's own class's, named as such in every source that quotes them.
    curve_class: str = ""      # the class the curves were measured on ("" on a GPU)
    cpu_class: str = ""        # this machine's class

    def cost_curve(self, dtype: str) -> tuple[float, ...]:
        return dict(self.cost_curves).get(dtype, ())

    def curve_source(self, dtype: str) -> str:
        if self.curve_class == self.cpu_class:
            return f"device profile ({dtype}{', ' + self.cpu_class + ' CPUs' if self.cpu_class else ''})"
        return f"device profile ({dtype}), measured on {self.curve_class} CPUs: none yet on this {self.cpu_class} one"


def _read(name: str) -> dict:
    path = profiles_dir() / "devices" / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (profiles_dir() / "devices").glob("*.toml")))
        raise UnknownDevice(f"unknown device {name!r}; known: {known}")
    return tomllib.loads(path.read_text())


def load_device(name: str) -> Device:
    data = _for_this_cpu(_read(name))
    if data.get("measured") == "psutil":
        import psutil

        # What is free now plus what this process already holds: the budget covers the whole process.
        memory = int(psutil.virtual_memory().available) + int(psutil.Process().memory_info().rss)
    elif data.get("measured") == "nvml":
        try:
            memory = gpu_free_bytes()
        except RuntimeError as e:
            raise UnknownDevice(str(e)) from None
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
        baseline_bytes=int(data.get("baseline_bytes", 0)),
        half_scratch_bytes=int(data.get("half_scratch_bytes", 0)),
        graph_bytes=int(data.get("graph_bytes", 0)),
        quantized_head=bool(data.get("quantized_head", True)),
        kernels=Kernels(
            packed_q4=bool(data.get("packed_q4", False)),
            packed_head=bool(data.get("packed_head", False)),
            packed_layers=tuple(data.get("packed_layers", ())),
            native_attention=bool(data.get("native_attention", False)),
            native_q4=bool(data.get("native_q4", False)),
            native_head=bool(data.get("native_head", False)),
            draft_head_weights=str(data.get("draft_head_weights", "")),
            out_major_dtypes=tuple(data.get("out_major_dtypes", ())),
        ),
        **_curves(data),
    )


def _for_this_cpu(data: dict) -> dict:
    """A CPU profile's keys as measured for this machine's class (host.cpu_class): its
    [classes.<class>] table, where there is one, overrides the top-level keys, which were measured
    on a CPU of class cost_curve_class. _class_of_curves: the class this machine's curves come
    from (its own where its table has curves, else the top-level ones')."""
    if data.get("kind") != "cpu":
        return data
    here, own = cpu_class(), data.get("cost_curve_class", "")
    table = data.get("classes", {}).get(here, {}) if here != own else {}
    own_curves = any(key.startswith("cost_curve_") for key in table)
    if own_curves:
        data = {k: v for k, v in data.items() if not k.startswith("cost_curve_")}
    return {**data, **table, "_class_of_curves": here if own_curves or not own else own, "_cpu_class": here}


def _curves(data: dict) -> dict:
    """The cost curves and, on a CPU, the classes they and this machine belong to."""
    curves = tuple((key.removeprefix("cost_curve_"), tuple(float(x) for x in value))
                   for key, value in data.items() if key.startswith("cost_curve_") and isinstance(value, list))
    return {"cost_curves": curves, "curve_class": data.get("_class_of_curves", ""), "cpu_class": data.get("_cpu_class", "")}


def default_dtype(kind: str) -> str:
    """The one place a device's default weight/compute dtype is chosen: fp32 on a CPU (its
    one-token kernels are fastest there; see profiles/devices/cpu.toml), bf16 on CUDA."""
    return "bf16" if kind == "cuda" else "fp32"


def default_weights(dev: Device, target_q4: bool, draft_q4: bool | None, dtype: str | None,
                    draft_dtype: str | None) -> tuple[str | None, str | None]:
    """The dtypes to run when none is asked for: q4 for a target whose GGUF layers are 4-bit
    (ModelRef.packed_q4) where the device profile measured packed 4-bit faster than dense; a draft
    that cannot run packed (draft_q4 False; None: no draft model) then gets the device's dense
    default where q4 runs (a CPU; elsewhere q4 is planned only, and the draft is planned in the
    target's format). None: the device's default. `plan`, `generate`, `chat` and `profile` all
    decide here."""
    if dtype is None and dev.kernels.packed_q4 and target_q4:
        dtype = "q4"
    if draft_dtype is None and draft_q4 is False and dtype == "q4" and dev.kind == "cpu":
        draft_dtype = default_dtype(dev.kind)
    return dtype, draft_dtype
