"""Verification: which draft tokens the target accepts (Leviathan et al. 2023; Chen et al. 2023).

Notation: p = target distribution, q = draft distribution, k = draft length.
A step's output is the accepted draft tokens plus one more token: the *recovered* token, drawn
from norm(max(0, p − q)) at the first rejection, or the *bonus* token, drawn from p after the
last position when every draft token was accepted. This keeps the output distributed exactly
as the target's; greedy verification keeps it token-identical to plain greedy decoding.
"""

import torch


def verify_greedy(target_logits: torch.Tensor, draft: torch.Tensor) -> tuple[int, int]:
    """target_logits: [k+1, V]; draft: [k]. Accept the longest prefix equal to the target's argmax,
    then append the target's own next token. Returns (accepted count, next token)."""
    choice = target_logits.argmax(-1)                       # [k+1]
    k = draft.shape[0]
    mismatch = (choice[:k] != draft).nonzero()
    a = int(mismatch[0]) if mismatch.numel() else k
    return a, int(choice[a])


def verify_sampling(
    p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """p: [k+1, V] target probabilities; q: [k, V] draft probabilities, or None when the drafter
    proposes deterministically (n-gram lookup), i.e. q is a point mass on each draft token.
    Accept draft token i with probability min(1, p_i(x_i) / q_i(x_i))."""
    k = draft.shape[0]
    idx = torch.arange(k, device=p.device)
    p_draft = p[idx, draft]
    q_draft = q[idx, draft] if q is not None else torch.ones_like(p_draft)
    u = torch.rand(k, generator=generator, device=p.device)
    rejected = (u * q_draft >= p_draft).nonzero()         # accept iff u < p/q, without dividing by zero
    a = int(rejected[0]) if rejected.numel() else k
    if a == k:
        dist = p[k]                                                        # bonus
    else:
        q_a = q[a] if q is not None else torch.nn.functional.one_hot(draft[a], p.shape[-1]).to(p.dtype)
        residual = torch.clamp(p[a] - q_a, min=0)                          # recovered
        dist = residual if residual.sum() > 0 else p[a]
    return a, int(torch.multinomial(dist, 1, generator=generator))


def verify_tree_greedy(target_logits: torch.Tensor, tokens: list[int], tree) -> tuple[list[int], int]:
    """target_logits: [n, V] for the n nodes of a candidate tree (memory/attention.CandidateTree),
    tokens: each node's token (the root's first). From the root, follow the child whose token is
    the target's argmax while there is one. Returns (accepted path of node indices, root first;
    the target's next token after it): exactly the tokens plain greedy decoding would produce."""
    choice = target_logits.argmax(-1).tolist()
    path = [0]
    while True:
        want = choice[path[-1]]
        follow = next((c for c in tree.children(path[-1]) if tokens[c] == want), None)
        if follow is None:
            return path, want
        path.append(follow)


def verify_tree_sampling(p: torch.Tensor, tokens: list[int], tree, generator: torch.Generator | None
                         ) -> tuple[list[int], int]:
    """p: [n, V] target probabilities for the n nodes of a candidate tree, tokens: each node's token
    (the root's first). Candidates are proposed deterministically (a draft head's top-k: a point
    mass each), so a node's children are tried in rank order with SpecInfer's multi-step rejection:
    child c is accepted with probability r(c) / Σr, r the node's distribution with the tokens of
    the children already rejected removed; when none is accepted (or the node is a leaf) the next
    token is drawn from that residual. Child i is then taken with probability exactly p(c_i) and any
    other token likewise, so every emitted token follows the target. Returns (accepted path of node
    indices, root first; the next token after it)."""
    path = [0]
    while True:
        residual = p[path[-1]].clone()
        follow = None
        for child in tree.children(path[-1]):
            mass = residual[tokens[child]]
            if torch.rand((), generator=generator, device=p.device) * residual.sum() < mass:
                follow = child
                break
            residual[tokens[child]] = 0
        if follow is None:
            return path, int(torch.multinomial(residual, 1, generator=generator))
        path.append(follow)
