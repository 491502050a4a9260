"""The transposed CPU weight layout changes speed only: same tokens, same bytes, ties kept."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specmemo.models.layout import transpose_linears
from specmemo.models.load import weights_nbytes
from tests.tiny import make_engine, run


def model(tied: bool):
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m


@pytest.mark.parametrize("tied", [True, False])
def test_transposed_layout_keeps_tokens_and_bytes(tied):
    original = model(tied)
    fast = copy.deepcopy(original)
    before = weights_nbytes(fast)
    transpose_linears(fast)
    assert weights_nbytes(fast) == before
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    if tied:
        assert fast.get_input_embeddings().weight_t is fast.get_output_embeddings().weight_t
    prompt = [5, 9, 2, 44, 9, 2, 44, 17]
    plain, _ = run(make_engine(original, "none"), prompt, 40)
    for drafter in ("none", "ngram"):
        out, _ = run(make_engine(fast, drafter), prompt, 40)
        assert out == plain
