"""Plain-PyTorch reference of every fastbert op, forward and explicit backward.

These functions are the ground truth the Triton and CUDA kernels are validated against, and the
"torch" backend runs them. Each forward returns what its kernels save for backward; each backward
is written out by hand (not autograd) so the kernels' backward has a formula to match. The tests
check these backward formulas against autograd and fp64 gradcheck.

`upcast=True` computes in fp32 (as the kernels accumulate); `upcast=False` computes in the input
dtype, which is the "plain PyTorch in the same dtype" run of the tolerance rule.

The torch backend runs these on every CPU training step, so casts that are often no-ops are
written `t if t.dtype == dt else t.to(dt)`: even a no-op .to is a Python-level call, and the
host path counts them (DESIGN.md section 3, tests/test_lean.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def _compute_dtype(t: Tensor, upcast: bool) -> torch.dtype:
    if upcast and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 when the inputs are fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dropout_keep_mask(seed: int, shape, p: float, device) -> Tensor:
    """Keep-mask for dropout, regenerated bit-identically from `seed` (forward and backward)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

def attention_visible(key_padding_mask: Optional[Tensor], causal: bool, b: int, sq: int, sk: int,
                      device, window: Tuple[int, int] = (-1, -1)) -> Optional[Tensor]:
    """(B, 1, Sq, Sk) bool: which keys each query may see, or None when all are visible.
    window (left, right), flash-attn's sliding window: query i sees keys j with
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (bottom-right aligned as causal; -1 =
    unbounded)."""
    visible = None
    if key_padding_mask is not None:
        visible = key_padding_mask.bool().view(b, 1, 1, sk)
    left, right = window
    if causal or left >= 0 or right >= 0:
        i = torch.arange(sq, device=device).view(sq, 1)
        j = torch.arange(sk, device=device).view(1, sk)
        offset = j - (i + (sk - sq))  # key distance from the query's bottom-right diagonal
        band = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if causal:
            band &= offset <= 0
        if left >= 0:
            band &= offset >= -left
        if right >= 0:
            band &= offset <= right
        band = band.view(1, 1, sq, sk)
        visible = band if visible is None else visible & band
    if visible is not None:
        visible = visible.expand(b, 1, sq, sk)
    return visible


def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                      causal: bool = False, dropout_p: float = 0.0,
                      softmax_scale: Optional[float] = None, keep_mask: Optional[Tensor] = None,
                      upcast: bool = True, visible: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Tensor]:
    """Returns (out (B, Sq, H, D) in q.dtype, lse (B, H, Sq) fp32).

    `keep_mask` (B, H, Sq, Sk) bool is the dropout keep pattern (required when dropout_p > 0).
    `visible` (B, 1, Sq, Sk) bool, when given, replaces the mask and causal arguments (varlen).
    A query that sees no key gets out = 0 and lse = +inf, so exp(s - lse) = 0 in backward.
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dt = _compute_dtype(q, upcast)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    if dt != q.dtype:
        qh, kh, vh = qh.to(dt), kh.to(dt), vh.to(dt)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if visible is None:
        visible = attention_visible(key_padding_mask, causal, b, sq, sk, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    acc = acc_dtype(q)
    if scores.dtype != acc:
        scores = scores.to(acc)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq), -inf where nothing is visible
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    if dt != acc:
        probs = probs.to(dt)
    if dropout_p > 0.0:  # float * bool: the same products as * keep_mask.to(dt), one call less
        probs = probs * keep_mask / (1.0 - dropout_p)
    out = torch.matmul(probs, vh).transpose(1, 2)  # (B, Sq, H, D)
    return (out if dt == q.dtype else out.to(q.dtype)).contiguous(), lse


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                       dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                       keep_mask: Optional[Tensor] = None, upcast: bool = True,
                       visible: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashAttention's backward: recompute P from lse, then dV, dP, dS = P * (dP - rowsum(dO*O)).
    Returns contiguous (dq, dk, dv) in q.dtype."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dt = _compute_dtype(q, upcast)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    oh, doh = out.transpose(1, 2), dout.transpose(1, 2)
    if dt != q.dtype:
        qh, kh, vh, oh, doh = qh.to(dt), kh.to(dt), vh.to(dt), oh.to(dt), doh.to(dt)
    acc = acc_dtype(q)
    up = dt != acc  # computing in fp16/bf16 (upcast=False): statistics still in acc
    scores = torch.matmul(qh, kh.transpose(-1, -2))
    scores = (scores.to(acc) if up else scores) * scale
    if visible is None:
        visible = attention_visible(key_padding_mask, causal, b, sq, sk, q.device)
    probs = torch.exp(scores - lse.unsqueeze(-1))  # lse = +inf on empty rows gives 0
    if visible is not None:
        probs = probs.masked_fill(~visible, 0.0)
    if up:
        probs = probs.to(dt)
    dropped = probs
    if dropout_p > 0.0:  # float * bool as in attention_forward
        dropped = probs * keep_mask / (1.0 - dropout_p)
    dv = torch.matmul(dropped.transpose(-1, -2), doh)  # (B, H, Sk, D)
    dprobs = torch.matmul(doh, vh.transpose(-1, -2))  # (B, H, Sq, Sk)
    if dropout_p > 0.0:
        dprobs = dprobs * keep_mask / (1.0 - dropout_p)
    if up:
        delta = (doh.to(acc) * oh.to(acc)).sum(-1, keepdim=True)  # (B, H, Sq, 1)
        dscores = (probs.to(acc) * (dprobs.to(acc) - delta)).to(dt)
    else:
        delta = (doh * oh).sum(-1, keepdim=True)
        dscores = probs * (dprobs - delta)
    dq = torch.matmul(dscores, kh) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qh) * scale
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if dt != q.dtype:
        dq, dk, dv = dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# --------------------------------------------------------------------------------------------
# residual add + LayerNorm
# --------------------------------------------------------------------------------------------

def prenorm_sum(x: Tensor, residual: Optional[Tensor], dropout_p: float,
                keep_mask: Optional[Tensor], dt: torch.dtype) -> Tensor:
    """dropout(x) + residual in dtype `dt`."""
    s = x if x.dtype == dt else x.to(dt)
    if dropout_p > 0.0:  # float * bool as in attention_forward
        s = s * keep_mask / (1.0 - dropout_p)
    if residual is not None:
        s = s + (residual if residual.dtype == dt else residual.to(dt))
    return s


def add_layer_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor,
                           eps: float = 1e-12, dropout_p: float = 0.0,
                           keep_mask: Optional[Tensor] = None, upcast: bool = True
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm(dropout(x) + residual) over the last dim. Returns (y in x.dtype, mean, rstd),
    mean and rstd fp32 of shape x.shape[:-1]."""
    dt = acc_dtype(x) if upcast else x.dtype
    s = prenorm_sum(x, residual, dropout_p, keep_mask, dt)
    mean = s.mean(-1)
    var = ((s - mean.unsqueeze(-1)) ** 2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    xhat = (s - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    y = xhat * weight.to(s.dtype) + bias.to(s.dtype)
    stat = acc_dtype(x)
    return y.to(x.dtype), mean.to(stat), rstd.to(stat)


def add_layer_norm_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor,
                            mean: Tensor, rstd: Tensor, dropout_p: float = 0.0,
                            keep_mask: Optional[Tensor] = None, dsum: Optional[Tensor] = None
                            ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Returns (dx, dresidual or None, dweight, dbias); the pre-norm sum is recomputed from x.
    dsum: the gradient reaching the pre-norm sum itself (add_layer_norm's return_residual
    output), added to what flows back through the norm."""
    acc = acc_dtype(x)
    s = prenorm_sum(x, residual, dropout_p, keep_mask, acc)
    xhat = (s - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dy.to(acc)
    rows = g.reshape(-1, g.shape[-1])
    dweight = (rows * xhat.reshape(rows.shape)).sum(0)
    dbias = rows.sum(0)
    gw = g * weight.to(acc)
    ds = rstd.unsqueeze(-1) * (gw - gw.mean(-1, keepdim=True)
                               - xhat * (gw * xhat).mean(-1, keepdim=True))
    if dsum is not None:
        ds = ds + dsum.to(acc)
    dx = ds
    if dropout_p > 0.0:
        dx = ds * keep_mask.to(acc) / (1.0 - dropout_p)
    dres = ds.to(residual.dtype, copy=True) if residual is not None else None  # never alias dx
    return dx.to(x.dtype), dres, dweight.to(weight.dtype), dbias.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# linear + bias + GELU
# --------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_grad(x: Tensor, approximate: str = "none") -> Tensor:
    """d gelu(x) / dx."""
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def linear_bias_gelu_forward(x: Tensor, weight: Tensor, bias: Tensor, approximate: str = "none",
                             upcast: bool = True) -> Tuple[Tensor, Tensor]:
    """gelu(x @ weight.T + bias). Returns (out, pre-activation), both in x.dtype."""
    pre = torch.nn.functional.linear(x, weight, bias)  # (..., N); fp32 accumulation in GEMMs
    act = gelu(pre.to(acc_dtype(pre)) if upcast else pre, approximate)
    return act.to(x.dtype), pre


def linear_bias_gelu_backward(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor,
                              approximate: str = "none") -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias)."""
    acc = acc_dtype(pre)
    dpre = (dout.to(acc) * gelu_grad(pre.to(acc), approximate)).to(x.dtype)
    return linear_backward(dpre, x, weight)


def linear_backward(dpre: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of x @ weight.T + bias, given the gradient at its output."""
    dpre2d = dpre.flatten(0, -2)  # (M, N); flatten, not reshape(-1, N): N or K may be 0
    x2d = x.flatten(0, -2)  # (M, K)
    dx = torch.matmul(dpre, weight)
    dweight = torch.matmul(dpre2d.t(), x2d)
    acc = acc_dtype(dpre)
    dbias = (dpre2d if dpre2d.dtype == acc else dpre2d.to(acc)).sum(0)
    if dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    return dx, dweight, dbias if dbias.dtype == weight.dtype else dbias.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# linear + GeGLU (ModernBERT's MLP input): gelu(x W_a^T + b_a) * (x W_g^T + b_g), W = [W_a; W_g]
# --------------------------------------------------------------------------------------------

def linear_geglu_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         approximate: str = "none", upcast: bool = True) -> Tuple[Tensor, Tensor]:
    """Returns (out (..., N), pre-activation (..., 2N)), both in x.dtype."""
    pre = torch.nn.functional.linear(x, weight, bias)
    act, gate = (pre.to(acc_dtype(pre)) if upcast else pre).chunk(2, dim=-1)
    return (gelu(act, approximate) * gate).to(x.dtype), pre


def linear_geglu_backward(dout: Tensor, x: Tensor, weight: Tensor, pre: Tensor,
                          approximate: str = "none") -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias); dbias is the gradient a bias would get."""
    acc = acc_dtype(pre)
    act, gate = pre.to(acc).chunk(2, dim=-1)
    g = dout.to(acc)
    dpre = torch.cat([g * gate * gelu_grad(act, approximate), g * gelu(act, approximate)], dim=-1)
    return linear_backward(dpre.to(x.dtype), x, weight)


# --------------------------------------------------------------------------------------------
# rotary embeddings (flash-attn's apply_rotary_emb)
# --------------------------------------------------------------------------------------------

def rotary_forward(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                   interleaved: bool = False, conjugate: bool = False,
                   upcast: bool = True) -> Tensor:
    """x (..., H, D) whose rows sit at `positions` (x.shape[:-2], int64); cos and sin (S_ro, R/2).
    The first R dims of each head turn by the angle of the row's position: pairs (i, i + R/2), or
    (2i, 2i + 1) when interleaved; the rest pass through. conjugate turns the other way (backward).
    Returns x.dtype."""
    half = cos.shape[-1]
    dt = acc_dtype(x) if upcast else x.dtype
    c = cos.index_select(0, positions.reshape(-1)).view(*positions.shape, 1, half).to(dt)
    s = sin.index_select(0, positions.reshape(-1)).view(*positions.shape, 1, half).to(dt)
    if conjugate:
        s = -s
    turned = x[..., :2 * half].to(dt)
    if interleaved:
        x1, x2 = turned[..., 0::2], turned[..., 1::2]
    else:
        x1, x2 = turned[..., :half], turned[..., half:]
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    turned = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), -1)
    return torch.cat((turned.to(x.dtype), x[..., 2 * half:]), dim=-1)


def rotary_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                interleaved: bool = False, conjugate: bool = False) -> None:
    """rotary_forward's math written into `out` (x's shape, any strides) with no concatenations:
    in place on fp32 halves, ~2 passes over x instead of ~5. The torch backend's apply_rotary,
    and how its banded attention writes turned q and k straight into its block layout."""
    half = cos.shape[-1]
    acc = acc_dtype(x)
    c = cos.index_select(0, positions.reshape(-1)).view(*positions.shape, 1, half).to(acc)
    s = sin.index_select(0, positions.reshape(-1)).view(*positions.shape, 1, half).to(acc)
    if conjugate:
        s = -s
    pairs = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else \
        (slice(0, half), slice(half, 2 * half))
    x1, x2 = (x[..., p].to(acc) for p in pairs)
    o1, o2 = (out[..., p] for p in pairs)
    if x.dtype == acc:  # written in place: x1 c - x2 s, x1 s + x2 c
        torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1.0)
        torch.mul(x1, s, out=o2).addcmul_(x2, c)
    else:
        o1.copy_(x1 * c - x2 * s)
        o2.copy_(x1 * s + x2 * c)
    if x.shape[-1] > 2 * half:
        out[..., 2 * half:] = x[..., 2 * half:]
