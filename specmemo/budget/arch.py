"""Architecture facts: the few config fields that decide a decoder's memory.

Read from a Hugging Face `config.json` (or GGUF metadata, or an alias file in
profiles/models/) and never from weights, so planning needs no download.
"""

from dataclasses import dataclass, field

from specmemo.errors import BadInput


@dataclass(frozen=True)
class Arch:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int          # == num_heads for multi-head attention; fewer for grouped-query
    head_dim: int
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False     # Qwen2 and GLM-4 add biases to q, k and v
    qk_norm: bool = False      # Qwen3 normalizes q and k per head (two head_dim vectors per layer)
    published_params: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: dict, name: str = "model", published_params: int | None = None) -> "Arch":
        """From a HF config dict. Accepts the Llama/Qwen names and GLM's ChatGLM names."""
        get = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)
        try:
            hidden = int(get("hidden_size", "n_embd"))
            heads = int(get("num_attention_heads", "n_head"))
            kv_heads = int(get("num_key_value_heads", "multi_query_group_num", default=heads))
            if cfg.get("multi_query_attention") is False:
                kv_heads = heads
            head_dim = int(get("head_dim", "kv_channels", default=hidden // heads))
            model_type = str(cfg.get("model_type", ""))
            return cls(
                name=name,
                vocab_size=int(get("vocab_size", "padded_vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(get("intermediate_size", "ffn_hidden_size")),
                num_layers=int(get("num_hidden_layers", "num_layers", "n_layer")),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                max_position=int(get("max_position_embeddings", "seq_length", "n_positions", default=2048)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type not in ("chatglm", "glm"))),
                qkv_bias=bool(get("attention_bias", "add_qkv_bias", default=model_type == "qwen2")),
                qk_norm=model_type.startswith("qwen3"),
                published_params=published_params,
            )
        except (TypeError, ValueError, KeyError) as e:
            raise BadInput(f"config of {name} lacks an architecture field ({e})") from None

    # -- parameter count -------------------------------------------------------------------------
    # Standard pre-norm decoder (Llama family): per layer q,k,v,o projections, a gated MLP with
    # three matrices, two RMSNorm vectors; one embedding, one final norm, one LM head unless tied.

    def attention_params(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        return q + kv + o + bias + qk_norm

    def mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    def layer_params(self) -> int:
        return self.attention_params() + self.mlp_params() + 2 * self.hidden_size

    def embedding_params(self) -> int:
        """Input embedding plus LM head, the latter counted only if it is a separate matrix."""
        one = self.vocab_size * self.hidden_size
        return one if self.tie_embeddings else 2 * one

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params() + self.hidden_size

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}
