"""Turning logits into the distribution a token is drawn from.

The same `SamplingConfig.probs` is applied to the target's logits (p) and the draft's (q), so
acceptance compares the distributions the tokens were actually drawn from.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 means greedy
    top_k: int = 0             # 0 means off
    top_p: float = 1.0         # 1 means off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [R, V] fp32 -> probabilities [R, V] after temperature, top-k and top-p."""
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
            drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """The next token from the last row of logits [R, V]: argmax, or drawn from probs."""
        if self.greedy:
            return int(logits[-1].argmax())
        return int(torch.multinomial(self.probs(logits[-1:])[0], 1, generator=generator))

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g
