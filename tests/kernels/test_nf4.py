"""NF4 / FP4 in bitsandbytes' layout (``kvasir.kernels.nf4``): the torch dequantiser
against bitsandbytes' own ``dequantize_4bit`` on weights bitsandbytes quantised (double-
quantised absmax), kvasir's quantiser read back by bitsandbytes, and the Triton GEMM /
GEMV against the dequantise-then-multiply reference."""

from __future__ import annotations

import pytest
import torch
from kvtest_utils import DEVICE, ON_GPU, rel_err

bnb_f = pytest.importorskip("bitsandbytes.functional")

from kvasir.kernels.nf4 import (  # noqa: E402
    FP4_CODE,
    NF4_CODE,
    NF4Weight,
    dequantize_nf4,
    nf4_matmul,
    nf4_matmul_ref,
    quantize_nf4,
)

ACT_DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _from_bnb(q: torch.Tensor, st) -> NF4Weight:  # noqa: ANN001
    return NF4Weight(q.reshape(-1), st.code.float(), st.absmax, st.state2.code.float(),
                     st.state2.absmax.float(), float(st.offset), tuple(st.shape))  # fmt: skip


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (48, 320), (300, 64)])
def test_dequantize_matches_bitsandbytes(quant_type, shape) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, st = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    ours = _from_bnb(q, st)
    assert ours.code.tolist() == pytest.approx(list(NF4_CODE if quant_type == "nf4" else FP4_CODE))
    want = bnb_f.dequantize_4bit(q, st).float()
    assert torch.allclose(dequantize_nf4(ours), want, atol=1e-6, rtol=1e-6)


def test_kvasir_quantiser_read_back_by_bitsandbytes() -> None:
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(1))
    ours = quantize_nf4(w)
    st = bnb_f.QuantState(
        absmax=ours.absmax_q, shape=torch.Size(ours.shape), code=ours.code, blocksize=64,
        quant_type="nf4", dtype=torch.float32, offset=torch.tensor(ours.offset),
        state2=bnb_f.QuantState(absmax=ours.nested_absmax, code=ours.nested_code,
                                blocksize=256, dtype=torch.float32),
    )  # fmt: skip
    back = bnb_f.dequantize_4bit(ours.packed.reshape(-1, 1), st).float()
    assert torch.allclose(dequantize_nf4(ours), back, atol=1e-6, rtol=1e-6)
    # and it is a 4-bit quantisation of w: about as close as bitsandbytes' own
    q, bst = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_err = (bnb_f.dequantize_4bit(q, bst) - w).pow(2).mean()
    assert (back - w).pow(2).mean() < 1.05 * bnb_err


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("shape", [(40, 96), (72, 320)])
def test_triton_matches_reference(m, shape) -> None:
    n, k = shape
    w = quantize_nf4(torch.randn(n, k, generator=torch.Generator().manual_seed(2)))
    w = NF4Weight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, ACT_DTYPE)
    y = nf4_matmul(x, w)
    assert y.shape == (m, n)
    assert rel_err(y, nf4_matmul_ref(x, w)) < (1e-2 if ON_GPU else 1e-5)
