"""A dense safetensors copy of a GGUF model, made once.

transformers dequantizes GGUF on every load and parses its metadata three times (config,
tokenizer, weights): about 15 s for SmolLM2-135M on a laptop CPU. We do that once and keep the
result as a normal HF directory (config, safetensors, tokenizer), written to a temporary
directory and renamed into place so a crash never leaves a half-written copy.

One copy per file content: the key is a hash of the GGUF's bytes (computed once per path, size and
mtime, and remembered in index.json), so two paths to one file share a copy, and a copy no live
file maps to is removed. A conversion's temporary directory carries its process id: one whose
process is gone (killed, even with -9) is removed by the next run; the converting child dies with
the process that asked for it.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from specmemo.paths import cache_root


def _index_path() -> Path:
    return cache_root() / "dense" / "index.json"


def _read_index() -> dict:
    import json

    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def content_key(gguf_path: Path) -> str:
    """A hash of the file's bytes, remembered per (path, size, mtime): read once per file."""
    import json

    from specmemo.atomic import atomic_write_text

    path = gguf_path.resolve()
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    index = _read_index()
    if index.get(str(path), {}).get("stamp") == stamp:
        return index[str(path)]["key"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    key = digest.hexdigest()[:16]
    index[str(path)] = {"stamp": stamp, "key": key, "stem": path.stem}
    _index_path().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_index_path(), json.dumps(index, indent=1) + "\n")
    return key


def dense_dir(gguf_path: Path) -> Path:
    """The copy for this file's content: an existing one under any file's name, else one named
    after this file."""
    key = content_key(gguf_path)
    root = cache_root() / "dense"
    made = sorted(p for p in root.glob(f"*-{key}") if (p / "config.json").exists()) if root.is_dir() else []
    return made[0] if made else root / f"{gguf_path.stem}-{key}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tidy() -> None:
    """Remove temporary directories of conversions whose process is gone, and copies that no
    remembered file (still there, unchanged) maps to."""
    root = cache_root() / "dense"
    if not root.is_dir():
        return
    live = set()   # the keys of files still there, unchanged
    for path, entry in _read_index().items():
        try:
            st = Path(path).stat()
        except OSError:
            continue
        if f"{st.st_size}:{st.st_mtime_ns}" == entry.get("stamp"):
            live.add(entry["key"])
    for child in root.iterdir():
        if not child.is_dir():
            continue
        parts = child.name.rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit():          # <copy>.<pid>.<random>: a conversion in flight
            if not _alive(int(parts[1])):
                shutil.rmtree(child, ignore_errors=True)
        elif child.name.rpartition("-")[2] not in live:
            shutil.rmtree(child, ignore_errors=True)


def _die_with_parent() -> None:
    """In the converting child: SIGTERM when the parent dies (Linux), so no orphan keeps converting."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def ensure_dense(gguf_path: Path, trust_remote_code: bool = False) -> Path:
    """The dense copy's directory, creating it from the GGUF if needed, in a child process: the
    conversion holds the dequantized model twice (about 2.5× the fp32 weights), which must not
    count against the budget of the process that then runs the model."""
    final = dense_dir(gguf_path)
    tidy()
    if (final / "config.json").exists():
        return final
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "specmemo.models.gguf_cache", str(gguf_path)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    sys.stderr.write(f"converting {gguf_path.name} once into {final.parent} …\n")
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_die_with_parent)
    if done.returncode != 0 or not (final / "config.json").exists():
        last = [l for l in done.stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
        raise ValueError(f"could not convert {gguf_path.name}: {last[0]}")
    return final


def convert(gguf_path: Path, trust_remote_code: bool = False) -> Path:
    """Dequantize the GGUF with transformers and save it as safetensors (this process)."""
    final = dense_dir(gguf_path)
    if (final / "config.json").exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.{os.getpid()}.", dir=final.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": trust_remote_code}
        # fp32 holds the dequantized values exactly; other dtypes are cast at load time.
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        model.config.quantization_config = None  # the copy is dense: no GGUF quantizer on reload
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(tmp)
        _usual_modes(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _usual_modes(directory: Path) -> None:
    """A copy readable as any other cached file is (a temporary directory is 0700, and some
    writers make their files 0600): 0755 for the directory, 0644 for its files, less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o755 & ~mask)
    for f in directory.iterdir():
        f.chmod(0o644 & ~mask)


if __name__ == "__main__":
    import signal
    import sys

    # A signal ends the conversion through its cleanup (the temporary directory is removed).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    convert(Path(sys.argv[1]), trust_remote_code="--trust-remote-code" in sys.argv[2:])
