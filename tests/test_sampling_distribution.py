"""Speculative sampling follows the target distribution (the vLLM rejection-sampler test style:
compare empirical token histograms against the target's own probabilities).

p and q come from two different tiny random models at the same prompt. For each of N = 20,000
draws we draft d ~ q, verify, and record the first two output tokens. Their histograms must
match p's first-token marginal and p's second-token marginal within a total-variation bound
derived from N: E[TV] ≤ ½ Σ_i sqrt(p_i(1 − p_i)/N); we allow 3× that.
"""

import pytest
import torch

from specmemo.decoding.sampling import SamplingConfig
from specmemo.decoding.verify import verify_sampling, verify_tree_sampling
from specmemo.memory.attention import CandidateTree
from tests.tiny import VOCAB, make_engine, run, tiny

N = 20_000
TARGET = tiny(0, scale=4.0)
DRAFT = tiny(7, scale=4.0)
PROMPT = [5, 17, 3, 44, 9, 17, 3]


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def bound(p: torch.Tensor) -> float:
    return 3 * 0.5 * float(torch.sqrt(p * (1 - p) / N).sum())


def histogram(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=VOCAB).double() / len(tokens)


@torch.no_grad()
def distributions(cfg: SamplingConfig):
    ids = torch.tensor([PROMPT])
    p0 = cfg.probs(TARGET()(ids).logits[0, -1:].float())[0].double()
    q0 = cfg.probs(DRAFT()(ids).logits[0, -1:].float())[0]
    # p1[x]: the target's next distribution after the prompt and token x, for every x.
    ext = torch.cat([ids.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], dim=1)
    p1 = cfg.probs(TARGET()(ext).logits[:, -1].float())
    return p0, q0, p1


CONFIGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.8, top_k=10),
    SamplingConfig(temperature=1.2, top_p=0.8),
    SamplingConfig(temperature=1.0, top_k=20, top_p=0.9),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}")
@pytest.mark.parametrize("deterministic_draft,head_vocab", [(False, False), (True, False), (False, True)],
                         ids=["model-draft", "ngram-draft", "head-draft"])
def test_first_two_tokens_follow_the_target(cfg, deterministic_draft, head_vocab):
    gen = torch.Generator().manual_seed(1234)
    p0, q0, p1 = distributions(cfg)
    if head_vocab:
        # A draft head proposes from its own vocabulary only: q is zero on every other token.
        q0 = q0 * (torch.arange(VOCAB) % 3 != 0)
        q0 = q0 / q0.sum()
    if deterministic_draft:
        # An n-gram drafter proposes a fixed token: q is a point mass on it.
        drafts = torch.full((N,), int(torch.argsort(q0)[-2]))
    else:
        drafts = torch.multinomial(q0, N, replacement=True, generator=gen)
    first, second = torch.empty(N, dtype=torch.long), torch.empty(N, dtype=torch.long)
    for i in range(N):
        d = drafts[i : i + 1]
        p = torch.stack([p0.float(), p1[d[0]]])
        a, nxt = verify_sampling(p, None if deterministic_draft else q0[None], d, gen)
        if a == 1:
            first[i], second[i] = d[0], nxt
        else:  # recovered token; the next step samples from the target after it
            first[i] = nxt
            second[i] = torch.multinomial(p1[nxt], 1, generator=gen)
    p_second = (p0[:, None] * p1.double()).sum(0)
    assert tv(histogram(first), p0) < bound(p0)
    assert tv(histogram(second), p_second) < bound(p_second)
    if not deterministic_draft:
        # The bound is tight enough to catch a sampler that simply kept the draft's tokens.
        assert tv(q0.double(), p0) > 3 * bound(p0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}")
def test_a_candidate_tree_samples_the_first_two_tokens_from_the_target(cfg):
    """A draft head's tree: the root's three candidates (ranked as a head would, but not the
    target's favourites in order), the first of them with two candidates of its own. Multi-candidate
    rejection (verify_tree_sampling) must still emit the target's distribution."""
    gen = torch.Generator().manual_seed(99)
    p0, _, p1 = distributions(cfg)
    order = torch.argsort(p0, descending=True).tolist()
    first_kids = [order[1], order[0], order[5]]
    second_kids = torch.argsort(p1[first_kids[0]], descending=True).tolist()[:2][::-1]
    tree = CandidateTree([-1, 0, 0, 0, 1, 1])
    tokens = [PROMPT[-1], *first_kids, *second_kids]
    uniform = torch.full((VOCAB,), 1.0 / VOCAB)
    p = torch.stack([p0.float(), *(p1[t] for t in first_kids), uniform, uniform])   # [6, V]: each node's target
    first, second = torch.empty(N, dtype=torch.long), torch.empty(N, dtype=torch.long)
    taken = torch.zeros(len(tree), dtype=torch.long)
    for i in range(N):
        path, nxt = verify_tree_sampling(p, tokens, tree, gen)
        taken[path[-1]] += 1
        if len(path) >= 3:
            first[i], second[i] = tokens[path[1]], tokens[path[2]]
        elif len(path) == 2:
            first[i], second[i] = tokens[path[1]], nxt
        else:  # no candidate taken: the residual's token, then the target's next step after it
            first[i] = nxt
            second[i] = torch.multinomial(p1[nxt], 1, generator=gen)
    p_second = (p0[:, None] * p1.double()).sum(0)
    assert tv(histogram(first), p0) < bound(p0)
    assert tv(histogram(second), p_second) < bound(p_second)
    # every rank was taken about as often as the target picks its token
    for node, token in ((1, first_kids[0]), (2, first_kids[1]), (3, first_kids[2])):
        expected = float(p0[token]) * N - (taken[4] + taken[5] if node == 1 else 0)
        assert abs(int(taken[node]) - expected) < 5 * (N * float(p0[token])) ** 0.5 + 5


def test_filters_apply_to_p_and_q_alike():
    logits = torch.randn(3, VOCAB)
    probs = SamplingConfig(temperature=1.0, top_k=5, top_p=0.5).probs(logits)
    assert ((probs > 0).sum(-1) <= 5).all()
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    cfg = SamplingConfig(temperature=1.0, seed=42)
    a, _ = run(make_engine(TARGET(), "model", DRAFT(), sampling=cfg), PROMPT, 30)
    b, _ = run(make_engine(TARGET(), "model", DRAFT(), sampling=cfg), PROMPT, 30)
    c, _ = run(make_engine(TARGET(), "model", DRAFT(), sampling=SamplingConfig(temperature=1.0, seed=43)), PROMPT, 30)
    assert a == b and a != c
