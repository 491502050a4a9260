"""Memory at a 4,096-token context with a model draft: specmemo against HF assisted generation.

Writes a prompt file of real text (MT-Bench questions, else the shipped prompts) whose first turn
fills about 3,950 tokens of SmolLM2's chat template, then runs `specmemo profile` with the
target's own weights in bf16 as a stand-in draft, 128 new tokens, one turn.
Usage: python bench/long_context.py --out out/long-context [--conversations 2] [--kv-dtype bf16] [--dtype fp32]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from memory import filler  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--kv-dtype", default=None, help="specmemo's KV dtype (bf16 halves the target's KV)")
    ap.add_argument("--dtype", default="fp32", help="the target's weights (profile's own default is chat's, q4)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = filler(args.context - 128 - 40)
    prompts = out / "long_prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(args.conversations):
            words = text.split()
            rotated = " ".join(words[i * 50 :] + words[: i * 50])  # different text per conversation
            f.write(json.dumps({"question_id": i + 1, "category": "long", "turns": [
                f"Read this text and then summarize it in three sentences.\n\n{rotated}"]}) + "\n")
    cmd = [sys.executable, "-m", "specmemo", "profile", "--target", "smollm2-135m-instruct",
           "--draft", "smollm2-135m-instruct", "--draft-dtype", "bf16", "--prompts", str(prompts), "--turns", "1",
           "--max-new-tokens", "128", "--engines", "specmemo,hf-ar,hf-assisted", "--dtype", args.dtype, "--out", str(out)]
    if args.kv_dtype:
        cmd += ["--kv-dtype", args.kv_dtype]
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("long_context"):
        main()
