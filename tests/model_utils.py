"""Test helpers: drive a model through paged-KV steps (prefill, decode, chunked prefill,
shared prefix blocks) without the scheduler or model runner."""

from __future__ import annotations

import math

import torch

from kvasir.attention.backend import AttentionMetadata
from kvasir.attention.torch_backend import TorchAttentionMetadata
from kvasir.config import ModelArchConfig


def build_attn_metadata(
    block_tables: list[list[int]],
    num_computed_tokens: list[int],
    num_new_tokens: list[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for one step where request ``i`` already has ``num_computed_tokens[i]``
    tokens in its blocks ``block_tables[i]`` and adds ``num_new_tokens[i]``; with the
    torch backend's derived fields (its builder's derivation), so every backend takes it."""
    num_reqs = len(block_tables)
    seq_lens = [c + n for c, n in zip(num_computed_tokens, num_new_tokens, strict=True)]
    for i, (table, seq_len) in enumerate(zip(block_tables, seq_lens, strict=True)):
        assert len(table) * block_size >= seq_len, f"request {i} needs more blocks"
    query_start_loc = [0]
    for n in num_new_tokens:
        query_start_loc.append(query_start_loc[-1] + n)
    slots: list[int] = []
    for table, c, n in zip(block_tables, num_computed_tokens, num_new_tokens, strict=True):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
    max_blocks = max(len(t) for t in block_tables)
    # Pad with block 0: padded entries must never be read (masked by seq_lens).
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    qsl = torch.tensor(query_start_loc, dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    common = AttentionMetadata(
        num_reqs=num_reqs,
        num_actual_tokens=query_start_loc[-1],
        max_query_len=max(num_new_tokens),
        max_seq_len=max(seq_lens),
        query_start_loc=qsl.to(device),
        seq_lens=sl.to(device),
        block_table=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=sl,
    )
    return TorchAttentionMetadata.from_common(common, block_size)


def make_kv_caches(
    config: ModelArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fill: float = float("nan"),
) -> list[torch.Tensor]:
    """One ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` cache per layer, filled
    with NaN so any read of a never-written slot poisons the result."""
    shape = (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [
        torch.full(shape, fill, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
    ]


class PagedRunner:
    """Keeps per-request token lists, block tables and KV caches across steps, with a
    bump allocator for blocks (blocks are never freed: tests are short)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelArchConfig,
        num_blocks: int = 64,
        block_size: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        dtype = next(model.parameters()).dtype
        self.kv_caches = make_kv_caches(config, num_blocks, block_size, dtype, device)
        self.num_blocks = num_blocks
        self.next_block = 0
        self.block_tables: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    def add_request(self, req_id: str, shared_from: str | None = None, num_shared: int = 0):
        """Register a request; optionally reuse the first ``num_shared`` full blocks of
        ``shared_from`` (a cached prefix: those tokens count as already computed)."""
        table: list[int] = []
        if shared_from is not None:
            table = list(self.block_tables[shared_from][:num_shared])
        self.block_tables[req_id] = table
        self.num_computed[req_id] = len(table) * self.block_size

    def _ensure_blocks(self, req_id: str, seq_len: int) -> None:
        table = self.block_tables[req_id]
        while len(table) * self.block_size < seq_len:
            assert self.next_block < self.num_blocks, "out of KV blocks"
            table.append(self.next_block)
            self.next_block += 1

    def step(self, batch: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Run one step adding ``token_ids`` to each request; returns per-request logits
        ``[num_new, vocab]`` (float32)."""
        ids, positions, tables, computed, new = [], [], [], [], []
        for req_id, token_ids in batch:
            c = self.num_computed[req_id]
            self._ensure_blocks(req_id, c + len(token_ids))
            ids += token_ids
            positions += range(c, c + len(token_ids))
            tables.append(self.block_tables[req_id])
            computed.append(c)
            new.append(len(token_ids))
        md = build_attn_metadata(tables, computed, new, self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(ids, device=self.device),
                torch.tensor(positions, device=self.device),
                self.kv_caches,
                md,
            )
            logits = self.model.compute_logits(hidden)
        for (req_id, token_ids), _ in zip(batch, new, strict=True):
            self.num_computed[req_id] += len(token_ids)
        return list(logits.split(new))


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """HF init (std 0.02, zero bias, unit norms) makes attention near-uniform and hides
    position and bias bugs; use unit-scale activations and non-trivial norms/biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


# Prompts for the real default model (greedy checks against HF and across engines).
DEFAULT_MODEL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "In machine learning, a neural network is",
]


def save_tiny_llama(path: str, vocab_size: int = 256, seed: int = 0, **overrides: object) -> object:
    """A tiny random ``LlamaForCausalLM`` (unit-scale weights, ``randomize_``) saved as
    safetensors under ``path``; returns the HF model (float32, eval)."""
    import transformers

    kwargs: dict = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager", tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    randomize_(hf, seed=seed)
    hf.save_pretrained(path)
    return hf
