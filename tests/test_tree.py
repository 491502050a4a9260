"""Candidate trees: one forward verifies every branch, each node exactly as decoding its own
branch would compute it, and keeping a branch leaves the store as decoding it directly would."""

import pytest
import torch

from specmemo.budget.speedup import best_tree, grow_tree
from specmemo.decoding.verify import verify_tree_greedy
from specmemo.memory.attention import CandidateTree
from specmemo.memory.kvstore import KVShape, KVStore
from tests.tiny import VOCAB, own_model, tiny_llama

# root; two children of the root; a grandchild under each; a great-grandchild under the first.
TREE = CandidateTree([-1, 0, 0, 1, 2, 3, 0])


def store_for(own, capacity=200):
    cfg = own.cfg
    return KVStore(KVShape(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, capacity), own.dtype, "cpu")


def model_prompt_and_nodes(dtype, seed):
    """A tiny decoder, a 20-token prompt and a random token for each node of TREE."""
    own = own_model(tiny_llama(4, hidden=64, heads=4, kv_heads=2, inter=128).to(dtype))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=gen)
    return own, prompt, torch.randint(0, VOCAB, (len(TREE),), generator=gen).tolist()


def assert_nodes_decode_as_their_branches(own, prompt, tokens, tree=TREE):
    """Each node of one tree verification against plain decoding of its branch, one token at a
    time (as plain greedy decoding runs): bit for bit in half precision (the row-exact path)."""
    tree_store = store_for(own)
    own(tree_store, prompt, 1)
    tree_logits = own(tree_store, torch.tensor([tokens]), len(tree), tree=tree)[0]
    for node, path in enumerate(tree.paths):
        branch = store_for(own)
        own(branch, prompt, 1)
        for j in path:
            logits = own(branch, torch.tensor([[tokens[j]]]), 1)[0, -1]
        if own.dtype == torch.bfloat16:
            assert torch.equal(tree_logits[node], logits), node
        else:
            torch.testing.assert_close(tree_logits[node], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_node_is_computed_as_decoding_its_branch(dtype):
    own, prompt, tokens = model_prompt_and_nodes(dtype, 0)
    assert_nodes_decode_as_their_branches(own, prompt, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeping_a_branch_leaves_the_store_as_decoding_it(dtype):
    own, prompt, tokens = model_prompt_and_nodes(dtype, 1)
    for path in TREE.paths:
        tree_store, direct = store_for(own), store_for(own)
        own(tree_store, prompt, 1)
        own(direct, prompt, 1)
        keys_before = tree_store.keys.data_ptr()
        own(tree_store, torch.tensor([tokens]), len(TREE), tree=TREE)
        tree_store.keep_branch(20, path)
        tree_store.trim(20 + len(path))
        for j in path:
            own(direct, torch.tensor([[tokens[j]]]), 1)
        assert tree_store.length == direct.length and tree_store.keys.data_ptr() == keys_before
        kept = (tree_store.keys[:, :, :, : direct.length], tree_store.values[:, :, :, : direct.length])
        want = (direct.keys[:, :, :, : direct.length], direct.values[:, :, :, : direct.length])
        for a, b in zip(kept, want):
            if dtype == torch.bfloat16:
                assert torch.equal(a, b), path
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_greedy_tree_verification_follows_the_targets_choices():
    V = 10
    logits = torch.full((len(TREE), V), -1.0)
    tokens = [7, 3, 4, 5, 6, 8, 9]      # node tokens; the root's first
    # The target picks 4 after the root (node 2), then 6 (node 4, node 2's child), then 1: no child.
    for node, choice in [(0, 4), (2, 6), (4, 1), (1, 5), (3, 8)]:
        logits[node, choice] = 1.0
    assert verify_tree_greedy(logits, tokens, TREE) == ([0, 2, 4], 1)
    logits[0] = -1.0
    logits[0, 2] = 1.0   # a token no child holds: nothing accepted
    assert verify_tree_greedy(logits, tokens, TREE) == ([0], 2)


def test_a_tree_needs_parents_before_children():
    with pytest.raises(ValueError, match="not a candidate tree"):
        CandidateTree([-1, 2, 0])
    assert CandidateTree.chain(4).parents == [-1, 0, 1, 2]
    mask = TREE.mask(3, "cpu")
    assert mask.shape == (7, 10) and mask[:, :3].all()
    assert mask[5, 3:].tolist() == [True, True, False, True, False, True, False]   # 0 -> 1 -> 3 -> 5


def test_the_tree_rule_widens_where_verification_is_cheap():
    ranks = [0.55, 0.15, 0.06]
    flat = tuple([1.0] * 16)                          # extra candidates cost nothing
    steep = tuple(1.0 + 0.25 * i for i in range(16))  # each costs a quarter of a step
    # Best-first: the second node goes where it is likelier to be reached and accepted.
    assert grow_tree(ranks, 2) == ([-1, 0, 1], [1.0, 0.55, 0.55 * 0.55])    # deeper: 0.3025 > 0.15
    assert grow_tree([0.3, 0.25], 2)[0] == [-1, 0, 0]                         # wider: 0.25 > 0.09
    wide, _ = best_tree(ranks, 0.0, flat, 8)
    narrow, _ = best_tree(ranks, 0.05, steep, 8)
    assert len(wide) == 9 and len(narrow) < len(wide)
