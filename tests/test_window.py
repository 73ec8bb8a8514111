"""Tier 1: sliding-window attention (window_size, flash-attn's meaning) on the torch backend,
padded and packed, forward and every gradient, against plain PyTorch math with a dense band
mask; the blocked O(S * window) path never builds an S x S mask."""
import pytest
import torch

import fastbert
from fastbert import cpu_attention, reference, varlen, window as sliding
from tests.helpers import assert_close_by_rule, random_padding_mask

f64 = torch.float64


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """8-row query blocks in a forward no backward follows, 16 otherwise, so short sequences
    (fast tests) still span several blocks. These tests are the blocked ATen path's: fastbert's
    CPU kernel, which would take fp32 forwards, is off (tests/test_cpu_attention.py has its own)."""
    monkeypatch.setattr(cpu_attention, "_enabled", False)
    monkeypatch.setattr(sliding, "FORWARD_BLOCK", 8)
    monkeypatch.setattr(sliding, "BACKWARD_BLOCK", 16)
    sliding._bands.clear()
    yield
    sliding._bands.clear()


def plain_attention(q, k, v, mask, causal, window):
    """Softmax attention with the band written out: query i sees key j when
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (and j <= i + Sk - Sq when causal); a query
    that sees nothing gives zeros. q (B, Sq, H, D), k, v (B, Sk, H, D)."""
    sq, sk = q.shape[1], k.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    i = torch.arange(sq).view(sq, 1) + (sk - sq)
    j = torch.arange(sk).view(1, sk)
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window[0] >= 0:
        ok &= j >= i - window[0]
    if window[1] >= 0:
        ok &= j <= i + window[1]
    ok = ok.view(1, 1, sq, sk)
    if mask is not None:
        ok = ok & mask.view(-1, 1, 1, sk)
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _check_by_rule(run, q, k, v, name):
    """run(q, k, v) -> out for fastbert; the plain math run in fp32 and in fp64 (exact)."""
    fast = run(q, k, v, fastbert_call=True)
    plain = run(q, k, v, fastbert_call=False)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = run(qd, kd, vd, fastbert_call=False)
    g = torch.randn_like(fast)
    assert_close_by_rule(fast, plain, exact, f"{name} out")
    for what, a, b, c in zip("qkv", _grads(fast, (q, k, v), g), _grads(plain, (q, k, v), g),
                             _grads(exact, (qd, kd, vd), g.double())):
        assert_close_by_rule(a, b, c, f"{name} d{what}")


WINDOWS = [(3, 5), (0, 0), (20, 20), (7, -1), (-1, 2), (100, 100)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(40, 40), (13, 40), (40, 13), (1, 1)])
def test_padded_window_matches_plain_math(window, causal, sq, sk):
    torch.manual_seed(0)
    q = torch.randn(2, sq, 3, 16, requires_grad=True)
    k, v = (torch.randn(2, sk, 3, 16, requires_grad=True) for _ in range(2))
    mask = random_padding_mask(2, sk, mode="with_empty")

    def run(q, k, v, fastbert_call):
        if fastbert_call:
            return fastbert.attention(q, k, v, mask, causal=causal, window_size=window)
        return plain_attention(q, k, v, mask, causal, window)

    _check_by_rule(run, q, k, v, f"window {window} causal {causal}")


def _packed(lengths, h=3, d=16, dtype=torch.float32):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    return cu, [torch.randn(total, h, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def _per_sequence(fn, q, k, v, cu_q, cu_k):
    outs = []
    for b in range(cu_q.numel() - 1):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if rq.stop > rq.start:
            outs.append(fn(q[None, rq], k[None, rk], v[None, rk])[0])
    return torch.cat(outs)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_window_matches_plain_math_per_sequence(window, causal):
    torch.manual_seed(1)
    lengths = [40, 0, 1, 23, 35, 16]
    cu, (q, k, v) = _packed(lengths)

    def run(q, k, v, fastbert_call):
        if fastbert_call:
            return fastbert.attention_varlen(q, k, v, cu, cu, 40, 40, causal=causal,
                                             window_size=window)
        return _per_sequence(lambda a, b, c: plain_attention(a, b, c, None, causal, window),
                             q, k, v, cu, cu)

    _check_by_rule(run, q, k, v, f"varlen window {window} causal {causal}")


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_window_with_other_key_lengths(causal):
    """cu_seqlens_k != cu_seqlens_q: the band is bottom-right aligned in each sequence."""
    torch.manual_seed(2)
    cu_q = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 20, 41], dtype=torch.int32)
    q = torch.randn(20, 2, 8, requires_grad=True)
    k, v = (torch.randn(41, 2, 8, requires_grad=True) for _ in range(2))
    window = (4, 2)

    def run(q, k, v, fastbert_call):
        if fastbert_call:
            return fastbert.attention_varlen(q, k, v, cu_q, cu_k, 12, 21, causal=causal,
                                             window_size=window)
        return _per_sequence(lambda a, b, c: plain_attention(a, b, c, None, causal, window),
                             q, k, v, cu_q, cu_k)

    _check_by_rule(run, q, k, v, "varlen q/k lengths")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_window_gradcheck(packed, dropout_p):
    """fp64 (the reference's explicit formulas on the blocked layout), sequences longer than one
    block, with dropout drawn once per call."""
    torch.manual_seed(3)
    if packed:
        cu, (q, k, v) = _packed([20, 3, 0, 17], h=1, d=2, dtype=f64)
    else:
        q, k, v = (torch.randn(2, 20, 1, 2, dtype=f64, requires_grad=True) for _ in range(3))
        mask = random_padding_mask(2, 20, mode="third")

    def fn(q, k, v):
        torch.manual_seed(7)  # the same dropout pattern on every gradcheck call
        if packed:
            return fastbert.attention_varlen(q, k, v, cu, cu, 20, 20, window_size=(5, 3),
                                             dropout_p=dropout_p)
        return fastbert.attention(q, k, v, mask, window_size=(5, 3), dropout_p=dropout_p)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_backward_on_other_blocks_than_its_forward(packed):
    """q needs no gradient, k and v do: the forward runs in FORWARD_BLOCK-row blocks and the
    backward in BACKWARD_BLOCK ones (lse travels per query, not per block); out, dK and dV by the
    rule against the plain math."""
    torch.manual_seed(3)
    window, s = (5, 3), 40
    q = torch.randn(2, s, 3, 16)
    k, v = (torch.randn(2, s, 3, 16, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)

    def run(q, k, v, fastbert_call):
        if not fastbert_call:
            return plain_attention(q, k, v, None, False, window)
        if packed:
            flat = (t.reshape(2 * s, 3, 16) for t in (q, k, v))
            return fastbert.attention_varlen(*flat, cu, cu, s, s,
                                             window_size=window).view(2, s, 3, 16)
        return fastbert.attention(q, k, v, window_size=window)

    fast, plain = run(q, k, v, True), run(q, k, v, False)
    kd, vd = (t.detach().double().requires_grad_() for t in (k, v))
    exact = run(q.double(), kd, vd, False)
    g = torch.randn_like(fast)
    assert_close_by_rule(fast, plain, exact, "out")
    for what, a, b, c in zip("kv", _grads(fast, (k, v), g), _grads(plain, (k, v), g),
                             _grads(exact, (kd, vd), g.double())):
        assert_close_by_rule(a, b, c, f"d{what}")
    assert {band.block for _, band in sliding._bands.values()} == {sliding.FORWARD_BLOCK,
                                                                   sliding.BACKWARD_BLOCK}


def test_window_dropout_is_reproducible_and_stays_in_the_band():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 60, 2, 8, requires_grad=True) for _ in range(3))

    def run():
        torch.manual_seed(11)
        return fastbert.attention(q, k, v, window_size=(2, 2), dropout_p=0.3)

    a, b = run(), run()
    assert torch.equal(a, b)
    # query 30 depends only on keys 28..32
    (dk,) = torch.autograd.grad(a[0, 30].sum(), k)
    touched = dk[0].abs().sum((-1, -2)).nonzero().flatten().tolist()
    assert touched and set(touched) <= set(range(28, 33))


def test_local_layer_never_builds_a_dense_mask(monkeypatch):
    """A window finite on both sides runs the blocked path: no (S x S) mask anywhere, the band's
    mask holds S * (block + window) entries per sequence. Training shares one band (backward's
    block size) between forward and backward; inference builds its own (the forward's)."""
    def dense(*a, **kw):
        raise AssertionError("a dense S x S mask was built")
    monkeypatch.setattr(reference, "attention_visible", dense)
    monkeypatch.setattr(varlen, "_layout", dense)
    made = []
    make_band = sliding.make_band
    monkeypatch.setattr(sliding, "make_band", lambda *a, **kw: made.append(make_band(*a, **kw))
                        or made[-1])
    sliding._bands.clear()
    s, left, right = 300, 8, 8
    q, k, v = (torch.randn(2, s, 2, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, s, dtype=torch.bool)
    fastbert.attention(q, k, v, mask, window_size=(left, right)).sum().backward()
    cu = torch.tensor([0, 180, 300], dtype=torch.int32)
    qp, kp, vp = (t.detach()[0].requires_grad_() for t in (q, k, v))
    fastbert.attention_varlen(qp, kp, vp, cu, cu, 180, 180, window_size=(left, right),
                              causal=True).sum().backward()
    fastbert.attention(q.detach(), k.detach(), v.detach(), mask, window_size=(left, right))
    blocks = [sliding.BACKWARD_BLOCK, sliding.BACKWARD_BLOCK, sliding.FORWARD_BLOCK]
    assert [band.block for band in made] == blocks
    for band, block, batch, span in zip(made, blocks, (2, 1, 2),
                                        (left + right, left, left + right)):
        assert band.visible.numel() == batch * -(-s // block) * block * (block + span)


def test_window_opcheck():
    q, k, v = (torch.randn(2, 40, 2, 8, requires_grad=True) for _ in range(3))
    mask = random_padding_mask(2, 40)
    args = (q, k, v, mask, False, 0.0, 0.3, None, False, "torch", 4, 9)
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)
    cu = torch.tensor([0, 30, 40], dtype=torch.int32)
    qp, kp, vp = (t.detach()[0].requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastbert.attention_varlen_fwd.default,
                          (qp, kp, vp, cu, cu, 30, 30, True, 0.0, 0.3, None, False, "torch", 6,
                           -1))


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), (-2, 0), (0, 1.5), "local", (True, 0)])
def test_window_validation(window):
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="fastbert.attention: argument 'window_size' expected"):
        fastbert.attention(q, q, q, window_size=window)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="fastbert.attention_varlen: argument 'window_size'"):
        fastbert.attention_varlen(q[0], q[0], q[0], cu, cu, 4, 4, window_size=window)
