"""Plan-only model configs (HF ``config.json`` keys, the fields the planner reads): the
shapes the seed's studies compare that the engine has no built-in config for. The
figures are the published configs of the named checkpoints on the Hugging Face Hub."""

from __future__ import annotations

from typing import Any

ZOO: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-70B: the case study's model (8k context, no rope scaling).
    "llama-3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    # mistralai/Mistral-7B-v0.1: a 4,096-token sliding window on every layer.
    "mistral-7b-v0.1": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    },
    # mistralai/Mixtral-8x7B-v0.1: 8 experts, 2 per token.
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
    },
    # Qwen/Qwen3-30B-A3B: 128 experts of 768, 8 per token.
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
    },
    # state-spaces/mamba-2.8b-hf: 64 Mamba layers, no attention, no MLP.
    "mamba-2.8b": {
        "model_type": "mamba",
        "hidden_size": 2560,
        "intermediate_size": 5120,
        "num_hidden_layers": 64,
        "state_size": 16,
        "conv_kernel": 4,
        "expand": 2,
        "time_step_rank": 160,
        "vocab_size": 50280,
        "tie_word_embeddings": True,
    },
    # state-spaces/mamba2-2.7b: Mamba-2, 80 heads of 64, state 128.
    "mamba2-2.7b": {
        "model_type": "mamba2",
        "hidden_size": 2560,
        "num_hidden_layers": 64,
        "num_heads": 80,
        "head_dim": 64,
        "state_size": 128,
        "n_groups": 1,
        "conv_kernel": 4,
        "expand": 2,
        "vocab_size": 50288,
        "tie_word_embeddings": True,
    },
    # A Llama-shaped transformer of the Mamba-2.8B's size, for the transformer-vs-SSM
    # comparison: microsoft/phi-2's hidden 2560 and 32 layers, its 10240-wide GELU MLP
    # as a SwiGLU MLP of as many weights (3 x 6912 ~ 2 x 10240).
    "llama-2.7b-shape": {
        "model_type": "llama",
        "hidden_size": 2560,
        "intermediate_size": 6912,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 51200,
        "max_position_embeddings": 16384,
        "tie_word_embeddings": False,
    },
}
