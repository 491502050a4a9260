"""Quality of quantized weights against the fp32 reference, teacher-forced on real prompts.

The reference is our decoder in fp32 on SmolLM2-135M-Instruct's GGUF dequantized to fp32 (what
`--dtype fp32` runs). For the first turn of each MT-Bench question in its chat template followed
by the reference's own greedy reply (64 tokens), every candidate predicts every next token and we
report top-1 agreement with the reference and the mean KL(reference ‖ candidate) in nats:
  q4     what `--dtype q4` runs: the file's Q4_1 matrices packed, bf16 activations (models/quant.py)
  bf16   the reference weights in bf16 (`--dtype bf16`)
  q8     the reference's layer matrices rounded through specmemo's q8 (group 32, scale and zero,
         models/quant.q8_groups), fp32 compute: the format's quality; the engine does not run q8 yet
  Q8_0   the same through GGUF's Q8_0 (symmetric, scale only; gguf-py), for comparison
Usage: python bench/quant_quality.py [--limit N] [--prompts FILE] [--reply-tokens 64]
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specmemo.budget.fit import fit  # noqa: E402
from specmemo.memory.allocator import allocate_target  # noqa: E402
from specmemo.budget.devices import load_device  # noqa: E402
from specmemo.models.load import load_model  # noqa: E402
from specmemo.models.quant import q8_dequantize, q8_groups  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.models.text import encode_prompt, stop_ids  # noqa: E402
from specmemo.profiling.prompts import load_prompts  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """[out, in] through GGUF's Q8_0 and back."""
    import gguf

    kind = gguf.GGMLQuantizationType.Q8_0
    back = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind).reshape(w.shape)
    return torch.from_numpy(back.copy())


def rounded(model, through):
    """The fp32 model with each layer matrix [out, in] replaced by through(matrix) (per output row,
    groups of 32)."""
    import copy

    out = copy.copy(model)
    out.layers = []
    for layer in model.layers:
        new = copy.copy(layer)
        for name in ("w_qkv", "w_o", "w_gate_up", "w_down"):
            w = getattr(layer, name).t().contiguous()                         # [out, in]
            setattr(new, name, through(w).t().contiguous())
        out.layers.append(new)
    return out


def teacher_forced(model, seq: list[int], arch) -> torch.Tensor:
    """fp32 logits [T, V] for every position of seq, in chunks of 256."""
    report = fit(arch, None, "none", context=len(seq), dtype="fp32", sampling=False, budget=1 << 40)
    store = allocate_target(report.plan, model.dtype, "cpu")
    return torch.cat([model(store, torch.tensor([seq[i:i + 256]]), len(seq[i:i + 256]))[0]
                      for i in range(0, len(seq), 256)])


def greedy(model, prompt: list[int], n: int, arch, stops: set[int]) -> list[int]:
    report = fit(arch, None, "none", context=len(prompt) + n, dtype="fp32", sampling=False, budget=1 << 40)
    store = allocate_target(report.plan, model.dtype, "cpu")
    seq = list(prompt)
    logits = model(store, torch.tensor([seq]), 1)[0, -1]
    for _ in range(n):
        seq.append(int(logits.argmax()))
        if seq[-1] in stops:
            break
        logits = model(store, torch.tensor([seq[-1:]]), 1)[0, -1]
    return seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--reply-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(MT_BENCH) if MT_BENCH.exists() else None)
    args = ap.parse_args()
    ref_model = resolve("smollm2-135m-instruct")
    fp32 = load_model(ref_model, "fp32", forward="specmemo", kernels=load_device("cpu").kernels)
    tok, arch = fp32.tokenizer, ref_model.arch
    candidates = {"q4": load_model(ref_model, "q4", with_tokenizer=False, kernels=load_device("cpu").kernels).model,
                  "bf16": load_model(ref_model, "bf16", with_tokenizer=False, forward="specmemo", kernels=load_device("cpu").kernels).model,
                  "q8": rounded(fp32.model, lambda w: q8_dequantize(*q8_groups(w))),
                  "Q8_0": rounded(fp32.model, q8_0)}
    stops = stop_ids(tok, fp32.model)
    convs = load_prompts(args.prompts, args.limit)
    totals = {name: {"agree": 0, "kl": 0.0} for name in candidates}
    positions = 0
    with torch.inference_mode():
        for i, conv in enumerate(convs):
            seq = greedy(fp32.model, encode_prompt(tok, conv.turns[0], chat=True), args.reply_tokens, arch, stops)
            ref = teacher_forced(fp32.model, seq, arch)
            logp = torch.log_softmax(ref, -1)
            positions += len(seq)
            for name, model in candidates.items():
                got = teacher_forced(model, seq, arch)
                totals[name]["agree"] += int((got.argmax(-1) == ref.argmax(-1)).sum())
                totals[name]["kl"] += float((logp.exp() * (logp - torch.log_softmax(got, -1))).sum())
            print(f"{i + 1}/{len(convs)}", file=sys.stderr, flush=True)
    print(f"{len(convs)} prompts, {positions} positions (prompt + the fp32 reference's greedy reply)\n")
    print("| weights | what runs | top-1 agreement with fp32 | mean KL (nats) |")
    print("|---|---|---:|---:|")
    what = {"q4": "Q4_1 packed, bf16 activations", "bf16": "bf16 weights and activations",
            "q8": "q8-rounded matrices (scale and zero per group), fp32 (format only)",
            "Q8_0": "GGUF Q8_0-rounded matrices (scale only), fp32 (format only)"}
    for name, t in totals.items():
        print(f"| {name} | {what[name]} | {t['agree'] / positions:.2%} | {t['kl'] / positions:.4f} |")


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("quant_quality"):
        main()
