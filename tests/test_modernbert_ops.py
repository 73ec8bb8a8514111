"""Tier 1: ModernBERT's ops on the torch backend, forward and every gradient: apply_rotary
(flash-attn's apply_rotary_emb meaning; transformers' ModernBERT rotary), linear_geglu (the MLP's
Wi + GELU * gate) and add_layer_norm without bias, against plain PyTorch and transformers."""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from tests.helpers import assert_close_by_rule

f64 = torch.float64


def _cos_sin(positions, rotary_dim, dtype=torch.float32, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=f64) / rotary_dim)
    freqs = torch.arange(positions, dtype=f64)[:, None] * inv
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def plain_rotary(x, cos, sin, positions, interleaved):
    """flash-attn's apply_rotary_emb_torch, with each row's cos/sin picked by its position."""
    rd = 2 * cos.shape[-1]
    c, s = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)  # (..., 1, rd/2)
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        x1, x2 = x[..., :rd:2], x[..., 1:rd:2]
        turned = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        x1, x2 = x[..., :rd // 2], x[..., rd // 2:rd]
        turned = torch.cat((-x2, x1), -1)
    return torch.cat((x[..., :rd] * c + turned * s, x[..., rd:]), -1)


def test_rotary_matches_transformers_modernbert():
    from transformers import ModernBertConfig
    from transformers.models.modernbert import modeling_modernbert as mb
    config = ModernBertConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=3)
    rotary = mb.ModernBertRotaryEmbedding(config)
    x = torch.randn(2, 13, 2, 32, requires_grad=True)
    for layer_type in ("full_attention", "sliding_attention"):  # their own rope thetas
        position_ids = torch.arange(13).unsqueeze(0)
        cos, sin = rotary(x, position_ids, layer_type)  # (1, S, D): the halves repeated
        want, _ = mb.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
        got = fastbert.apply_rotary(x, cos[0, :, :16], sin[0, :, :16])
        torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_padded_by_rule(interleaved, rotary_dim, dtype):
    torch.manual_seed(0)
    b, s, h, d = 3, 17, 2, 16
    cos, sin = _cos_sin(40, rotary_dim)
    offsets = torch.tensor([0, 5, 23])
    positions = torch.arange(s).view(1, s) + offsets.view(-1, 1)
    x = torch.randn(b, s, h, d, dtype=dtype, requires_grad=True)
    xd = x.detach().double().requires_grad_()
    got = fastbert.apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    plain = plain_rotary(x, cos.to(dtype), sin.to(dtype), positions, interleaved)
    exact = plain_rotary(xd, cos.double(), sin.double(), positions, interleaved)
    assert_close_by_rule(got, plain, exact, "rotary")
    g = torch.randn_like(got)
    (dx,), (dplain,), (dexact,) = (torch.autograd.grad(o, i, g.to(o.dtype)) for o, i in
                                   ((got, x), (plain, x), (exact, xd)))
    assert_close_by_rule(dx, dplain, dexact, "rotary dx")


def test_rotary_packed_restarts_per_sequence():
    torch.manual_seed(1)
    cos, sin = _cos_sin(30, 16)
    lengths = [5, 0, 11, 1]
    cu = torch.tensor([0, 5, 5, 16, 17], dtype=torch.int32)
    x = torch.randn(17, 2, 16, requires_grad=True)
    got = fastbert.apply_rotary(x, cos, sin, cu_seqlens=cu, max_seqlen=11, seqlen_offsets=3)
    starts = [0, 5, 5, 16]
    want = torch.cat([fastbert.apply_rotary(x[None, st:st + n], cos, sin, seqlen_offsets=3)[0]
                      for st, n in zip(starts, lengths) if n])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0],
                               torch.autograd.grad(want, x, g)[0], rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_rotary_gradcheck(packed):
    cos, sin = _cos_sin(20, 6, dtype=f64)
    if packed:
        x = torch.randn(9, 2, 8, dtype=f64, requires_grad=True)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        fn = lambda t: fastbert.apply_rotary(t, cos, sin, cu_seqlens=cu, max_seqlen=5,  # noqa
                                             seqlen_offsets=torch.tensor([2, 0]))
    else:
        x = torch.randn(2, 5, 2, 8, dtype=f64, requires_grad=True)
        fn = lambda t: fastbert.apply_rotary(t, cos, sin, interleaved=True, seqlen_offsets=1)  # noqa
    assert torch.autograd.gradcheck(fn, (x,))


def test_rotary_takes_strided_qk_views_of_a_packed_projection():
    torch.manual_seed(2)
    cos, sin = _cos_sin(12, 8)
    qkv = torch.randn(12, 3 * 2 * 8).view(12, 3, 2, 8)
    qk = qkv[:, :2].flatten(1, 2)  # (T, 2H, D) view: q and k heads turned in one call
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    got = fastbert.apply_rotary(qk, cos, sin, cu_seqlens=cu, max_seqlen=7)
    want = fastbert.apply_rotary(qk.contiguous(), cos, sin, cu_seqlens=cu, max_seqlen=7)
    assert torch.equal(got, want)


ROTARY_BAD = [
    (dict(x=torch.randn(4, 2, 8)), "'x' expected a (B, S, H, D)"),
    (dict(cos=torch.randn(20, 5)), "'cos' expected shape"),
    (dict(sin=torch.randn(20, 3)), "'sin' expected shape"),
    (dict(cos=torch.randn(3, 4), sin=torch.randn(3, 4)), "at least 5 positions"),
    (dict(seqlen_offsets=-1), "'seqlen_offsets'"),
    (dict(seqlen_offsets=torch.tensor([1.0, 2.0])), "'seqlen_offsets'"),
    (dict(max_seqlen=5), "'max_seqlen' goes with cu_seqlens"),
    (dict(cos=torch.randn(20, 4, requires_grad=True)), "'cos' requires grad"),
]


@pytest.mark.parametrize("override,text", ROTARY_BAD)
def test_rotary_validation(override, text):
    args = dict(x=torch.randn(2, 5, 2, 8), cos=torch.randn(20, 4), sin=torch.randn(20, 4))
    args.update(override)
    x, cos, sin = args.pop("x"), args.pop("cos"), args.pop("sin")
    with pytest.raises(ValueError, match="fastbert.apply_rotary") as e:
        fastbert.apply_rotary(x, cos, sin, **args)
    assert text in str(e.value)


def test_rotary_opcheck():
    x = torch.randn(2, 5, 2, 8, requires_grad=True)
    cos, sin = torch.randn(9, 4), torch.randn(9, 4)
    positions = torch.arange(5).view(1, 5) + torch.tensor([[0], [3]])
    torch.library.opcheck(torch.ops.fastbert.apply_rotary.default,
                          (x, cos, sin, positions, False, False, "torch"))


# --------------------------------------------------------------------------------------------
# linear_geglu
# --------------------------------------------------------------------------------------------

def plain_geglu(x, weight, bias, approximate="none"):
    a, g = F.linear(x, weight, bias).chunk(2, dim=-1)  # ModernBertMLP: Wi(x).chunk(2)
    return F.gelu(a, approximate=approximate) * g


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_geglu_by_rule(with_bias, approximate, dtype):
    torch.manual_seed(3)
    x = torch.randn(2, 9, 24, dtype=dtype, requires_grad=True)
    w = (torch.randn(2 * 40, 24) * 24 ** -0.5).to(dtype).requires_grad_()
    b = torch.randn(80, dtype=dtype, requires_grad=True) if with_bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    got = fastbert.linear_geglu(x, w, b, approximate=approximate)
    plain = plain_geglu(x, w, b, approximate)
    exact = plain_geglu(*exact_inputs, *([None] if not with_bias else []), approximate)
    assert_close_by_rule(got, plain, exact, "geglu")
    g = torch.randn_like(got)
    for name, a, p, e in zip("xwb", torch.autograd.grad(got, inputs, g),
                             torch.autograd.grad(plain, inputs, g),
                             torch.autograd.grad(exact, exact_inputs, g.double())):
        assert_close_by_rule(a, p, e, f"geglu d{name}")


def test_linear_geglu_matches_modernbert_mlp_input():
    from transformers import ModernBertConfig
    from transformers.models.modernbert import modeling_modernbert as mb
    config = ModernBertConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2)
    mlp = mb.ModernBertMLP(config)
    x = torch.randn(7, 32)
    a, g = mlp.Wi(x).chunk(2, dim=-1)
    with torch.no_grad():  # the CPU inference path (oneDNN GEMM) and the autograd one
        inference = fastbert.linear_geglu(x, mlp.Wi.weight, mlp.Wi.bias)
    training = fastbert.linear_geglu(x, mlp.Wi.weight, mlp.Wi.bias)
    for got in (inference, training):
        torch.testing.assert_close(got, mlp.act(a) * g, rtol=1e-5, atol=1e-5)


def test_linear_geglu_gradcheck():
    x = torch.randn(5, 6, dtype=f64, requires_grad=True)
    w = torch.randn(8, 6, dtype=f64, requires_grad=True)
    b = torch.randn(8, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: fastbert.linear_geglu(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: fastbert.linear_geglu(x, w, approximate="tanh"),
                                    (x, w))
    # flash-attn-style positional form, as issue 20 writes the signature
    torch.testing.assert_close(fastbert.linear_geglu(x, w, b, "tanh"),
                               fastbert.linear_geglu(x, w, b, approximate="tanh"))


GEGLU_BAD = [
    (dict(weight=torch.randn(9, 6)), ValueError, "'weight' expected shape (2N, K=6)"),
    (dict(weight=torch.randn(8, 5)), ValueError, "'weight' expected shape"),
    (dict(bias=torch.randn(4)), ValueError, "'bias' expected shape (8,)"),
    (dict(bias=torch.randn(8, dtype=f64)), TypeError, "one dtype"),
    (dict(approximate="erf"), ValueError, "'approximate'"),
    (dict(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, "'x' expected dtype"),
]


@pytest.mark.parametrize("override,exc,text", GEGLU_BAD)
def test_linear_geglu_validation(override, exc, text):
    args = dict(x=torch.randn(4, 6), weight=torch.randn(8, 6), bias=None)
    args.update(override)
    with pytest.raises(exc, match="fastbert.linear_geglu") as e:
        fastbert.linear_geglu(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)
    assert text in str(e.value)


def test_linear_geglu_opcheck():
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    for b in (None, torch.randn(10, requires_grad=True)):
        torch.library.opcheck(torch.ops.fastbert.linear_geglu_fwd.default,
                              (x, w, b, "none", "torch"))
    out, pre = torch.ops.fastbert.linear_geglu_fwd(x, w, None, "tanh", "torch")
    torch.library.opcheck(torch.ops.fastbert.linear_geglu_bwd.default,
                          (torch.randn(6, 5), x.detach(), w.detach(), pre, "tanh", "torch"))


# --------------------------------------------------------------------------------------------
# add_layer_norm without bias (ModernBERT's norms)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_residual", [False, True])
def test_add_layer_norm_without_bias_matches_layer_norm(with_residual):
    torch.manual_seed(4)
    norm = torch.nn.LayerNorm(24, eps=1e-5, bias=False)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 24, requires_grad=True)
    r = torch.randn(3, 5, 24, requires_grad=True) if with_residual else None
    got = fastbert.add_layer_norm(x, r, norm.weight, None, 1e-5)
    want = norm(x + r if r is not None else x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inputs = [t for t in (x, r, norm.weight) if t is not None]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xd, wd = torch.randn(3, 6, dtype=f64, requires_grad=True), torch.randn(6, dtype=f64,
                                                                           requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fastbert.add_layer_norm(x, None, w, None, 1e-5),
                                    (xd, wd))
