"""A trained draft head for one target (EAGLE / Clover style, small enough for a CPU).

It drafts from the target's own state instead of a second model: given the target's last hidden
state h (before the final norm) at the token that chose x, and x itself, it predicts the hidden
state the target will have at x, and from it the next token, regressively over depth:

    f_1 = block(h, embed(x))          next token d_1 = argmax over the head's vocabulary of f_1
    f_2 = block(f_1, embed(d_1))      d_2 from f_2, and so on

block: RMSNorm each input, one fused linear [2E -> E], then a SwiGLU MLP with a residual.
The target's embedding, final norm and LM head are reused (frozen); the output covers only
the `vocab` most frequent tokens of the target's own replies, so a draft step costs a few
percent of a target step. No KV of its own: the head keeps one hidden state between steps.
Training works on DraftHead and TargetParts (fp32); drafting runs RunningHead (half precision
packed where the machine packs it).

Shapes: E = the target's hidden size, I = the head's MLP width, Vh = the head's vocabulary.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specmemo.atomic import atomic_write
from specmemo.errors import BadInput


def unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., E] scaled to unit RMS (a weightless RMSNorm, in fp32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def times(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w for a plain [in, out] tensor or a PackedMatrix (called directly: `x @ packed` reaches
    __rmatmul__ only after Tensor.__matmul__ fails, 15-20 µs a product)."""
    return w.times(x) if hasattr(w, "times") else x @ w


def block(h, x_embed, norm_h, norm_x, fuse, norm_m, gate_up, down) -> torch.Tensor:
    """The head's block, for training (DraftHead) and drafting (RunningHead) alike: h, x_embed
    [..., E] -> the predicted hidden state [..., E]. Matrices [in, out], plain or packed."""
    z = times(torch.cat([unit_rms(h) * norm_h, unit_rms(x_embed) * norm_x], dim=-1), fuse)
    gate, up = times(unit_rms(z) * norm_m, gate_up).chunk(2, dim=-1)
    return z + times(F.silu(gate) * up, down)


class DraftHead(nn.Module):
    """The head's own weights (fp32). The target's pieces it reads are passed in (TargetParts)."""

    def __init__(self, hidden: int, inner: int, vocab: torch.Tensor):
        """hidden: E; inner: I; vocab: [Vh] token ids the head can propose (int64)."""
        super().__init__()
        self.norm_h = nn.Parameter(torch.ones(hidden))
        self.norm_x = nn.Parameter(torch.ones(hidden))
        self.fuse = nn.Linear(2 * hidden, hidden, bias=False)       # [E, 2E]
        self.norm_m = nn.Parameter(torch.ones(hidden))
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)     # [2I, E]
        self.down = nn.Linear(inner, hidden, bias=False)            # [E, I]
        self.register_buffer("vocab", vocab.to(torch.int64))

    def block(self, h: torch.Tensor, x_embed: torch.Tensor) -> torch.Tensor:
        """h, x_embed [..., E] fp32 -> the predicted hidden state [..., E] at the token embedded."""
        return block(h, x_embed, self.norm_h, self.norm_x, self.fuse.weight.t(), self.norm_m,
                     self.gate_up.weight.t(), self.down.weight.t())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])


class TargetParts:
    """What the head borrows from the target, in fp32: its head's rows for the head's vocabulary
    [Vh, E] (a copy: the plan counts it) and its final norm. The embedding is gathered per token."""

    def __init__(self, model, vocab: torch.Tensor):
        """model: our decoder (models/llama.py), any dtype."""
        self.model = model
        self.rows = model.head_rows(vocab).float().contiguous()                            # [Vh, E]
        self.norm = model.norm.float()                                                      # [E]
        self.eps = model.cfg.rms_eps

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., E] fp32."""
        return self.model.embed_tokens(ids.reshape(1, -1)).float().reshape(*ids.shape, -1)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., E] -> logits over the head's vocabulary [..., Vh], as the target's head would give
        them (its final RMSNorm, then its rows)."""
        return (unit_rms(f, self.eps) * self.norm) @ self.rows.t()




class RunningHead:
    """The head as a drafter runs it: its three matrices and the target's rows for its vocabulary
    in `dtype`, each packed once for oneDNN when `packed` (models/quant.PackedMatrix), or in int8
    (models/quant.Int8Matrix). A step of the default model's head: Zen 4 host, 28 Nov 2026 (Vh
    6,666), 0.56 ms bf16 packed against 2.9 ms in fp32 (the target's step: 12-14 ms); AVX2 host
    (Vh 8,192), 1.09 ms int8 against 3.0 ms in fp32 (the target's: 31 ms). Drafts need not round
    like training did: verification decides what is kept."""

    def __init__(self, head: DraftHead, model, dtype: torch.dtype = torch.float32, packed: bool = False,
                 int8: bool = False):
        """model: the target, our decoder (its embedding, final norm and LM-head rows). int8: the
        matrices in int8 (models/quant.Int8Matrix), the rest in bf16."""
        from specmemo.models.quant import Int8Matrix, PackedMatrix

        dtype = torch.bfloat16 if int8 else dtype
        self.model, self.dtype, self.eps = model, dtype, model.cfg.rms_eps
        self.vocab = head.vocab
        norms = [head.norm_h, head.norm_x, head.norm_m, model.norm]
        self.norm_h, self.norm_x, self.norm_m, self.norm = (n.detach().to(dtype) for n in norms)
        operands = [head.fuse.weight.t(), head.gate_up.weight.t(), head.down.weight.t(),
                    model.head_rows(head.vocab).t()]                                    # each [in, out]
        if int8:
            self.fuse, self.gate_up, self.down, self.rows = (Int8Matrix(w) for w in operands)
        else:
            as_dtype = [w.detach().to(dtype).contiguous() for w in operands]
            self.fuse, self.gate_up, self.down, self.rows = (PackedMatrix(w) for w in as_dtype) if packed else as_dtype

    @classmethod
    def for_machine(cls, head: DraftHead, model) -> "RunningHead":
        """As models/quant.draft_head_weights decides for this CPU from the target's kernels: bf16
        packed, int8, or fp32 as trained (and on a GPU)."""
        from specmemo.models.quant import draft_head_weights

        weights = draft_head_weights(model.kernels) if model.device.type == "cpu" else "fp32"
        if weights == "bf16":
            return cls(head, model, torch.bfloat16, packed=True)
        return cls(head, model, int8=weights == "int8")

    def step(self, h: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [n, E] (any dtype), token_ids [n] -> (predicted states [n, E], logits [n, Vh] fp32)."""
        x = self.model.embed_tokens(token_ids.reshape(1, -1))[0].to(self.dtype)                # [n, E]
        f = block(h.to(self.dtype), x, self.norm_h, self.norm_x, self.fuse, self.norm_m, self.gate_up, self.down)
        return f, times(unit_rms(f, self.eps) * self.norm, self.rows).float()

    def nbytes(self) -> int:
        mats = [self.fuse, self.gate_up, self.down, self.rows]
        tensors = [t for m in mats for t in (m.tensors() if hasattr(m, "tensors") else [m])]
        tensors += [self.norm_h, self.norm_x, self.norm_m, self.norm, self.vocab]
        return sum(t.numel() * t.element_size() for t in tensors)


# -- files ---------------------------------------------------------------------------------------

def save_head(path: Path, head: DraftHead, card: dict) -> None:
    """safetensors with the card as metadata, written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    meta = {"card": json.dumps(card), "hidden": str(head.fuse.out_features), "inner": str(head.down.in_features)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_head(path: Path) -> tuple[DraftHead, dict]:
    """(head, card) from a safetensors file written by save_head."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise BadInput(f"{path}: not a draft head file ({e})") from None
    if "hidden" not in meta or "vocab" not in tensors:
        raise BadInput(f"{path}: not a draft head file (no head metadata)")
    head = DraftHead(int(meta["hidden"]), int(meta["inner"]), tensors["vocab"])
    head.load_state_dict(tensors)
    head.requires_grad_(False)
    return head, json.loads(meta.get("card", "{}"))
