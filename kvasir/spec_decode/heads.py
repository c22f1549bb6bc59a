"""EAGLE and Medusa draft heads over the target's final hidden states.

Checkpoints are read in the formats vLLM loads:

- **EAGLE-1** (e.g. yuhuili/EAGLE-llama2-chat-7B): a directory with a Llama
  ``config.json`` (``num_hidden_layers`` usually 1) and ``fc.weight`` [H, 2H] (``fc.bias``
  optional), ``layers.{i}.*`` Llama decoder layers whose layer 0 has no input norm, and
  optionally ``embed_tokens.weight`` (else the target's embedding). The LM head is the
  target's. The input at position p is ``fc(cat(embed(token[p + 1]), h_p))``, with h_p
  the target's final (post-norm) hidden state; the layers' output (their residual
  stream, no final norm) predicts h_{p + 1}, whose logits under the target's head give
  token p + 2. The decoder layers have their own KV cache on the target's block table,
  at the target's positions.
- **Medusa** (FasterDecoding): ``config.json`` with ``medusa_num_heads`` and
  ``medusa_num_layers`` (vLLM's ``num_heads`` / ``num_hidden_layers`` too), weights
  ``medusa_head.{i}.{j}.linear.{weight,bias}`` (residual blocks x + SiLU(W x + b)) and
  ``medusa_head.{i}.{num_layers}.weight`` (head i's LM head); vLLM's own layout
  ``blocks.{i}.layers.{j}.*`` / ``lm_heads.{i}.weight`` is read as well. Head i applied to
  the hidden state whose logits gave the sampled token predicts the token i + 1 places
  after it. No KV cache.

Both propose chains of k drafts (top-1 per position for greedy requests, a sample from
the head's distribution under the request's sampling settings otherwise, which goes to
verification as ``Proposal.draft_probs``). Static token trees are not implemented.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kvasir.config import ModelArchConfig, SpeculativeConfig
from kvasir.core.kv_cache_spec import KVCacheSpec
from kvasir.layers.context import LayerContext
from kvasir.layers.linear import default_weight_loader
from kvasir.layers.rotary_embedding import RotaryEmbedding
from kvasir.models.llama import LlamaDecoderLayer
from kvasir.spec_decode.proposer import (
    Proposal,
    ProposeInputs,
    Proposer,
    draw,
    stack_probs,
    subset_metadata,
)
from kvasir.worker import kv_cache_sizing

if TYPE_CHECKING:
    from kvasir.attention.backend import AttentionMetadata
    from kvasir.layers.sampler import SamplingMetadata
    from kvasir.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_FIELD = "speculative_config.model"
# HF sub-projection -> (fused parameter, shard id), as in the target model.
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# ---------------------------------------------------------------------- checkpoints
def read_head_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a head checkpoint directory: its ``*.safetensors`` files,
    else ``pytorch_model.bin`` / ``*.bin`` / ``*.pt``. ValueError when there are none."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from kvasir.models.loader.safetensors_loader import iterate_safetensors

        yield from iterate_safetensors(files)
        return
    files = sorted(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
    if not files:
        raise ValueError(f"no *.safetensors, *.bin or *.pt weights in '{path}'")
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        yield from state.items()


def _head_dir(config: SpeculativeConfig) -> str:
    assert config.model is not None
    path = os.path.expanduser(config.model)
    if not os.path.isdir(path):
        raise ValueError(f"{_FIELD} {config.model!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{_FIELD} {config.model!r} has no config.json")
    return path


# ---------------------------------------------------------------------- EAGLE
class EagleHead(nn.Module):
    """EAGLE-1's draft network: ``fc`` over [token embedding, target feature], then
    Llama decoder layers (layer 0 without its input norm) over a paged KV cache."""

    def __init__(
        self, config: ModelArchConfig, ctx: LayerContext, fc_bias: bool, own_embedding: bool
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        self.embed_tokens = nn.Embedding(config.vocab_size, h) if own_embedding else None
        rotary_emb = RotaryEmbedding(
            config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            base=config.rope_theta,
            rope_scaling=config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary_emb, ctx, f"layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        # The target's feature is already normalised.
        self.layers[0].input_layernorm = nn.Identity()

    def forward(
        self,
        embeds: torch.Tensor,  # [num_tokens, hidden]: embeddings of token[p + 1]
        features: torch.Tensor,  # [num_tokens, hidden]: h_p (target's or predicted)
        positions: torch.Tensor,  # [num_tokens] p
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]: predicted h_{p + 1}
        hidden = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        return hidden + residual  # type: ignore[no-any-return]

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        h, q_size = c.hidden_size, c.num_attention_heads * c.head_dim
        kv_size = c.num_key_value_heads * c.head_dim
        shapes: dict[str, tuple[int, ...]] = {"fc.weight": (h, 2 * h)}
        if self.fc.bias is not None:
            shapes["fc.bias"] = (h,)
        if self.embed_tokens is not None:
            shapes["embed_tokens.weight"] = (c.vocab_size, h)
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            if i:
                shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for name, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
                shapes[p + f"self_attn.{name}.weight"] = (size, h)
                if c.attention_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (size,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q_size)
            if c.attention_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
        return shapes

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """HF-named tensors (``model.`` prefixes dropped) into the fused parameters.
        ValueError naming the first unexpected, wrong-shape or missing tensor."""
        expected = self.expected_weight_shapes()
        params = dict(self.named_parameters())
        for name, tensor in weights.items():
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} in the EAGLE checkpoint")
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
            module_path, _, kind = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if leaf in _STACKED:
                fused, shard = _STACKED[leaf]
                param = params[f"{parent}.{fused}.{kind}"]
                param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]
                continue
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                default_weight_loader(param, tensor)
            else:
                loader(param, tensor)
        missing = [n for n in expected if n not in weights]
        if missing:
            raise ValueError(f"missing weight {missing[0]!r} in the EAGLE checkpoint")


def _eagle_weights(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in read_head_weights(path):
        name = name.removeprefix("model.")
        # The target's head and EAGLE-1's absent layer-0 input norm: not ours to load.
        if name == "lm_head.weight" or name == "layers.0.input_layernorm.weight":
            continue
        if name == "d2t":  # EAGLE-3's draft vocabulary: target id = draft id + d2t[id]
            name, tensor = "token_map", torch.arange(len(tensor)) + tensor.long()
        out[name] = tensor
    return out


def load_eagle_head(
    config: SpeculativeConfig, runner: ModelRunner
) -> tuple[EagleHead, torch.Tensor | None]:
    """The EAGLE head of ``config.model`` for ``runner``'s target, on its device and
    dtype, and its draft vocabulary (``token_map``: the target ids its LM head scores;
    None: all of them); ValueError naming ``speculative_config.model`` when it does
    not fit."""
    from kvasir.models.loader import process_weights_after_loading
    from kvasir.models.loader.hf_config import load_hf_arch_config

    path = _head_dir(config)
    target = runner.arch_config
    try:
        arch = load_hf_arch_config(os.path.join(path, "config.json"))
        weights = _eagle_weights(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{_FIELD} {config.model!r}: {e}") from e
    if arch.hidden_size != target.hidden_size:
        raise ValueError(
            f"{_FIELD} {config.model!r} is an EAGLE head for hidden size {arch.hidden_size}, "
            f"the target's is {target.hidden_size}"
        )
    fc = weights.get("fc.weight")
    if fc is not None and tuple(fc.shape) != (target.hidden_size, 2 * target.hidden_size):
        raise ValueError(
            f"{_FIELD} {config.model!r}: fc.weight has shape {tuple(fc.shape)}, the target's "
            f"hidden size {target.hidden_size} needs {(target.hidden_size, 2 * target.hidden_size)}"
        )
    token_map = weights.pop("token_map", None)
    if token_map is not None:
        token_map = token_map.long().flatten()
        bad = token_map.numel() == 0 or int(token_map.min()) < 0
        if bad or int(token_map.max()) >= target.vocab_size or runner.parallel.tp_size > 1:
            why = "needs tensor_parallel_size 1" if not bad else "holds ids outside it"
            raise ValueError(
                f"{_FIELD} {config.model!r}: token_map (the draft vocabulary) {why} "
                f"(target vocabulary {target.vocab_size})"
            )
    embed = weights.get("embed_tokens.weight")
    vocab = arch.vocab_size if embed is None else int(embed.shape[0])
    if vocab != target.vocab_size:
        raise ValueError(
            f"{_FIELD} {config.model!r} is an EAGLE head for a vocabulary of {vocab} tokens, "
            f"the target's has {target.vocab_size}"
        )
    ctx = LayerContext(
        attn_backend_cls=runner.attn_backend_cls,
        params_dtype=runner.dtype,
        kernel_config=runner.config.kernel_config,
        parallel=runner.parallel,
        parallel_config=runner.config.parallel_config,
    )
    with torch.device(runner.device):
        head = EagleHead(arch, ctx, "fc.bias" in weights, embed is not None)
    head = head.to(dtype=runner.dtype)
    for module in head.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    head.requires_grad_(False)
    try:
        head.load_weights(weights)
    except ValueError as e:
        raise ValueError(f"{_FIELD} {config.model!r}: {e}") from e
    process_weights_after_loading(head)
    if token_map is not None:
        token_map = token_map.to(runner.device)
    return head.eval(), token_map


class EagleProposer(Proposer):
    """Drafts with an EAGLE head: pass 1 over every position the target verified in
    the step (each request's chunk; for a sampling request up to the one before its
    sampled token), whose last output gives draft 1; then k - 1 one-token passes, each
    on the head's own predicted feature and the previous draft.

    The head's KV at position p holds the pair (h_p, token[p + 1]): pass 1 rewrites it
    from the target's features over the positions verified this step (draft passes left
    predicted features at p >= T - 1, past what pass 1 reaches only where drafts were
    rejected, and those positions are rewritten before they are read). A prefix-cache
    hit reuses the head's KV of whoever computed the block, whose last slot saw that
    request's next token: it can only cost acceptance, never correctness.
    """

    name = "eagle"
    needs_hidden_states = True

    def __init__(
        self,
        config: SpeculativeConfig,
        runner: ModelRunner,
        head: EagleHead,
        token_map: torch.Tensor | None = None,
    ) -> None:
        self.k = config.k
        self.num_lookahead_tokens = config.num_lookahead_tokens
        self.runner = runner
        self.head = head
        self.kv_caches: list[torch.Tensor] = []
        # A draft vocabulary: the target LM head's rows of those ids only.
        self.token_map = token_map
        self._lm_rows: torch.Tensor | None = None
        if token_map is not None:
            weight = runner.model.lm_head.weight  # type: ignore[union-attr]
            self._lm_rows = weight.detach().index_select(0, token_map).contiguous()

    def _draw(
        self, features: torch.Tensor, md: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens from the head's predicted features (and their distribution
        over the target's vocabulary for random requests): through the target's LM
        head, or only its draft-vocabulary rows (zero probability elsewhere)."""
        if self._lm_rows is None:
            return draw(self.runner.model.compute_logits(features), md)  # type: ignore[operator]
        assert self.token_map is not None
        logits = features.to(self._lm_rows.dtype) @ self._lm_rows.T  # [S, draft vocab]
        tok, q = draw(logits, md)
        tok = self.token_map.index_select(0, tok)
        if q is not None:
            vocab = self.runner.arch_config.vocab_size
            full = torch.zeros(q.shape[0], vocab, dtype=q.dtype, device=q.device)
            q = full.index_copy_(1, self.token_map, q)
        return tok, q

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        r = self.runner
        return kv_cache_sizing.kv_cache_specs(self.head, r.block_size, r.dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        emb: nn.Module | None = self.head.embed_tokens
        if emb is None:  # EAGLE-1 checkpoints usually share the target's
            emb = self.runner.model.model.embed_tokens  # type: ignore[union-attr, assignment]
        assert emb is not None
        return emb(ids)  # type: ignore[no-any-return]

    def _run(
        self,
        rows: np.ndarray,  # [n] ascending
        starts: np.ndarray,  # [n] first position
        ends: np.ndarray,  # [n] one past the last
        ids: np.ndarray,  # [sum(ends - starts)] token[p + 1] of each position, in order
        features: torch.Tensor,  # [sum(ends - starts), hidden] h_p, in order
    ) -> torch.Tensor:  # [n, hidden]: the head's output at each row's last position
        r = self.runner
        r.buffers.wait_for_copies()
        states, req_ids = r._batch_ids(rows, False)
        step = r.buffers.prepare(
            r.input_batch, rows, ends - starts, states, req_ids, False, None, None,
            num_computed=starts,
        )  # fmt: skip
        n = step.num_tokens
        ids_t = torch.from_numpy(ids).to(r.device)
        out = self.head(
            self._embed(ids_t), features, r.positions[:n], self.kv_caches, step.attn_metadata
        )
        last = torch.from_numpy(step.query_start_loc[1:] - 1).to(out.device)
        return out.index_select(0, last)

    def propose(self, inputs: ProposeInputs) -> Proposal:
        r = self.runner
        ib = r.input_batch
        step = inputs.step
        hidden = inputs.hidden_states
        assert hidden is not None
        n_s = len(inputs.states)
        drafts = np.full((n_s, self.k), -1, dtype=np.int64)
        num_drafts = inputs.max_drafts.copy()

        # Pass 1: the target's features at every position it verified in the step.
        sampling = {int(b): i for i, b in enumerate(inputs.sample_idx.tolist())}
        rows, starts, ends, ids, flat = [], [], [], [], []
        for b in range(len(step.rows)):
            row, c = int(step.rows[b]), int(step.num_computed[b])
            i = sampling.get(b)
            # token[end] must be known: the sampled token, or the next prompt token.
            end = int(inputs.num_tokens[i]) - 1 if i is not None else int(step.seq_lens[b])
            end = min(end, int(ib.num_known_tokens[row]) - 1)
            if end <= c:
                continue
            rows.append(row)
            starts.append(c)
            ends.append(end)
            ids.append(ib.token_ids[row, c + 1 : end + 1])
            q0 = int(step.query_start_loc[b])
            flat.append(np.arange(q0, q0 + end - c))
        if not rows:
            return Proposal(drafts, np.zeros(n_s, dtype=np.int64))
        index = torch.from_numpy(np.concatenate(flat)).to(hidden.device)
        rows_np = np.asarray(rows, dtype=np.int64)
        feats_last = self._run(
            rows_np,
            np.asarray(starts, dtype=np.int64),
            np.asarray(ends, dtype=np.int64),
            np.concatenate(ids).astype(np.int64),
            hidden.index_select(0, index),
        )  # [len(rows), hidden]
        where = {row: j for j, row in enumerate(rows)}
        have = np.array([row in where for row in inputs.rows.tolist()], dtype=bool)
        num_drafts[~have] = 0
        # Draft j's pass writes the head's KV at T - 2 + j: inside the request's blocks.
        bs = r.block_size
        room = ib.num_blocks[inputs.rows] * bs - inputs.num_tokens + 2
        num_drafts = np.minimum(num_drafts, np.maximum(room, 0))
        k = int(num_drafts.max()) if n_s else 0
        if k == 0:
            return Proposal(drafts, num_drafts)
        pick = torch.tensor([where.get(row, 0) for row in inputs.rows.tolist()])
        feats = feats_last.index_select(0, pick.to(feats_last.device))  # [S, hidden]
        md = inputs.sampling_metadata
        tok, q = self._draw(feats, md)
        drafts[:, 0] = tok.cpu().numpy()
        probs_steps = [q] if q is not None else []
        for j in range(1, k):
            active = np.nonzero(num_drafts > j)[0]
            if not len(active):
                break
            order = np.argsort(inputs.rows[active], kind="stable")
            active = active[order]
            act = torch.from_numpy(active).to(feats.device)
            p = inputs.num_tokens[active] + j - 2
            out = self._run(
                inputs.rows[active], p, p + 1, drafts[active, j - 1], feats.index_select(0, act)
            )
            feats = feats.index_copy(0, act, out)
            tok_a, q_a = self._draw(out, subset_metadata(md, active))
            drafts[active, j] = tok_a.cpu().numpy()
            if q is not None:
                full = torch.zeros_like(probs_steps[0])
                if q_a is not None:
                    full[act] = q_a
                probs_steps.append(full)
        return Proposal(drafts, num_drafts, stack_probs(probs_steps, md, self.k))


# ---------------------------------------------------------------------- Medusa
class MedusaHeads(nn.Module):
    """``num_heads`` heads, each ``num_layers`` residual blocks x + SiLU(W x + b) and its
    own LM head, over the target's final hidden state (vLLM's module layout)."""

    def __init__(
        self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int, bias: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers))
            for _ in range(num_heads)
        )
        self.lm_heads = nn.ModuleList(
            nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(num_heads)
        )

    def forward(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        # [S, hidden] -> [S, vocab] float32: head i's logits
        x = hidden
        blocks: nn.ModuleList = self.blocks[i]  # type: ignore[assignment]
        for linear in blocks:
            x = x + nn.functional.silu(linear(x))
        return self.lm_heads[i](x).float()  # type: ignore[no-any-return]


_FASTER_BLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_FASTER_HEAD = re.compile(r"^(\d+)\.(\d+)\.weight$")


def medusa_weight_name(name: str, num_layers: int) -> str | None:
    """A checkpoint tensor name (FasterDecoding's or vLLM's) as a ``MedusaHeads``
    parameter name; None for names of neither layout."""
    for prefix in ("model.", "medusa_heads.", "medusa_head."):
        name = name.removeprefix(prefix)
    if m := _FASTER_BLOCK.match(name):
        return f"blocks.{m[1]}.{m[2]}.{m[3]}"
    if (m := _FASTER_HEAD.match(name)) and int(m[2]) == num_layers:
        return f"lm_heads.{m[1]}.weight"
    if m := re.match(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$", name):
        return f"blocks.{m[1]}.{m[2]}.{m[3]}"
    if re.match(r"^lm_heads\.\d+\.weight$", name):
        return name
    return None


def _config_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return None


def load_medusa_heads(config: SpeculativeConfig, runner: ModelRunner) -> MedusaHeads:
    """The Medusa heads of ``config.model``; ValueError naming the field that is wrong."""
    from kvasir.models.loader.hf_config import read_json

    path = _head_dir(config)
    target = runner.arch_config
    try:
        cfg = read_json(os.path.join(path, "config.json"))
        num_heads = _config_int(cfg, "medusa_num_heads", "num_heads")
        num_layers = _config_int(cfg, "medusa_num_layers", "num_hidden_layers")
        if num_heads is None or num_layers is None:
            raise ValueError("config.json needs medusa_num_heads and medusa_num_layers")
        weights: dict[str, torch.Tensor] = {}
        for name, tensor in read_head_weights(path):
            mapped = medusa_weight_name(name, num_layers)
            if mapped is None:
                raise ValueError(f"unexpected weight {name!r} in the Medusa checkpoint")
            weights[mapped] = tensor
    except (OSError, ValueError) as e:
        raise ValueError(f"{_FIELD} {config.model!r}: {e}") from e
    head0 = weights.get("lm_heads.0.weight")
    if head0 is None:
        raise ValueError(f"{_FIELD} {config.model!r}: missing weight for head 0's LM head")
    vocab, hidden = (int(d) for d in head0.shape)
    hidden = _config_int(cfg, "hidden_size") or hidden
    vocab = _config_int(cfg, "vocab_size") or vocab
    if hidden != target.hidden_size:
        raise ValueError(
            f"{_FIELD} {config.model!r} holds Medusa heads for hidden size {hidden}, the "
            f"target's is {target.hidden_size}"
        )
    if vocab != target.vocab_size:
        raise ValueError(
            f"{_FIELD} {config.model!r} holds Medusa heads for a vocabulary of {vocab} "
            f"tokens, the target's has {target.vocab_size}"
        )
    if config.k > num_heads:
        field = "max_speculative_tokens" if config.adaptive else "num_speculative_tokens"
        raise ValueError(
            f"speculative_config.{field} ({config.k}) exceeds the {num_heads} heads of "
            f"the Medusa checkpoint {config.model!r}"
        )
    bias = "blocks.0.0.bias" in weights
    with torch.device(runner.device):
        heads = MedusaHeads(num_heads, num_layers, hidden, vocab, bias)
    heads = heads.to(dtype=runner.dtype).requires_grad_(False)
    params = dict(heads.named_parameters())
    for name, tensor in weights.items():
        param = params.get(name)
        if param is None or param.shape != tensor.shape:
            shape = None if param is None else tuple(param.shape)
            raise ValueError(
                f"{_FIELD} {config.model!r}: weight {name!r} of shape {tuple(tensor.shape)} "
                f"does not fit (expected {shape})"
            )
        param.data.copy_(tensor)
    missing = [n for n in params if n not in weights]
    if missing:
        raise ValueError(f"{_FIELD} {config.model!r}: missing weight {missing[0]!r}")
    return heads.eval()


class MedusaProposer(Proposer):
    """Draft j is head j - 1 on the target's hidden state at the last position it
    verified (the one whose logits gave the sampled token)."""

    name = "medusa"
    needs_hidden_states = True

    def __init__(self, config: SpeculativeConfig, heads: MedusaHeads) -> None:
        self.k = config.k
        self.heads = heads
        self.dtype = next(heads.parameters()).dtype

    def propose(self, inputs: ProposeInputs) -> Proposal:
        step, hidden = inputs.step, inputs.hidden_states
        assert hidden is not None
        n_s = len(inputs.states)
        drafts = np.full((n_s, self.k), -1, dtype=np.int64)
        num_drafts = inputs.max_drafts.copy()
        k = int(num_drafts.max()) if n_s else 0
        if k == 0:
            return Proposal(drafts, num_drafts)
        b = inputs.sample_idx
        # Position T - 2 of each request, in the step's flat batch.
        idx = step.query_start_loc[b] + (inputs.num_tokens - 2 - step.num_computed[b])
        h = hidden.index_select(0, torch.from_numpy(idx).to(hidden.device))
        h = h.to(self.dtype)
        md = inputs.sampling_metadata
        probs_steps = []
        for i in range(k):
            tok, q = draw(self.heads(h, i), md)
            drafts[:, i] = tok.cpu().numpy()
            if q is not None:
                probs_steps.append(q)
        return Proposal(drafts, num_drafts, stack_probs(probs_steps, md, self.k))


def build_head_proposer(config: SpeculativeConfig, runner: ModelRunner) -> Proposer:
    """The EAGLE or Medusa proposer of ``config``; ValueError naming the field when the
    checkpoint does not fit the target."""
    if runner.parallel.pp_size > 1:
        raise ValueError(f"speculative_config.method {config.method!r} needs one pipeline stage")
    if config.method == "eagle":
        head, token_map = load_eagle_head(config, runner)
        logger.info(
            "EAGLE head %s: %d layer(s), hidden %d, draft vocabulary %d", config.model,
            head.config.num_hidden_layers, head.config.hidden_size,
            runner.arch_config.vocab_size if token_map is None else len(token_map),
        )  # fmt: skip
        return EagleProposer(config, runner, head, token_map)
    heads = load_medusa_heads(config, runner)
    logger.info("Medusa heads %s: %d heads", config.model, len(heads.lm_heads))
    return MedusaProposer(config, heads)
