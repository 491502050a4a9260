"""A dense safetensors copy of a GGUF model, made once.

transformers dequantizes GGUF on every load and parses its metadata three times (config,
tokenizer, weights): about 15 s for SmolLM2-135M on a laptop CPU. We do that once and keep the
result as a normal HF directory (config, safetensors, tokenizer), written to a temporary
directory and renamed into place so a crash never leaves a half-written copy.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from specmemo.paths import cache_root


def dense_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "dense" / f"{gguf_path.stem}-{key}"


def ensure_dense(gguf_path: Path, trust_remote_code: bool = False) -> Path:
    """The dense copy's directory, creating it from the GGUF if needed, in a child process: the
    conversion holds the dequantized model twice (about 2.5× the fp32 weights), which must not
    count against the budget of the process that then runs the model."""
    final = dense_dir(gguf_path)
    if (final / "config.json").exists():
        return final
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "specmemo.models.gguf_cache", str(gguf_path)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    sys.stderr.write(f"converting {gguf_path.name} once into {final.parent} …\n")
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": trust_remote_code}
        # fp32 holds the dequantized values exactly; other dtypes are cast at load time.
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        model.config.quantization_config = None  # the copy is dense: no GGUF quantizer on reload
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


if __name__ == "__main__":
    import sys

    convert(Path(sys.argv[1]), trust_remote_code="--trust-remote-code" in sys.argv[2:])
