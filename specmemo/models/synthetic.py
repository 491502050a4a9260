"""Models with random weights built from configuration: for tests, for a deliberately poor draft,
and for realistic-size memory checks where downloading weights is not possible."""

from pathlib import Path

import torch


def llama_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate_size: int = 128, max_position: int = 8192):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_position, tie_word_embeddings=False)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_random_model(config, path: Path, seed: int = 0) -> Path:
    """A model directory (config.json + safetensors, no tokenizer files) with random weights."""
    random_model(config, seed).save_pretrained(path, safe_serialization=True)
    return Path(path)
