"""One speculative step after the target's forward, as both engines take it (engine.py for one
sequence, batch.py for a row of a batch): verify the chain, then clip and commit.

    verify  accepted drafts d_1..d_a and one more token (recovered or bonus; verify.py)
    clip    cut the step's tokens to the budget left and after a stop token
    commit  append them to S and move the KV store's length (and the drafter's) back to
            len(S) − 1: rejected candidates are a pointer move, never a copy
"""

import torch

from specmemo.decoding.events import Step, clip
from specmemo.decoding.sampling import SamplingConfig
from specmemo.decoding.verify import verify_greedy, verify_sampling


def verify_chain(logits: torch.Tensor, proposal, sampling: SamplingConfig, generator) -> tuple[int, int]:
    """logits [k+1, V] of [S[-1], d_1..d_k] -> (accepted count a, the next token)."""
    if sampling.greedy:
        return verify_greedy(logits, proposal.tokens)
    return verify_sampling(sampling.probs(logits), proposal.q, proposal.tokens, generator)


def settle(step: Step, budget: int, stop_ids, sequence: list[int], store, drafter) -> tuple[Step, str]:
    """Clip `step` to `budget` tokens and the first stop token, commit what is left to `sequence`,
    `store` and `drafter`. Returns the committed step and why the sequence stopped ("stop_token"
    or "")."""
    tokens, reason = clip(step.tokens, budget, stop_ids)
    sequence.extend(tokens)
    store.trim(len(sequence) - 1)
    drafter.rollback(len(sequence) - 1)
    return Step(tokens, step.drafted, min(step.accepted, len(tokens)), step.ranks, step.lookup, step.sequence), reason
