"""``kvasir train-draft``: EAGLE or Medusa heads for any kvasir model, by self-distillation.

The target (kvasir's own model and attention backend, one prefill per sequence over a
throwaway paged KV cache, so its features are the engine's) runs over training
sequences: corpus chunks, or corpus prompts continued by the target's own greedy
output (``--generate-tokens``; ``--chat`` makes each corpus line a user message). Its
final hidden states h and next-token distributions p = softmax(lm_head(h)) are the
teachers:

- EAGLE: from (embed(token[p + 1]), h_p) predict h_{p + 1}: smooth-L1 on the feature
  plus ``ce_weight`` x cross-entropy of lm_head(prediction) against p at p + 1;
- Medusa: head i on h_p, cross-entropy against p at p + 1 + i (the target's
  distribution of the token i + 1 places after the one h_p's logits give).

Heads are trained in plain torch (HF-named modules, the same math as
``kvasir.spec_decode.heads``) and saved in the published formats that
``--speculative-config '{"method": "eagle"|"medusa", "model": OUT}'`` loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kvasir.config import ModelArchConfig, ModelConfig
from kvasir.layers.rotary_embedding import RotaryEmbedding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainDraftConfig:
    """What ``kvasir train-draft`` trains; flags map 1:1 onto the fields."""

    method: str  # "eagle" | "medusa"
    model: str
    corpus: str
    out: str
    load_format: str = "auto"
    steps: int = 200
    lr: float = 1e-3
    seq_len: int = 128  # tokens per training sequence (prompt + generated)
    batch_size: int = 8
    num_heads: int = 4  # medusa
    num_layers: int = 1  # EAGLE decoder layers / Medusa residual blocks per head
    num_sequences: int = 256
    generate_tokens: int = 0  # > 0: continue corpus prompts with the target's greedy output
    chat: bool = False  # corpus lines are user messages (with generate_tokens)
    ce_weight: float = 0.1  # EAGLE: weight of the distribution loss beside the feature loss
    feature_noise: float = 0.0  # EAGLE: uniform noise of this half-width on input features
    # EAGLE: the distribution loss on at most this many random positions per batch (0:
    # all); its full-vocabulary logits dominate the cost of a step for a large vocabulary.
    ce_tokens: int = 0
    # EAGLE: > 0 saves a draft vocabulary (``token_map``) of the target tokens most
    # frequent in the training data; the head's LM head then scores only those, which
    # makes a draft pass far cheaper where the vocabulary dominates (small models).
    draft_vocab: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("eagle", "medusa"):
            raise ValueError(f"method must be 'eagle' or 'medusa', got {self.method!r}")
        for name in ("seq_len", "batch_size", "num_heads", "num_layers", "num_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.seq_len < 2 + (self.num_heads if self.method == "medusa" else 1):
            raise ValueError(f"seq_len ({self.seq_len}) is too short to train on")
        if self.chat and not self.generate_tokens:
            raise ValueError("chat needs generate_tokens > 0 (the answers are the data)")


@dataclass
class TrainResult:
    out: str
    losses: list[float] = field(default_factory=list)
    num_sequences: int = 0
    num_tokens: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------- the target
class Target:
    """The target on the CPU with the torch attention backend: features exactly as the
    engine computes them, a dense copy of its LM head and its token embedding."""

    def __init__(self, model: str, load_format: str, seed: int) -> None:
        from kvasir.attention.torch_backend import TorchAttentionBackend
        from kvasir.models.loader import load_arch_config, load_model, load_tokenizer

        self.model_config = ModelConfig(model=model, load_format=load_format, seed=seed)
        self.arch: ModelArchConfig = load_arch_config(self.model_config)
        self.backend_cls = TorchAttentionBackend
        self.model = load_model(
            self.model_config, self.arch, TorchAttentionBackend, torch.float32, torch.device("cpu")
        )
        self.tokenizer: PreTrainedTokenizerBase | None = load_tokenizer(self.model_config)
        with torch.no_grad():
            eye = torch.eye(self.arch.hidden_size)
            # [V, H]: the head as a dense matrix, whatever its linear method stores
            self.lm_head = self.model.compute_logits(eye).float().T.contiguous()  # type: ignore[operator]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = self.model.model.embed_tokens(ids.reshape(-1))  # type: ignore[operator, union-attr]
        return flat.reshape(*ids.shape, -1).float()  # type: ignore[no-any-return]

    @torch.no_grad()
    def hidden_states(
        self, seqs: list[np.ndarray], block_size: int = 16, max_batch_tokens: int = 4096
    ) -> list[torch.Tensor]:
        """Final hidden states [len, H] of each sequence: one prefill each, in flat
        varlen batches over a fresh paged KV cache."""
        from kvasir.attention.backend import AttentionMetadata
        from kvasir.attention.torch_backend import TorchAttentionMetadata
        from kvasir.worker import kv_cache_sizing

        out: list[torch.Tensor] = []
        specs = kv_cache_sizing.kv_cache_specs(self.model, block_size, torch.float32)
        i = 0
        while i < len(seqs):
            group = [seqs[i]]
            while i + len(group) < len(seqs) and (
                sum(map(len, group)) + len(seqs[i + len(group)]) <= max_batch_tokens
            ):
                group.append(seqs[i + len(group)])
            lens = np.array([len(s) for s in group], dtype=np.int64)
            num_blocks = -(-lens // block_size)
            first = 1 + np.concatenate([[0], np.cumsum(num_blocks)[:-1]])
            table = np.zeros((len(group), int(num_blocks.max())), dtype=np.int64)
            slots = []
            for r in range(len(group)):
                table[r, : num_blocks[r]] = np.arange(first[r], first[r] + num_blocks[r])
                pos = np.arange(lens[r])
                slots.append(table[r, pos // block_size] * block_size + pos % block_size)
            caches = kv_cache_sizing.allocate_kv_caches(
                specs, int(num_blocks.sum()) + 1, self.backend_cls, torch.device("cpu")
            )
            qsl = torch.zeros(len(group) + 1, dtype=torch.int32)
            qsl[1:] = torch.from_numpy(np.cumsum(lens)).to(torch.int32)
            sl = torch.from_numpy(lens).to(torch.int32)
            common = AttentionMetadata(
                num_reqs=len(group),
                num_actual_tokens=int(lens.sum()),
                max_query_len=int(lens.max()),
                max_seq_len=int(lens.max()),
                query_start_loc=qsl,
                seq_lens=sl,
                block_table=torch.from_numpy(table).to(torch.int32),
                slot_mapping=torch.from_numpy(np.concatenate(slots)),
                query_start_loc_cpu=qsl,
                seq_lens_cpu=sl,
            )
            meta = TorchAttentionMetadata.from_common(common, block_size)
            ids = torch.from_numpy(np.concatenate(group)).long()
            positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens]))
            hidden = self.model(ids, positions, caches, meta).float()  # [sum(lens), H]
            out += list(hidden.split(lens.tolist()))
            i += len(group)
        return out


# ---------------------------------------------------------------------- data
def corpus_token_ids(target: Target, text: str) -> np.ndarray:
    """The corpus as token ids: the target's tokenizer, or UTF-8 bytes for a model
    without one (a dummy config; needs a vocabulary of at least 256)."""
    if target.tokenizer is not None:
        return np.asarray(target.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    if target.arch.vocab_size < 256:
        raise ValueError("a model without a tokenizer needs a vocabulary of >= 256 (bytes)")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def training_sequences(target: Target, cfg: TrainDraftConfig) -> list[np.ndarray]:
    """Corpus chunks of ``seq_len`` tokens, or prompts continued by the target's own
    greedy output (the distribution the heads will draft for at serving time)."""
    with open(cfg.corpus, encoding="utf-8") as f:
        text = f.read()
    rng = np.random.default_rng(cfg.seed)
    if cfg.chat:
        assert target.tokenizer is not None, "chat data needs the model's tokenizer"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        picks = rng.permutation(len(lines))[: cfg.num_sequences]
        tok = target.tokenizer
        prompts = [chat_prompt_ids(tok, lines[j]) for j in picks.tolist()]
        return _generate(target, cfg, prompts, stop_at_eos=True)
    ids = corpus_token_ids(target, text)
    prompt_len = cfg.seq_len - cfg.generate_tokens if cfg.generate_tokens else cfg.seq_len
    if prompt_len < 1:
        raise ValueError(f"seq_len ({cfg.seq_len}) must exceed generate_tokens")
    if len(ids) < prompt_len + 1:
        raise ValueError(f"corpus '{cfg.corpus}' has {len(ids)} tokens, fewer than a sequence")
    starts = rng.integers(0, len(ids) - prompt_len, size=cfg.num_sequences)
    chunks = [ids[s : s + prompt_len] for s in starts.tolist()]
    if not cfg.generate_tokens:
        return chunks
    return _generate(target, cfg, [c.tolist() for c in chunks], stop_at_eos=False)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    """Token ids of ``message`` as one user turn under the model's chat template."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def _generate(
    target: Target, cfg: TrainDraftConfig, prompts: list[list[int]], stop_at_eos: bool
) -> list[np.ndarray]:
    from kvasir import LLM, SamplingParams

    longest = max(len(p) for p in prompts) + cfg.generate_tokens
    llm = LLM(
        model=cfg.model,
        load_format=cfg.load_format,
        max_model_len=max(longest, 64),
        seed=cfg.seed,
        log=False,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=cfg.generate_tokens, ignore_eos=not stop_at_eos
    )
    outs = llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
    del llm
    seqs = [
        np.asarray(list(p) + list(o.outputs[0].token_ids), dtype=np.int64)
        for p, o in zip(prompts, outs, strict=True)
    ]
    return [s for s in seqs if len(s) >= 4]


# ---------------------------------------------------------------------- trainable heads
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


class _Attention(nn.Module):
    def __init__(self, c: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim,
        )  # fmt: skip
        h, q, kv = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        )
        self.q_proj = nn.Linear(h, q, bias=c.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=c.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=c.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # [B, L, H]
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)  # [B, heads, L, D]
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))  # type: ignore[no-any-return]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Neox half-split rotation over the full head_dim; cos/sin [L, D/2].
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _Mlp(nn.Module):
    def __init__(self, c: ModelArchConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class _Layer(nn.Module):
    def __init__(self, c: ModelArchConfig, first: bool) -> None:
        super().__init__()
        self.eps = c.rms_norm_eps
        if not first:  # EAGLE's layer 0 reads fc's output unnormalised
            self.input_layernorm = nn.Parameter(torch.ones(c.hidden_size))
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size))
        self.mlp = _Mlp(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = (
            x
            if not hasattr(self, "input_layernorm")
            else _rms_norm(x, self.input_layernorm, self.eps)
        )
        x = x + self.self_attn(h, cos, sin)
        return x + self.mlp(_rms_norm(x, self.post_attention_layernorm, self.eps))  # type: ignore[no-any-return]


class EagleTrainHead(nn.Module):
    """EAGLE-1 in plain torch over whole sequences (causal), HF-named like the
    published checkpoints (norm weights saved as ``*.weight``)."""

    def __init__(self, c: ModelArchConfig, num_layers: int, embed_scale: float = 1.0) -> None:
        super().__init__()
        h = c.hidden_size
        self.config = c
        self.fc = nn.Linear(2 * h, h, bias=True)
        with torch.no_grad():
            # fc starts as h_p + embed_scale * embed(token): the new token's embedding
            # brought to the features' scale (embeddings are often ~50x smaller), so
            # training starts from inputs of comparable size.
            self.fc.weight.zero_()
            self.fc.weight[:, :h] = torch.eye(h) * embed_scale
            self.fc.weight[:, h:] = torch.eye(h)
            self.fc.bias.zero_()
        self.layers = nn.ModuleList(_Layer(c, i == 0) for i in range(num_layers))
        for layer in self.layers:
            for name, p in layer.named_parameters():
                if "norm" not in name:
                    nn.init.normal_(p, 0.0, 0.02) if p.dim() > 1 else nn.init.zeros_(p)
        rot = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        self.register_buffer("cos_sin", rot.cos_sin_cache.clone(), persistent=False)

    def forward(
        self, embeds: torch.Tensor, features: torch.Tensor, start: torch.Tensor | int = 0
    ) -> torch.Tensor:
        # embeds, features: [B, L, H] -> predicted features [B, L, H]
        n = embeds.shape[1]
        cos, sin = self.cos_sin[start : start + n].chunk(2, dim=-1)  # type: ignore[index]
        x = self.fc(torch.cat([embeds, features], dim=-1))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.state_dict().items():
            if name.endswith("layernorm"):
                name += ".weight"
            out[name] = p.detach().float().contiguous()
        return out

    def published_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": len(self.layers),
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling,
            "max_position_embeddings": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
            "attention_bias": c.attention_bias,
            "tie_word_embeddings": False,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": list(c.eos_token_id),
        }


class _ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # FasterDecoding's init: the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))  # type: ignore[no-any-return]


class MedusaTrainHeads(nn.Module):
    """FasterDecoding's ``medusa_head``: per head, residual blocks then an LM head
    initialised from the target's."""

    def __init__(self, num_heads: int, num_layers: int, lm_head: torch.Tensor) -> None:
        super().__init__()
        vocab, hidden = lm_head.shape
        self.num_layers = num_layers
        heads = []
        for _ in range(num_heads):
            head = nn.Linear(hidden, vocab, bias=False)
            with torch.no_grad():
                head.weight.copy_(lm_head)
            heads.append(nn.Sequential(*[_ResBlock(hidden) for _ in range(num_layers)], head))
        self.medusa_head = nn.ModuleList(heads)

    def forward(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        return self.medusa_head[i](hidden)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- training
def _batches(
    seqs: list[np.ndarray], hidden: list[torch.Tensor], batch_size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random batch, right-padded: ids [B, L], features [B, L, H], mask [B, L]."""
    pick = rng.integers(0, len(seqs), size=batch_size)
    n = max(len(seqs[j]) for j in pick)
    h = hidden[0].shape[1]
    ids = torch.zeros(batch_size, n, dtype=torch.long)
    feats = torch.zeros(batch_size, n, h)
    mask = torch.zeros(batch_size, n, dtype=torch.bool)
    for r, j in enumerate(pick.tolist()):
        m = len(seqs[j])
        ids[r, :m] = torch.from_numpy(seqs[j])
        feats[r, :m] = hidden[j]
        mask[r, :m] = True
    return ids, feats, mask


def _soft_ce(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    # [N, V] each: cross-entropy of softmax(target) against log_softmax(logits), per row
    p = torch.softmax(target_logits.float(), dim=-1)
    return -(p * torch.log_softmax(logits.float(), dim=-1)).sum(-1)


def train_draft(cfg: TrainDraftConfig) -> TrainResult:
    """Train and save heads as ``cfg`` says; returns the loss curve."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    target = Target(cfg.model, cfg.load_format, cfg.seed)
    seqs = training_sequences(target, cfg)
    logger.info("train-draft: %d sequences, %d tokens", len(seqs), sum(map(len, seqs)))
    hidden = target.hidden_states(seqs)
    lm_head = target.lm_head  # [V, H]
    if cfg.method == "eagle":
        sample = torch.from_numpy(np.concatenate(seqs)[:4096])
        scale = float(torch.cat(hidden)[:4096].pow(2).mean().sqrt())
        scale /= float(target.embed(sample).pow(2).mean().sqrt()) + 1e-12
        module: nn.Module = EagleTrainHead(target.arch, cfg.num_layers, scale)
    else:
        module = MedusaTrainHeads(cfg.num_heads, cfg.num_layers, lm_head)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.0)
    result = TrainResult(cfg.out, num_sequences=len(seqs), num_tokens=sum(map(len, seqs)))
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.steps // 10, 1))
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, feats, mask = _batches(seqs, hidden, cfg.batch_size, rng)
        if cfg.method == "eagle":
            loss = _eagle_loss(module, target, lm_head, ids, feats, mask, cfg)  # type: ignore[arg-type]
        else:
            loss = _medusa_loss(module, lm_head, feats, mask, cfg)  # type: ignore[arg-type]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        result.losses.append(float(loss.detach()))
        if step % 20 == 0 or step == cfg.steps - 1:
            logger.info("train-draft: step %d/%d loss %.4f", step + 1, cfg.steps, result.losses[-1])
    extra = {}
    if cfg.method == "eagle" and cfg.draft_vocab:
        extra["token_map"] = frequent_tokens(seqs, cfg.draft_vocab, target.arch.vocab_size)
    save_heads(module, cfg, target.arch, extra)
    result.seconds = time.perf_counter() - t0
    return result


def _eagle_loss(
    head: EagleTrainHead,
    target: Target,
    lm_head: torch.Tensor,
    ids: torch.Tensor,
    feats: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainDraftConfig,
) -> torch.Tensor:
    # Pairs (h_p, token[p + 1]) for p < L - 1; teacher h_{p + 1}.
    inp = feats[:, :-1]
    if cfg.feature_noise:
        inp = inp + (torch.rand_like(inp) * 2 - 1) * cfg.feature_noise
    pred = head(target.embed(ids[:, 1:]), inp)  # [B, L-1, H]
    valid = mask[:, 1:]
    teacher = feats[:, 1:][valid]  # [N, H]
    pred = pred[valid]
    reg = nn.functional.smooth_l1_loss(pred, teacher)
    if not cfg.ce_weight:
        return reg
    if cfg.ce_tokens and len(pred) > cfg.ce_tokens:
        pick = torch.randperm(len(pred))[: cfg.ce_tokens]
        pred, teacher = pred[pick], teacher[pick]
    ce = _soft_ce(pred @ lm_head.T, teacher @ lm_head.T).mean()
    return reg + cfg.ce_weight * ce


def _medusa_loss(
    heads: MedusaTrainHeads,
    lm_head: torch.Tensor,
    feats: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainDraftConfig,
) -> torch.Tensor:
    total = feats.new_zeros(())
    for i in range(cfg.num_heads):
        shift = i + 1
        valid = mask[:, shift:]  # h_p's teacher sits at p + 1 + i
        if not valid.any():
            continue
        h_in = feats[:, :-shift][valid]
        teacher = feats[:, shift:][valid] @ lm_head.T
        # Later heads are harder and matter less (a chain stops at the first miss).
        total = total + 0.8**i * _soft_ce(heads(h_in, i), teacher).mean()
    return total


def frequent_tokens(seqs: list[np.ndarray], n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` token ids most frequent in ``seqs`` (ties: lower id), ascending; ids
    never seen fill the rest in id order when fewer than ``n`` were seen."""
    counts = np.bincount(np.concatenate(seqs), minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))[: min(n, vocab_size)]
    return torch.from_numpy(np.sort(order).astype(np.int64))


def save_heads(
    module: nn.Module,
    cfg: TrainDraftConfig,
    arch: ModelArchConfig,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the published format
    (``extra``: tensors saved beside the weights, e.g. an EAGLE ``token_map``)."""
    from safetensors.torch import save_file

    os.makedirs(cfg.out, exist_ok=True)
    if isinstance(module, EagleTrainHead):
        config = module.published_config()
        tensors = module.published_state_dict()
    else:
        assert isinstance(module, MedusaTrainHeads)
        config = {
            "medusa_num_heads": cfg.num_heads,
            "medusa_num_layers": cfg.num_layers,
            "hidden_size": arch.hidden_size,
            "vocab_size": arch.vocab_size,
            "base_model_name_or_path": cfg.model,
        }
        tensors = {n: p.detach().float().contiguous() for n, p in module.state_dict().items()}
    tensors.update(extra or {})
    with open(os.path.join(cfg.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(cfg.out, "model.safetensors"))


# ---------------------------------------------------------------------- CLI
def add_train_draft_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``kvasir train-draft``'s parser on ``subparsers`` (an argparse subparsers action);
    its ``func`` default is ``run_train_draft``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train-draft",
        help="train EAGLE or Medusa heads for a model by self-distillation",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    d = TrainDraftConfig.__dataclass_fields__
    p.add_argument("--method", required=True, choices=["eagle", "medusa"])
    p.add_argument("--model", required=True, help="HF directory, .gguf file or dummy config")
    p.add_argument("--corpus", required=True, help="a UTF-8 text file")
    p.add_argument("--out", required=True, help="directory for config.json + model.safetensors")
    p.add_argument("--load-format", default=d["load_format"].default)
    for name, kind in (
        ("steps", int), ("lr", float), ("seq_len", int), ("batch_size", int),
        ("num_heads", int), ("num_layers", int), ("num_sequences", int),
        ("generate_tokens", int), ("ce_weight", float), ("feature_noise", float),
        ("ce_tokens", int), ("draft_vocab", int), ("seed", int),
    ):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name].default)
    p.add_argument("--chat", action="store_true", help="corpus lines are user messages")
    p.set_defaults(func=run_train_draft)
    return p


def run_train_draft(args: argparse.Namespace) -> int:
    """Run ``kvasir train-draft`` from its parsed arguments; 0 on success, 2 on bad input."""
    names = TrainDraftConfig.__dataclass_fields__
    try:
        cfg = TrainDraftConfig(**{k: v for k, v in vars(args).items() if k in names})
        result = train_draft(cfg)
    except (ValueError, OSError) as e:
        logger.error("train-draft: %s", e)
        return 2
    summary = {
        "method": cfg.method,
        "out": result.out,
        "sequences": result.num_sequences,
        "tokens": result.num_tokens,
        "steps": cfg.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "seconds": round(result.seconds, 1),
    }
    print(json.dumps(summary))  # noqa: T201 - the command's one-line result
    return 0
