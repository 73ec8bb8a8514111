"""RoPE fused into packed attention: `fastbert.attention_varlen(..., rotary=(cos, sin))` (issue 20).

The Triton forward turns q and k as its tiles load (fastbert/triton/rotary_tile.py); its
backward turns them again and turns dq, dk back. Compared here with the reference math of
apply_rotary, then attention (fastbert.reference), on fresh random packed batches whose
positions restart per sequence, by the tolerance rule, forward and every gradient.

- default: the torch backend's composition equals the public ops it composes, bitwise; bad
  tables and offsets are refused before any kernel runs
- interpreter (`TRITON_INTERPRET=1 python -m pytest -m interpreter tests/test_rotary_attention.py`):
  the Triton kernels, plain / window / causal / dropout, head dims 64, 40, partial rotary; the
  ModernBERT layers on the Triton backend take the fused path
- compile: the ROTARY_HALF forward at ModernBERT's shapes is spill-free on sm_80 / sm_90
  (tests/test_resources.py lists it; compiled here alone)
- gpu: the same comparison at ModernBERT-base sizes
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import fastbert
from fastbert import ops, reference, varlen
from fastbert.triton import attention as kernels
from tests.helpers import assert_close_by_rule, assert_fp32_close, poison_, rule_factor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _tables(n_positions: int, half: int, dtype, device=DEVICE):
    """cos, sin (n_positions, half) of RoPE's angles (theta 10000), in dtype."""
    inv = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def _packed(lengths, h, d, dtype, device=DEVICE):
    """cu_seqlens and q, k, v as strided views of one packed (T, 3, H, D) projection."""
    cu = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    q, k, v = torch.randn(int(cu[-1]), 3, h, d, dtype=dtype, device=device).unbind(1)
    return cu.to(device), q, k, v


def _offsets(kind, cu):
    """rotary_seqlen_offsets: 0 (positions restart), an int, or per sequence (the model's form:
    each sequence's first row, so row t sits at position t)."""
    return {"restart": 0, "int": 3, "per-sequence": cu[:-1]}[kind]


def _positions(cu, offsets):
    """Each packed row's position: its index in its sequence plus its sequence's offset."""
    rows = []
    for b in range(cu.numel() - 1):
        start = offsets if isinstance(offsets, int) else int(offsets[b])
        rows.append(torch.arange(int(cu[b + 1] - cu[b])) + start)
    return torch.cat(rows).to(cu.device)


def _reference(q, k, v, dout, cos, sin, positions, cu, causal, window, p, scale, keep, upcast):
    """(out, dq, dk, dv): reference.rotary_forward on q and k, then the reference attention per
    sequence; dq and dk turned back (a rotation's gradient is its inverse)."""
    qr, kr = (reference.rotary_forward(t, cos, sin, positions, upcast=upcast) for t in (q, k))
    out, dqr, dkr, dv = (torch.zeros_like(t) for t in (q, q, k, v))
    for b in range(cu.numel() - 1):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        n = rows.stop - rows.start
        if n == 0:
            continue
        one = [t[rows].unsqueeze(0) for t in (qr, kr, v)]
        visible = reference.attention_visible(None, causal, 1, n, n, q.device, window)
        keep_b = None if keep is None else keep[b].to(q.device)
        o, lse = reference.attention_forward(*one, None, False, p, scale, keep_b, upcast,
                                             visible=visible)
        grads = reference.attention_backward(dout[rows].unsqueeze(0), *one, o, lse, None, False,
                                             p, scale, keep_b, upcast, visible=visible)
        out[rows] = o[0]
        dqr[rows], dkr[rows], dv[rows] = (g[0] for g in grads)
    dq, dk = (reference.rotary_forward(g, cos, sin, positions, conjugate=True, upcast=upcast)
              for g in (dqr, dkr))
    return out, dq, dk, dv


def _fused(q, k, v, dout, cu, max_seqlen, cos, sin, offsets, causal, window, p, scale,
           deterministic, backend="triton"):
    """(out, dq, dk, dv) of the public op with rotary=, through autograd."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fastbert.attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal,
                                    window_size=window, dropout_p=p, softmax_scale=scale,
                                    deterministic=deterministic, rotary=(cos, sin),
                                    rotary_seqlen_offsets=offsets, backend=backend)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(got, q, k, v, dout, cos, sin, positions, cu, causal, window, p, scale, keep=None):
    exact = _reference(*(t.double() for t in (q, k, v, dout, cos, sin)), positions, cu, causal,
                       window, p, scale, keep, upcast=True)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == F32:
        for name, g, e in zip(names, got, exact):
            assert_fp32_close(g, e, name)
        return
    plain = _reference(q, k, v, dout, cos, sin, positions, cu, causal, window, p, scale, keep,
                       upcast=False)
    for name, g, pl, e in zip(names, got, plain, exact):
        assert_close_by_rule(g, pl, e, name, factor=rule_factor(q.dtype))


# --------------------------------------------------------------------------------------------
# interpreter tier: the Triton kernels
# --------------------------------------------------------------------------------------------

@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN (unwritten elements show)."""
    monkeypatch.setattr(kernels, "_alloc", lambda shape, dtype, device: poison_(
        torch.empty(shape, dtype=dtype, device=device)))


# lengths with an empty and a one-token sequence, and ones spanning several 64-key tiles (the
# forward's full, boundary and one-sided window loops)
LENGTHS = [37, 0, 1, 130, 65]
CASES = [  # (dtype, head dim, rotary half, causal, window, offsets, deterministic)
    (F16, 64, 32, False, (-1, -1), "restart", False),  # ModernBERT's global layers
    (BF16, 64, 32, False, (8, 8), "per-sequence", True),  # its local ones, as the model calls
    (F32, 64, 32, True, (-1, -1), "int", False),
    (F16, 40, 20, True, (12, -1), "restart", True),  # a head dim padded to 64, half 20
    (BF16, 32, 8, False, (5, 9), "int", False),  # partial rotary: dims 16..31 pass through
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,d,half,causal,window,offsets,deterministic", CASES)
def test_fused_rotary_vs_reference(poisoned, dtype, d, half, causal, window, offsets,
                                   deterministic):
    torch.manual_seed(0)
    cu, q, k, v = _packed(LENGTHS, 2, d, dtype)
    dout = torch.randn(q.shape, dtype=dtype, device=q.device)
    cos, sin = _tables(max(LENGTHS) + int(cu[-1]), half, dtype)
    offsets = _offsets(offsets, cu)
    scale = 1.0 / math.sqrt(d)
    got = _fused(q, k, v, dout, cu, max(LENGTHS), cos, sin, offsets, causal, window, 0.0, scale,
                 deterministic)
    _check(got, q, k, v, dout, cos, sin, _positions(cu, offsets), cu, causal, window, 0.0,
           scale)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,window", [(F16, (-1, -1)), (BF16, (5, 9))])
def test_fused_rotary_with_dropout(poisoned, monkeypatch, dtype, window):
    """The kernel's keep-mask (recovered with v = identity rows: dropout does not depend on q and
    k), then forward and gradients against the reference given that mask."""
    from tests.test_triton_attention_varlen import recover_keep
    lengths, h, d, p, seed = (20, 0, 1, 48), 2, 64, 0.25, 2 ** 40 + 7
    dropped, probs = recover_keep(lengths, lengths, h, d, False, p, seed)
    keep = [(x != 0) | (pr == 0) for x, pr in zip(dropped, probs)]  # P = 0: the bit is moot
    monkeypatch.setattr(ops, "_draw_seed", lambda dropout_p: torch.tensor([seed]))
    torch.manual_seed(3)
    cu, q, k, v = _packed(lengths, h, d, dtype)
    dout = torch.randn(q.shape, dtype=dtype, device=q.device)
    cos, sin = _tables(int(cu[-1]), 32, dtype)  # row t at position t
    got = _fused(q, k, v, dout, cu, max(lengths), cos, sin, cu[:-1], False, window, p, 0.125,
                 True)
    _check(got, q, k, v, dout, cos, sin, _positions(cu, cu[:-1]), cu, False, window, p, 0.125,
           keep)


@pytest.mark.interpreter
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "public-ops"])
def test_modernbert_layers_turn_q_k_in_the_kernel(monkeypatch, lean):
    """On the Triton backend fastbert's ModernBERT (packed) launches apply_rotary only for its
    global layer: the local layer's attention_varlen gets the tables (varlen.rotary_pays_in_kernel);
    its output is the unfused path's (fp32)."""
    import fastbert.triton as triton_backend
    from fastbert import hf_lean_modernbert
    from fastbert.model import BertConfig, BertModel
    previous = fastbert.get_backend()
    fastbert.set_backend("triton")
    try:
        torch.manual_seed(0)
        model = BertModel(BertConfig(
            model_type="modernbert", vocab_size=100, pad_token_id=0, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, extra=dict(local_attention=4,
                                                   global_attn_every_n_layers=2))).eval()
        if not lean:
            monkeypatch.setattr(hf_lean_modernbert, "prenorm_plan", lambda *args: None)
        ids = torch.randint(4, 100, (2, 9))
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        turned, rotate = [], triton_backend.apply_rotary
        monkeypatch.setattr(triton_backend, "apply_rotary",
                            lambda *args: turned.append(1) or rotate(*args))
        with torch.no_grad():
            fused = model(ids, attention_mask=mask).last_hidden_state
            assert len(turned) == 1  # layer 0, the global one: q and k in one call
            turned.clear()
            # the layers' choice turned off: apply_rotary, then attention
            monkeypatch.setattr(varlen, "rotary_in_kernel", lambda *args, **kw: False)
            monkeypatch.setattr(hf_lean_modernbert, "_fused_rotary", lambda *args: None)
            unfused = model(ids, attention_mask=mask).last_hidden_state
        assert len(turned) == 2  # the unfused path turned every layer's q and k
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    finally:
        fastbert.set_backend(previous)


# --------------------------------------------------------------------------------------------
# default tier: the torch backend's composition, and the argument checks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offsets", ["restart", "int", "per-sequence"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (3, -1)), (False, (4, 4))])
def test_torch_backend_composes_apply_rotary_and_attention(offsets, causal, window):
    """Forward and every gradient bitwise those of apply_rotary (packed, the same offsets), then
    attention_varlen."""
    torch.manual_seed(1)
    lengths = [7, 0, 1, 19, 12]
    cu, q, k, v = _packed(lengths, 2, 16, F32, "cpu")
    cos, sin = _tables(40, 8, F32, "cpu")
    offsets = _offsets(offsets, cu)
    dout = torch.randn(q.shape)
    got = _fused(q, k, v, dout, cu, 19, cos, sin, offsets, causal, window, 0.0, 0.25, False,
                 backend="torch")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    qr, kr = (fastbert.apply_rotary(t, cos, sin, cu_seqlens=cu, max_seqlen=19,
                                    seqlen_offsets=offsets) for t in (q, k))
    out = fastbert.attention_varlen(qr, kr, v, cu, cu, 19, 19, causal=causal, window_size=window,
                                    softmax_scale=0.25, backend="torch")
    out.backward(dout)
    for a, b in zip(got, (out.detach(), q.grad, k.grad, v.grad)):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], fastbert.attention_varlen(
        q.detach(), k.detach(), v.detach(), cu, cu, 19, 19, causal=causal, window_size=window,
        softmax_scale=0.25, backend="torch"))  # the tables do turn q and k


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_torch_backend_turns_q_k_in_its_banded_copy(monkeypatch, dtype, mode):
    """Without autograd a banded layer on the torch backend writes q and k turned into its block
    layout (no apply_rotary pass; its scratch buffers reused across calls): the output is
    bitwise apply_rotary then attention_varlen, and an earlier call's output stays as it was.
    (ATen's banded path: fastbert's CPU kernel, which reads q and k in place, is off.)"""
    from fastbert import cpu, cpu_attention
    monkeypatch.setattr(cpu_attention, "_enabled", False)
    from fastbert.torch_backend import TorchBackend
    monkeypatch.setattr(cpu, "WORKSPACE_MIN_ELEMENTS", 0)  # the reuse, at test sizes
    passes = []
    monkeypatch.setattr(TorchBackend, "apply_rotary", lambda *args: passes.append(1) or
                        reference.rotary_forward(*args[:5], conjugate=args[5]))
    torch.manual_seed(2)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    cases, outs = [], []
    for lengths in ([70, 1, 33], [70, 1, 33], [5, 90]):  # a repeat, then another band
        cu, q, k, v = _packed(lengths, 2, 16, dtype, "cpu")
        cos, sin = _tables(256, 8, dtype, "cpu")
        cases.append((lengths, cu, q, k, v, cos, sin))
        with context():
            outs.append(fastbert.attention_varlen(
                q, k, v, cu, cu, max(lengths), max(lengths), window_size=(6, 6),
                softmax_scale=0.25, rotary=(cos, sin), rotary_seqlen_offsets=cu[:-1],
                backend="torch"))
    assert passes == []
    monkeypatch.undo()
    monkeypatch.setattr(cpu_attention, "_enabled", False)
    for got, (lengths, cu, q, k, v, cos, sin) in zip(outs, cases):
        qr, kr = (fastbert.apply_rotary(t, cos, sin, cu_seqlens=cu, max_seqlen=max(lengths),
                                        seqlen_offsets=cu[:-1], backend="torch") for t in (q, k))
        want = fastbert.attention_varlen(qr, kr, v, cu, cu, max(lengths), max(lengths),
                                         window_size=(6, 6), softmax_scale=0.25, backend="torch")
        assert torch.equal(got, want.detach())


def _bad_calls(q, k, v, cu, cos, sin):
    """(what, rotary, rotary_seqlen_offsets, error type, words the message holds)."""
    meta = torch.empty(cos.shape, device="meta")
    return [
        ("a single table", cos, 0, TypeError, ["'rotary'", "(cos, sin)", "Tensor"]),
        ("three tables", (cos, sin, cos), 0, TypeError, ["'rotary'", "of 3"]),
        ("integer cos", (cos.long(), sin), 0, TypeError, ["'rotary[0] (cos)'", "torch.int64"]),
        ("3-D sin", (cos, sin[None]), 0, ValueError, ["'rotary[1] (sin)'", "(S_ro, R / 2)",
                                                       "(1, 40, 8)"]),
        ("sin unlike cos", (cos, sin[:, :4]), 0, ValueError, ["'rotary[1] (sin)'", "(40, 4)"]),
        ("R > head dim", (torch.ones(40, 9), torch.ones(40, 9)), 0, ValueError,
         ["'rotary[0] (cos)'", "head dim 16", "(40, 9)"]),
        ("cos on another device", (meta, sin), 0, ValueError,
         ["'rotary[0] (cos)'", "on cpu like 'q'", "meta"]),
        ("too few positions", (cos[:18], sin[:18]), 0, ValueError,
         ["'rotary'", "at least 19 positions", "got 18"]),
        ("offsets past the tables", (cos, sin), 30, ValueError,
         ["'rotary'", "at least 49", "got 40"]),
        ("negative offset", (cos, sin), -1, ValueError, ["'rotary_seqlen_offsets'", "-1"]),
        ("float offsets", (cos, sin), torch.zeros(5), ValueError,
         ["'rotary_seqlen_offsets'", "torch.float32", "(5,)"]),
        ("offsets of another batch", (cos, sin), torch.zeros(3, dtype=torch.int64), ValueError,
         ["'rotary_seqlen_offsets'", "(5,)", "(3,)"]),
        ("cos needing grad", (cos.clone().requires_grad_(), sin), 0, ValueError,
         ["'rotary[0] (cos)'", "requires grad"]),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_rotary_arguments_are_refused_before_any_kernel(monkeypatch, case):
    def no_kernel(*args, **kw):
        raise AssertionError("a kernel ran")
    monkeypatch.setattr(varlen._TorchVarlen, "attention_varlen_forward", no_kernel)
    monkeypatch.setattr(ops._backend_module("torch"), "apply_rotary", no_kernel)
    cu, q, k, v = _packed([7, 0, 1, 19, 12], 2, 16, F32, "cpu")
    cos, sin = _tables(40, 8, F32, "cpu")
    calls = _bad_calls(q, k, v, cu, cos, sin)
    assert len(calls) == 13
    what, tables, offsets, error, words = calls[case]
    with pytest.raises(error) as raised:
        fastbert.attention_varlen(q, k, v, cu, cu, 19, 19, rotary=tables,
                                  rotary_seqlen_offsets=offsets, backend="torch")
    message = str(raised.value)
    assert message.startswith("fastbert.attention_varlen: argument "), what
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"


# --------------------------------------------------------------------------------------------
# compile tier: ModernBERT's ROTARY_HALF forward, spill-free
# --------------------------------------------------------------------------------------------

@pytest.mark.compile
def test_rotary_forward_is_spill_free_at_modernbert_shapes():
    from tests import test_resources as resources
    rows = {row: variant for row, (variant, models) in resources.collect("attention").items()
            if "rotary" in row.what}
    assert len(rows) == 8  # global and local layers x sm_80, sm_90 x fp16, bf16
    usage = resources.usage_of(list(rows.values()))
    bad = {f"sm_{row.capability} {row.dtype} {row.what}": resources._problems(usage[variant])
           for row, variant in rows.items() if resources._problems(usage[variant])}
    assert not bad, bad


# --------------------------------------------------------------------------------------------
# gpu tier
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,window", [(BF16, (-1, -1)), (F16, (64, 64))])
def test_gpu_fused_rotary_at_modernbert_base_sizes(dtype, window):
    torch.manual_seed(0)
    lengths = [512, 77, 1, 300, 511, 128]
    cu, q, k, v = _packed(lengths, 12, 64, dtype)
    dout = torch.randn(q.shape, dtype=dtype, device=q.device)
    cos, sin = _tables(int(cu[-1]), 32, dtype)
    got = _fused(q, k, v, dout, cu, max(lengths), cos, sin, cu[:-1], False, window, 0.0, 0.125,
                 False)
    _check(got, q, k, v, dout, cos, sin, _positions(cu, cu[:-1]), cu, False, window, 0.0, 0.125)


@pytest.mark.gpu
def test_gpu_cuda_backend_composes_apply_rotary_and_attention():
    """No fused kernel there: rotary= is apply_rotary, then attention, bitwise."""
    if ops._backend_module("cuda") is None:
        pytest.skip("the CUDA extension is not built here")
    torch.manual_seed(0)
    lengths = [200, 1, 77]
    cu, q, k, v = _packed(lengths, 4, 64, BF16)
    dout = torch.randn(q.shape, dtype=BF16, device=q.device)
    cos, sin = _tables(300, 32, BF16)
    got = _fused(q, k, v, dout, cu, 200, cos, sin, 0, False, (16, 16), 0.0, 0.125, True,
                 backend="cuda")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    qr, kr = (fastbert.apply_rotary(t, cos, sin, cu_seqlens=cu, max_seqlen=200, backend="cuda")
              for t in (q, k))
    out = fastbert.attention_varlen(qr, kr, v, cu, cu, 200, 200, window_size=(16, 16),
                                    softmax_scale=0.125, deterministic=True, backend="cuda")
    out.backward(dout)
    for a, b in zip(got, (out.detach(), q.grad, k.grad, v.grad)):
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("window", [(-1, -1), (4, 4)])
def test_rope_fusion_benchmark_compares_the_same_work(window):
    """benchmarks/rope_fusion times its two variants as equals: they compute the same attention
    (Triton kernels, fresh packed input)."""
    from benchmarks import rope_fusion
    qkv, cu, cos, sin = rope_fusion.make_inputs(24, "cpu", torch.float32, heads=2, head_dim=16,
                                                sequences=3)
    calls = rope_fusion.variants(qkv, cu, cos, sin, 24, window)
    with torch.no_grad():
        torch.testing.assert_close(calls["fused"](), calls["unfused"](), rtol=1e-5, atol=1e-5)
