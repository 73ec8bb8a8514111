"""Interpreter tier: the parts of the op contract that sit between the public ops and the Triton
kernels — opcheck and torch.compile of the attention op, and torch.autocast for all three ops."""
import pytest
import torch

import fastbert
from tests.helpers import assert_fp32_close, random_padding_mask

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter


def test_attention_opcheck_and_compile():
    q, k, v = (torch.randn(2, s, 2, 16, requires_grad=True) for s in (5, 7, 7))
    mask = random_padding_mask(2, 7, mode="with_empty")
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default,
                          (q, k, v, mask, True, 0.0, 0.25, None, False, "triton"))
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, mask, True, 0.0, 0.25, None, False,
                                                "triton")
    torch.library.opcheck(torch.ops.fastbert.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse, mask, True, 0.0, 0.25, None, True, "triton"))
    compiled = torch.compile(lambda q, k, v: fastbert.attention(q, k, v, mask, causal=True,
                                                                backend="triton"),
                             fullgraph=True, backend="eager")
    expected = fastbert.attention(q, k, v, mask, causal=True, backend="torch")
    assert_fp32_close(compiled(q, k, v), expected, "compiled attention")


def test_autocast_runs_triton_ops_in_half_precision():
    """Under autocast the ops take the autocast dtype like F.linear / SDPA do, on any backend;
    add_layer_norm the dtype torch's LayerNorm(h + residual) would (fp32 beside fp32)."""
    x = torch.randn(2, 5, 16)
    w, b = torch.randn(32, 16), torch.randn(32)
    ln_w, ln_b = torch.ones(32), torch.zeros(32)
    results = {}
    for backend in ("triton", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = fastbert.linear_bias_gelu(x, w, b, backend=backend)
            y = fastbert.add_layer_norm(h, h.float(), ln_w, ln_b, backend=backend)
            q = y.view(2, 5, 2, 16)
            o = fastbert.attention(q, q, q, backend=backend)
        assert h.dtype == o.dtype == torch.bfloat16 and y.dtype == torch.float32
        results[backend] = o.float()
    torch.testing.assert_close(results["triton"], results["torch"], atol=5e-2, rtol=5e-2)
