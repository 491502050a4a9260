"""A faster CPU weight layout for decoding: linear weights stored transposed, [in, out].

On a CPU, a one-token decode step is a chain of matrix-vector products. torch's `F.linear(x, W)`
with W [out, in] runs them on one core (15.8 GB/s on a 2-core EPYC for SmolLM2's 113 MB LM head),
while `x @ Wt` with Wt [in, out] contiguous splits the columns across cores (28 GB/s). Same
arithmetic, same parameters, same memory: the copy replaces the original, one matrix at a time.
A tied input embedding gathers its rows from the LM head's transposed matrix, so tied weights
stay one matrix.
"""

import torch
from torch import nn

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16 as device profiles name them ("" for any other)."""
    return _DTYPE_NAMES.get(dtype, "")


def out_major(dtype: torch.dtype, device, kernels) -> bool:
    """Whether our decoder stores `dtype` matrices [out, in] and multiplies by their transposed
    view (torch's Linear layout) rather than [in, out] contiguous: on a CPU, as the device profile
    measured (Kernels.out_major_dtypes, bench/weight_layout.py; on the Zen 4 host fp16 [in, out] took 316
    ms per pass against 9.6, and bf16 [in, out] was neither faster nor row-exact); elsewhere never
    (the layout the GPU check measured)."""
    if torch.device(device).type != "cpu":
        return False
    return dtype_name(dtype) in kernels.out_major_dtypes


class TransposedLinear(nn.Module):
    def __init__(self, weight_t: nn.Parameter, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = weight_t   # [in, out]
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class TransposedEmbedding(nn.Module):
    """Rows of the vocabulary table, read from its transpose (shared with a tied LM head)."""

    def __init__(self, weight_t: nn.Parameter):
        super().__init__()
        self.weight_t = weight_t   # [hidden, vocab]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_t.index_select(1, ids.reshape(-1)).t().reshape(*ids.shape, -1)


def _transposed(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w.detach().t().contiguous(), requires_grad=False)


@torch.no_grad()
def transpose_linears(model: nn.Module) -> None:
    """Swap every nn.Linear for a TransposedLinear in place (CPU decoding)."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if tied and child is head:
                    continue
                setattr(module, name, TransposedLinear(_transposed(child.weight), child.bias))
                child.weight = None  # release the original now, not at the end
    if tied:
        shared = _transposed(head.weight)
        model.set_output_embeddings(TransposedLinear(shared, head.bias))
        model.set_input_embeddings(TransposedEmbedding(shared))
