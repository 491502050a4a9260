"""Time one packed forward (LlamaModel.forward_rows) over B rows of n tokens each, the batch
engine's step, on the default model: the table behind the README's "what limits batching".

    python bench/batch_forward.py --dtype fp32      # or q4, bf16; --kv-dtype to store K/V otherwise

Each row first holds a 200-token history; every timed forward adds n tokens per row and is then
trimmed away (a pointer move), so the history stays 200. The minimum of --reps forwards is printed.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specmemo.decoding.sampling import SamplingConfig
from specmemo.pipeline import RunRequest, open_pipeline
from specmemo.host import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    rt = open_pipeline(RunRequest("smollm2-135m-instruct", "none", context=400, dtype=args.dtype, kv_dtype=args.kv_dtype,
                                  sampling=SamplingConfig(), forward="specmemo", batch=8))
    model, rows = rt.target.model, rt.engine.rows
    for row in rows:
        model.forward_rows([row], [list(range(100, 300))], [1])

    def ms(batch: int, n: int) -> float:
        times = []
        for _ in range(args.reps):
            for row in rows[:batch]:
                row.trim(200)
            t0 = time.perf_counter()
            model.forward_rows(rows[:batch], [[5] * n] * batch, [n] * batch)
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    print(f"host: {cpu_name()}; {args.dtype}; ms per packed forward (rows × tokens per row)")
    for batch in (1, 2, 4, 8):
        print(f"B={batch}: " + "  ".join(f"n={n}: {ms(batch, n):.1f}" for n in (1, 2, 3, 4, 6)), flush=True)


if __name__ == "__main__":
    from bench.result import recorded

    with recorded("batch_forward"):
        main()
