"""State-space mixers: Mamba-1 (``MambaMixer``) and Mamba-2 (``Mamba2Mixer``), each a
``StateSpaceLayer`` with a per-request state slot instead of a KV cache.

A mixer declares its cache as a ``MambaStateSpec`` (``kv_cache_spec``): the runner gives
it ``num_slots`` slots once (``allocate_state``) -- ``conv_state [slots, C, d_conv - 1]``
in the model dtype and ``ssm_state`` in float32 -- and every step's metadata says which
slot each request uses (``AttentionMetadata.state_slots_dev``, from the scheduler through
the runner's persistent buffers; None in a profiling pass). A request whose tokens before this step were computed continues from
its slot; one starting (a fresh prompt, or one resumed after preemption: recompute)
starts from zeros. Chunked prefill simply continues the state from chunk to chunk.

No tensor parallelism: the mixers hold their whole weights (refused under TP > 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvasir.attention.backend import AttentionMetadata
from kvasir.config import ModelArchConfig
from kvasir.core.kv_cache_spec import MambaStateSpec
from kvasir.kernels.mamba import causal_conv1d, selective_scan, ssd_scan
from kvasir.layers.context import LayerContext
from kvasir.layers.layernorm import RMSNorm
from kvasir.layers.linear import ReplicatedLinear
from kvasir.layers.linear_method import default_weight_loader


def _step_layout(md: AttentionMetadata, x: torch.Tensor, has_state: bool) -> tuple:
    """(query_start_loc, whether each request continues a state, its slot or None).

    When the runner fills the persistent slot buffers (always, once states exist): their
    views. On the GPU the device tensors themselves (so the layer reads nothing from the
    host and a CUDA graph replays with the step's slots); on the CPU, where those
    "device" buffers are host memory, as lists for the torch path. Without them (the
    profiling pass, before states exist): the layout from the host twins, no slots."""
    if md.state_slots_dev is not None and md.state_init_dev is not None:
        slots_t = md.state_slots_dev if has_state else None
        if x.is_cuda:
            return md.query_start_loc, md.state_init_dev, slots_t
        slots = slots_t.tolist() if slots_t is not None else None
        init_l = [bool(v) for v in md.state_init_dev.tolist()]
        return md.query_start_loc.tolist(), init_l, slots
    qsl = md.query_start_loc_cpu[: md.num_reqs + 1].tolist()
    seq = md.seq_lens_cpu[: md.num_reqs].tolist()
    init = [seq[r] > qsl[r + 1] - qsl[r] for r in range(md.num_reqs)]
    return qsl, init, None


class StateSpaceLayer(nn.Module):
    """A layer with one fixed-size state per request (see the module docstring)."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def __init__(self, conv_channels: int, conv_kernel: int, ssm_shape: tuple[int, ...]):
        super().__init__()
        self.conv_shape = (conv_channels, conv_kernel - 1)
        self.ssm_shape = ssm_shape
        self.register_buffer("conv_state", torch.empty(0), persistent=False)
        self.register_buffer("ssm_state", torch.empty(0), persistent=False)

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype) -> MambaStateSpec:
        return MambaStateSpec(
            block_size=block_size,
            dtype=str(dtype).removeprefix("torch."),
            element_size=torch.empty(0, dtype=dtype).element_size(),
            conv_shape=self.conv_shape,
            ssm_shape=self.ssm_shape,
        )

    def allocate_state(self, num_slots: int, device: torch.device) -> int:
        """Zeroed state for ``num_slots`` slots; returns its bytes."""
        dtype = next(self.parameters()).dtype
        self.conv_state = torch.zeros(num_slots, *self.conv_shape, dtype=dtype, device=device)
        self.ssm_state = torch.zeros(num_slots, *self.ssm_shape, dtype=torch.float32, device=device)
        return sum(t.numel() * t.element_size() for t in (self.conv_state, self.ssm_state))

    def _states(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.conv_state.numel() == 0:
            return None, None
        return self.conv_state, self.ssm_state


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = default_weight_loader  # type: ignore[attr-defined]
    return p


def _check_tp(ctx: LayerContext, prefix: str) -> None:
    if ctx.parallel.tp_size > 1:
        raise ValueError(
            f"{prefix}: state-space (Mamba) layers do not support tensor parallelism; "
            f"use tensor_parallel_size 1 (pipeline parallelism works)"
        )


class MambaMixer(StateSpaceLayer):
    """Mamba-1: in_proj -> (x, z); x -> causal conv1d -> SiLU; x_proj -> (dt, B, C);
    dt_proj -> softplus; selective scan with ``A = -exp(A_log)`` and skip ``D``; gated by
    ``silu(z)``; out_proj. Jamba adds RMSNorms on dt, B and C (``ssm_inner_norms``)."""

    def __init__(self, config: ModelArchConfig, ctx: LayerContext, prefix: str) -> None:
        _check_tp(ctx, prefix)
        d, n, k = config.ssm_intermediate_size, config.ssm_state_size, config.ssm_conv_kernel
        super().__init__(d, k, (d, n))
        h, r, dt = config.hidden_size, config.ssm_dt_rank, ctx.params_dtype
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.in_proj = ReplicatedLinear(h, 2 * d, config.ssm_bias, ctx, f"{prefix}.in_proj")
        self.conv1d_weight = _param(d, 1, k, dtype=dt)
        self.conv1d_bias = _param(d, dtype=dt) if config.ssm_conv_bias else None
        self.x_proj = ReplicatedLinear(d, r + 2 * n, False, ctx, f"{prefix}.x_proj")
        self.dt_proj = ReplicatedLinear(r, d, True, ctx, f"{prefix}.dt_proj")
        self.A_log = _param(d, n, dtype=dt)
        self.D = _param(d, dtype=dt)
        self.out_proj = ReplicatedLinear(d, h, config.ssm_bias, ctx, f"{prefix}.out_proj")
        self.inner_norms = config.ssm_inner_norms
        if self.inner_norms:
            eps = config.rms_norm_eps
            self.dt_layernorm = RMSNorm(r, eps=eps)
            self.b_layernorm = RMSNorm(n, eps=eps)
            self.c_layernorm = RMSNorm(n, eps=eps)

    def forward(self, x: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        conv_state, ssm_state = self._states()
        qsl, init, slots = _step_layout(md, x, conv_state is not None)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        w = self.conv1d_weight.view(self.d_inner, -1)
        xs = causal_conv1d(xs.contiguous(), w, self.conv1d_bias, qsl, init, conv_state, slots)
        dt, b, c = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        dt = self.dt_proj(dt)
        a = -torch.exp(self.A_log.float())
        y = selective_scan(
            xs, dt, a, b.contiguous(), c.contiguous(), self.D, z.contiguous(), qsl, init,
            ssm_state, slots,
        )  # fmt: skip
        return self.out_proj(y)


class Mamba2Mixer(StateSpaceLayer):
    """Mamba-2: in_proj -> (z, xBC, dt); xBC -> causal conv1d -> SiLU -> (x, B, C); the
    chunked SSD scan over ``num_heads`` heads (scalar ``A`` per head, B/C per group,
    ``dt_bias``, skip ``D``); a gated RMSNorm per group ``norm(y * silu(z))``; out_proj."""

    def __init__(self, config: ModelArchConfig, ctx: LayerContext, prefix: str) -> None:
        _check_tp(ctx, prefix)
        d, n, k = config.ssm_intermediate_size, config.ssm_state_size, config.ssm_conv_kernel
        heads, p, g = config.ssm_num_heads, config.ssm_head_dim, config.ssm_n_groups
        if heads % g:
            raise ValueError(f"{prefix}: n_groups ({g}) must divide num_heads ({heads})")
        conv_dim = d + 2 * g * n
        super().__init__(conv_dim, k, (heads, p, n))
        h, dt = config.hidden_size, ctx.params_dtype
        self.d_inner, self.d_state, self.num_heads, self.head_dim = d, n, heads, p
        self.n_groups, self.conv_dim = g, conv_dim
        self.chunk_size = config.ssm_chunk_size
        self.dt_limit = config.ssm_time_step_limit
        self.in_proj = ReplicatedLinear(
            h, d + conv_dim + heads, config.ssm_bias, ctx, f"{prefix}.in_proj"
        )
        self.conv1d_weight = _param(conv_dim, 1, k, dtype=dt)
        self.conv1d_bias = _param(conv_dim, dtype=dt) if config.ssm_conv_bias else None
        self.dt_bias = _param(heads, dtype=dt)
        self.A_log = _param(heads, dtype=dt)
        self.D = _param(heads, dtype=dt)
        self.norm_weight = _param(d, dtype=dt)
        self.eps = config.rms_norm_eps
        self.out_proj = ReplicatedLinear(d, h, config.ssm_bias, ctx, f"{prefix}.out_proj")

    def forward(self, x: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        conv_state, ssm_state = self._states()
        qsl, init, slots = _step_layout(md, x, conv_state is not None)
        t = x.shape[0]
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        w = self.conv1d_weight.view(self.conv_dim, -1)
        xbc = causal_conv1d(xbc.contiguous(), w, self.conv1d_bias, qsl, init, conv_state, slots)
        gn = self.n_groups * self.d_state
        xs, b, c = xbc.split([self.d_inner, gn, gn], dim=-1)
        y = ssd_scan(
            xs.reshape(t, self.num_heads, self.head_dim),
            dt.contiguous(),
            self.dt_bias,
            -torch.exp(self.A_log.float()),
            b.reshape(t, self.n_groups, self.d_state),
            c.reshape(t, self.n_groups, self.d_state),
            self.D,
            qsl,
            init,
            ssm_state,
            slots,
            chunk_size=self.chunk_size,
            dt_limit=self.dt_limit,
        ).reshape(t, self.d_inner)
        # Gated RMSNorm per group of d_inner / n_groups channels, in float32.
        yf = y.float() * F.silu(z.float())
        yg = yf.view(t, self.n_groups, -1)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.norm_weight * yg.view(t, self.d_inner).to(x.dtype)
        return self.out_proj(y)
