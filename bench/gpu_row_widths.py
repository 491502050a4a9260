"""What a fixed step width costs on a GPU (models/graphs.py): ms per graphed one-token step of a
target run at widths 1..16, random weights, 1,920 tokens in the store.
Usage: python bench/gpu_row_widths.py   (on a GPU)"""

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import hf_config  # noqa: E402
from specmemo.budget.plan import PlanRequest, make_plan  # noqa: E402
from specmemo.memory import allocator  # noqa: E402
from specmemo.models import graphs  # noqa: E402
from specmemo.models.load_safetensors import own_from_transformers  # noqa: E402
from specmemo.models.resolve import resolve  # noqa: E402
from specmemo.models.synthetic import random_model  # noqa: E402

for alias, dtype in [("smollm2-1.7b-instruct", torch.bfloat16), ("llama-2-7b-chat", torch.float16)]:
    own = own_from_transformers(random_model(hf_config(alias), 0, dtype, "cuda"))
    plan = make_plan(PlanRequest(target=resolve(alias).arch, draft=None, drafter="none", context=2048,
                                 draft_len=0, draft_window=0, dtype="fp16"))
    row = []
    for width in (1, 2, 4, 6, 8, 12, 16):
        store = allocator.allocate_target(plan, dtype, "cuda")
        g = graphs.GraphedForward(own, rows=width)
        g(store, torch.randint(0, 1000, (1, 1920), device="cuda"), 1)
        ids = torch.randint(0, 1000, (1, 1), device="cuda")
        for _ in range(5):
            g(store, ids, 1); store.length -= 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            g(store, ids, 1); store.length -= 1
        torch.cuda.synchronize()
        row.append(f"{width}: {(time.perf_counter() - t0) * 10:.2f} ms")
        del g, store
    print(alias, str(dtype), "| ".join(row), flush=True)
    del own
    torch.cuda.empty_cache()
