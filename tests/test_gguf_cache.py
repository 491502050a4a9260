"""The dense copy of a GGUF: refused before it is made when the model cannot run, one copy per file
content, no debris from killed conversions, ordinary file modes."""

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest



def tiny_gguf(path, arch: str, sliding_window: int = 0) -> None:
    """A one-layer GGUF's metadata and its embedding: enough to resolve and plan it."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(256)
    writer.add_vocab_size(96)
    if sliding_window:
        writer.add_sliding_window(sliding_window)
    writer.add_tensor("token_embd.weight", np.zeros((96, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_an_architecture_that_cannot_run_is_refused_before_any_conversion(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMEMO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "windowed.gguf"
    tiny_gguf(path, "mistral", sliding_window=32)
    r = cli("generate", "--target", path, "--prompt", "Hi", "--draft", "ngram", "-m", "4")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "sliding-window attention (32 tokens)" in lines[0]
    assert not (tmp_path / "cache" / "dense").exists() or not any((tmp_path / "cache" / "dense").glob("windowed-*"))


@pytest.mark.slow
def test_one_copy_per_content_and_no_debris_from_killed_conversions(tmp_path):
    from specmemo.models.gguf_cache import dense_dir, ensure_dense
    from specmemo.models.resolve import resolve

    ref = resolve("smollm2-135m-instruct")
    source = Path(ref.location) / ref.gguf_file
    copy = ensure_dense(source)
    root = copy.parent
    # A conversion killed with -9 (its process is gone) and a copy no file maps to any more.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = root / f"{copy.name}.{dead.pid}.x1y2z3"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    orphan = root / "Gone-0123456789abcdef"
    orphan.mkdir()
    assert ensure_dense(source) == copy
    assert not debris.exists() and not orphan.exists() and copy.exists()
    # The same bytes under another name share the copy: no second conversion.
    twin = tmp_path / "twin.gguf"
    shutil.copyfile(source, twin)
    assert dense_dir(twin) == copy
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in copy.iterdir()}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.slow
def test_a_conversion_dies_with_the_process_that_asked_for_it_and_leaves_nothing(tmp_path):
    """kill -9 of the process that asked for a conversion: the converting child follows (SIGTERM
    through PR_SET_PDEATHSIG) and removes its temporary directory on the way out."""
    import os
    import time

    from specmemo.models.resolve import resolve

    ref = resolve("smollm2-135m-instruct")
    data = bytearray((Path(ref.location) / ref.gguf_file).read_bytes())
    at = data.find(b"SmolLM2")
    data[at] = ord("X")                      # other bytes (a metadata string): no copy of it exists yet
    other = tmp_path / "other.gguf"
    other.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    env = {**os.environ, "SPECMEMO_CACHE": str(cache)}
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from specmemo.models.gguf_cache import ensure_dense; ensure_dense(Path(sys.argv[1]))",
                               str(other)], env=env, stderr=subprocess.DEVNULL)

    def in_flight():
        return list((cache / "dense").glob("*.*.*")) if (cache / "dense").is_dir() else []

    deadline = time.monotonic() + 180
    while not in_flight() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert in_flight(), "the conversion never started"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not in_flight() and not any((cache / "dense").glob("other-*"))

    def converting():
        return subprocess.run(["pgrep", "-f", f"specmemo.models.gguf_cache {other}"], capture_output=True,
                              text=True).stdout.strip()

    while converting() and time.monotonic() < deadline:   # the child may still be on its way out
        time.sleep(0.2)
    assert converting() == ""


def test_a_conversion_that_fails_says_so_in_one_line(cli, tmp_path, monkeypatch):
    """Not "cannot load the tokenizer of …": the conversion's own failure, naming the file."""
    monkeypatch.setenv("SPECMEMO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "untokenized.gguf"
    tiny_gguf(path, "llama")                  # a valid file transformers cannot convert: no tokenizer, one tensor
    r = cli("generate", "--target", path, "--prompt", "Hi", "--draft", "ngram", "-m", "4")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and lines[-1].startswith("error: could not convert untokenized.gguf")
    assert "tokenizer of" not in r.stderr and not list((tmp_path / "cache" / "dense").glob("*.*.*"))
