"""fastbert.cpu: oneDNN inference GEMMs against the fp64 reference, the prepacked-weight cache, the
public fallback, and when the path is (not) taken."""
import gc
import types
import weakref

import pytest
import torch
import torch.nn.functional as F

from fastbert import cpu
from tests.helpers import assert_close_by_rule


@pytest.fixture(autouse=True)
def fresh_state():
    """Every test starts with the module's defaults, no probe results and an empty cache."""
    saved = (cpu._enabled, cpu._bf16, cpu.GELU_POST_OP, cpu.RESIDUAL_POST_OP, cpu.PREPACK_FP32)
    cpu._op_state.clear()
    cpu.clear_cache()
    yield
    (cpu._enabled, cpu._bf16, cpu.GELU_POST_OP, cpu.RESIDUAL_POST_OP, cpu.PREPACK_FP32) = saved
    cpu._op_state.clear()
    cpu.clear_cache()
    cpu._missing_ops.cache_clear()


def _inputs(rows, k, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * k ** -0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)
    r = torch.randn(rows, n, generator=g, dtype=torch.float64)
    return x.to(dtype), torch.nn.Parameter(w.to(dtype)), b.to(dtype), r.to(dtype)


def _exact(x, w, b, epilogue, r=None):
    y = F.linear(x.double(), w.double(), b.double())
    if epilogue == "add":
        return y + r.double()
    if epilogue in ("none", "tanh"):
        return F.gelu(y, approximate=epilogue)
    return y


def _plain(x, w, b, epilogue, r=None):
    y = F.linear(x, w, b)
    if epilogue == "add":
        return y + r
    if epilogue in ("none", "tanh"):
        return F.gelu(y, approximate=epilogue)
    return y


def _ours(x, w, b, epilogue, r=None):
    if epilogue == "add":
        return cpu.linear_add(x, w, b, r)
    if epilogue in ("none", "tanh"):
        return cpu.linear_gelu(x, w, b, approximate=epilogue)
    return cpu.linear(x, w, b)


def _onednn_calls(monkeypatch):
    """Count calls that reach the private oneDNN op."""
    calls = []
    real = cpu._onednn

    def spy(*args):
        calls.append(args[3])
        return real(*args)
    monkeypatch.setattr(cpu, "_onednn", spy)
    return calls


# --------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epilogue", ["linear", "none", "tanh", "add"])
@pytest.mark.parametrize("rows,k,n", [(1, 64, 48), (37, 96, 200), (300, 256, 1024), (130, 1024, 256)])
@pytest.mark.parametrize("post_op", [True, False])
@pytest.mark.parametrize("prepack", [True, False])
def test_matches_fp64_reference_by_rule(epilogue, rows, k, n, post_op, prepack, monkeypatch):
    """Every variant (epilogue as a oneDNN post-op or after the GEMM, weight prepacked or plain)."""
    cpu.GELU_POST_OP = cpu.RESIDUAL_POST_OP = post_op
    cpu.PREPACK_FP32 = prepack
    calls = _onednn_calls(monkeypatch)
    x, w, b, r = _inputs(rows, k, n, seed=rows + k + n)
    with torch.no_grad():
        assert cpu.should_use(x, w, b)
        out = _ours(x, w, b, epilogue, r)
        plain = _plain(x, w, b, epilogue, r)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert_close_by_rule(out, plain, _exact(x, w, b, epilogue, r), f"{epilogue} {rows}x{k}->{n}")
    assert calls, "the oneDNN op was not used"
    expected = "none" if epilogue == "linear" or not post_op else \
        ("add" if epilogue == "add" else "gelu")
    assert calls[-1] == expected
    assert cpu.cache_size() == (1 if prepack else 0)


def test_packed_weight_serves_other_row_counts():
    """A weight packed for one row count (the first call's) serves every later one."""
    cpu.PREPACK_FP32 = True
    x, w, b, _ = _inputs(512, 128, 384, seed=3)
    with torch.no_grad():
        cpu.linear_gelu(x, w, b)
        assert cpu.cache_size() == 1
        for rows in (1, 7, 200, 777):
            xr = torch.randn(rows, 128, dtype=torch.float64).float()
            out = cpu.linear_gelu(xr, w, b)
            assert_close_by_rule(out, F.gelu(F.linear(xr, w, b)), _exact(xr, w, b, "none"),
                                 f"rows {rows}")
    assert cpu.cache_size() == 1


@pytest.mark.parametrize("prepack", [True, False])
def test_lean_routes_follow_prepack(monkeypatch, prepack):
    """inference_routes (the lean paths' per-forward choice) on fp32: plain weights by default
    (nothing cached), the prepacked route with PREPACK_FP32 = True (one cached copy, made by the
    route itself); both match the reference, with and without bias, GELU included."""
    monkeypatch.setattr(cpu, "PREPACK_FP32", prepack)
    x, w, b, _ = _inputs(37, 64, 96, seed=8)
    linear, linear_gelu = cpu.inference_routes(torch.float32)
    assert linear is cpu._fp32_linear  # the lean paths' fast route, packing per PREPACK_FP32
    with torch.no_grad():
        out = linear(x, w, b)
        assert cpu.cache_size() == (1 if prepack else 0)
        assert_close_by_rule(out, F.linear(x, w, b), _exact(x, w, b, "linear"), "linear")
        gelu = linear_gelu(x, w, None, "none")
        assert_close_by_rule(gelu, F.gelu(F.linear(x, w)),
                             F.gelu(F.linear(x.double(), w.double())), "gelu, no bias")
    assert cpu.cache_size() == (1 if prepack else 0)


def test_prepack_leaves_inference_tensor_weights_plain():
    """A weight made under inference_mode has no version counter: packing it would be redone on
    every call, so both routes take it as it is."""
    cpu.PREPACK_FP32 = True
    with torch.inference_mode():
        w, x = torch.randn(48, 64), torch.randn(9, 64)
        linear, _ = cpu.inference_routes(torch.float32)
        outs = (linear(x, w, None), cpu.linear(x, w))
    for out in outs:
        torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert cpu.cache_size() == 0


def test_packed_route_falls_back_after_a_failure(monkeypatch):
    """The lean paths' prepacked route, like _run: a failing oneDNN call is remembered and the
    public F.linear serves this call and the next ones."""
    monkeypatch.setattr(cpu, "PREPACK_FP32", True)
    x, w, b, _ = _inputs(20, 64, 48, seed=10)
    linear, _ = cpu.inference_routes(torch.float32)
    assert linear is cpu._fp32_linear

    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN here")
    monkeypatch.setattr(cpu, "packed_weight", broken)
    with torch.no_grad():
        out = linear(x, w, b)
    assert_close_by_rule(out, F.linear(x, w, b), _exact(x, w, b, "linear"), "fallback")
    assert cpu._variant_reason("none", "", torch.float32) is not None
    assert cpu.inference_routes(torch.float32)[0] is cpu.linear


def test_no_bias_and_empty_rows():
    x, w, _, _ = _inputs(33, 64, 80, seed=4)
    with torch.no_grad():
        out = cpu.linear(x, w, None)
        assert_close_by_rule(out, F.linear(x, w), F.linear(x.double(), w.double()), "no bias")
        empty = cpu.linear_gelu(torch.empty(0, 64), w, None)
    assert empty.shape == (0, 80) and empty.dtype == torch.float32


def test_noncontiguous_input():
    x, w, b, _ = _inputs(64, 96, 48, seed=5)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    with torch.no_grad():
        out = cpu.linear(xt, w, b)
    assert_close_by_rule(out, F.linear(x, w, b), _exact(x, w, b, "linear"), "column-major x")


# --------------------------------------------------------------------------------------------
# the prepacked-weight cache
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prepack", [True, False])
def test_cache_follows_in_place_weight_changes(prepack):
    cpu.PREPACK_FP32 = prepack
    x, w, b, _ = _inputs(16, 64, 32, seed=6)
    with torch.no_grad():
        first = cpu.linear(x, w, b)
        w.mul_(-2.0)  # in place, as an optimizer step or load_state_dict's copy_ would
        second = cpu.linear(x, w, b)
        torch.testing.assert_close(second, -2.0 * (first - b) + b, rtol=1e-5, atol=1e-5)
        w.copy_(torch.randn_like(w))
        third = cpu.linear(x, w, b)
        assert_close_by_rule(third, F.linear(x, w, b), _exact(x, w, b, "linear"), "after copy_")
    assert cpu.cache_size() == (1 if prepack else 0)


def test_cache_follows_fused_optimizer_steps_and_clear_cache():
    """A fused optimizer (AdamW(fused=True), the Trainer's default) writes parameters without
    bumping their version counters: every torch.optim step invalidates the packed copies. A
    write through .data reaches no signal: clear_cache() is the documented remedy."""
    cpu.PREPACK_FP32 = True
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(10, 64)
    optimizer = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        cpu.linear(x, lin.weight, lin.bias)
    version = lin.weight._version
    lin(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        out = cpu.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.data.mul_(2.0)
        cpu.clear_cache()
        out = cpu.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    if lin.weight._version != version:
        pytest.skip("this torch's fused AdamW bumps version counters: the step hook is moot")


def test_cache_follows_replaced_weight_and_frees_it():
    cpu.PREPACK_FP32 = True
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(10, 64)
    with torch.no_grad():
        cpu.linear(x, lin.weight, lin.bias)
        assert cpu.cache_size() == 1
        lin.weight = torch.nn.Parameter(torch.randn(48, 64))  # a new Parameter object
        out = cpu.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.randn(48, 64)  # same Parameter, new storage
        out = cpu.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    gc.collect()
    assert cpu.cache_size() == 1, "the replaced Parameter's packed copy was not dropped"
    del lin
    gc.collect()
    assert cpu.cache_size() == 0, "the cache keeps a freed model's weights alive"


def test_cache_keeps_every_live_weight_and_drops_freed_ones():
    """More weights than any fixed bound would hold (the old LRU of 256 repacked every call on a
    model with more): each is packed once and served from the cache after; a freed weight's copy
    goes with it, and the callback of a freed weight never drops the copy of a later weight that
    reuses its id."""
    cpu.PREPACK_FP32 = True
    weights = [torch.randn(8, 16) for _ in range(300)]
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = [cpu.packed_weight(w, torch.float32, 4) for w in weights]
        again = [cpu.packed_weight(w, torch.float32, 4) for w in weights]
        assert all(a is b for a, b in zip(first, again)), "a live weight was repacked"
        for w in weights[:5]:
            torch.testing.assert_close(cpu.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert cpu.cache_size() == 300
    del first, again
    weights = weights[:10]
    gc.collect()
    assert cpu.cache_size() == 10
    old = torch.randn(8, 16)
    cpu.packed_weight(old, torch.float32, 4)
    key = (id(old), "packed", torch.float32)
    stale_ref = cpu._cache[key].ref
    new = torch.randn(8, 16)
    # a later weight under the same id (as CPython reuses them): its copy replaces the old one
    cpu._cache[key] = cpu._Packed(weakref.ref(new), None, None)
    cpu._drop(key, stale_ref)  # the freed weight's callback, arriving late
    assert key in cpu._cache, "a freed weight's callback dropped another weight's copy"
    cpu._drop(key, cpu._cache[key].ref)
    assert key not in cpu._cache


def test_inference_tensor_weight_is_not_cached():
    """Inference tensors have no version counter, so in-place writes could not be seen."""
    cpu.PREPACK_FP32 = True
    with torch.inference_mode():
        w = torch.randn(24, 32)
        x = torch.randn(5, 32)
        first = cpu.linear(x, w)
        w.mul_(3.0)
        second = cpu.linear(x, w)
    assert cpu.cache_size() == 0
    torch.testing.assert_close(second, 3.0 * first, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# when the path is taken, and the public fallback
# --------------------------------------------------------------------------------------------

def test_not_used_under_grad():
    x, w, b, _ = _inputs(8, 16, 8)
    assert not cpu.should_use(x, w, b)  # grad mode on and the weight requires grad
    with torch.no_grad():
        assert cpu.should_use(x, w, b)
    with torch.inference_mode():
        assert cpu.should_use(x, w, b)
    frozen = w.detach()
    assert cpu.should_use(x, frozen, b)  # grad mode on, but nothing requires grad
    assert not cpu.should_use(x.clone().requires_grad_(), frozen, b)


def test_not_used_outside_its_inputs():
    x, w, b, _ = _inputs(8, 16, 8)
    with torch.no_grad():
        assert not cpu.should_use(x.double(), w.double(), b.double())
        assert not cpu.should_use(x.half(), w.half(), b.half())
        assert not cpu.should_use(x.reshape(2, 4, 16), w, b)
        assert not cpu.should_use(x.to("meta"), w.to("meta"), b.to("meta"))
        assert not cpu.should_use(x[:, :8], w, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu.should_use(x, w, b)
        cpu.set_enabled(False)
        assert not cpu.should_use(x, w, b)
        assert "switched off" in cpu.describe()
        cpu.set_enabled(True)
        assert cpu.should_use(x, w, b)


def test_fallback_when_private_ops_are_missing(monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # a torch without them
    cpu._missing_ops.cache_clear()
    x, w, b, r = _inputs(20, 32, 24, seed=8)
    with torch.no_grad():
        assert not cpu.should_use(x, w, b)
        for epilogue in ("linear", "none", "tanh", "add"):
            out = _ours(x, w, b, epilogue, r)
            assert_close_by_rule(out, _plain(x, w, b, epilogue, r), _exact(x, w, b, epilogue, r),
                                 f"fallback {epilogue}")
    assert "F.linear (MKL), because this torch" in cpu.describe()
    assert "_linear_pointwise" in cpu.describe()


def test_fallback_after_the_private_op_fails_once(monkeypatch):
    x, w, b, _ = _inputs(20, 32, 24, seed=9)
    with torch.no_grad():
        cpu.linear(x, w, b)  # probed and working

        def broken(*args):
            raise RuntimeError("oneDNN refused")
        monkeypatch.setattr(cpu, "_onednn", broken)
        out = cpu.linear(x, w, b)
        assert_close_by_rule(out, F.linear(x, w, b), _exact(x, w, b, "linear"), "after failure")
        monkeypatch.undo()
        calls = _onednn_calls(monkeypatch)
        cpu.linear(x, w, b)
    assert calls == [], "a variant that failed once was tried again"
    assert "failed at run time: RuntimeError: oneDNN refused" in cpu.describe()


def test_probe_rejects_a_wrong_private_op(monkeypatch):
    cpu.GELU_POST_OP = True
    real = cpu._onednn
    monkeypatch.setattr(cpu, "_onednn", lambda *a: real(*a) * 1.01)
    x, w, b, _ = _inputs(12, 40, 16, seed=10)
    with torch.no_grad():
        out = cpu.linear_gelu(x, w, b)
    assert_close_by_rule(out, F.gelu(F.linear(x, w, b)), _exact(x, w, b, "none"), "wrong op")
    for variant in ("gelu:none", "none:"):  # the post-op, then the plain GEMM it falls back to
        assert "disagrees with F.linear" in cpu._op_state[(variant, torch.float32)]


def test_bad_input_names_op_and_argument():
    x, w, b, r = _inputs(4, 8, 6)
    with pytest.raises(ValueError, match=r"fastbert.cpu.linear: x has 7 features but weight expects 8"):
        cpu.linear(torch.randn(4, 7), w, b)
    with pytest.raises(ValueError, match=r"fastbert.cpu.linear_gelu: argument 'bias' expected shape \(6,\)"):
        cpu.linear_gelu(x, w, torch.randn(5))
    with pytest.raises(ValueError, match=r"argument 'approximate' expected 'none' or 'tanh', got 'fast'"):
        cpu.linear_gelu(x, w, b, approximate="fast")
    with pytest.raises(ValueError, match=r"fastbert.cpu.linear_add: argument 'residual' expected shape \(4, 6\)"):
        cpu.linear_add(x, w, b, r.t())
    with pytest.raises(TypeError, match=r"fastbert.cpu.linear_add: argument 'residual' expected a Tensor"):
        cpu.linear_add(x, w, b, 1.0)
    with pytest.raises(TypeError, match=r"argument 'enabled' expected a bool"):
        cpu.set_enabled("yes")


# --------------------------------------------------------------------------------------------
# bf16 mode
# --------------------------------------------------------------------------------------------

def test_bf16_mode_is_offered_only_with_native_bf16():
    ok, why = cpu.bf16_support()
    if ok:
        cpu.set_bf16(True)
        assert cpu.bf16_enabled() and "bf16 mode on" in cpu.describe()
    else:
        with pytest.raises(RuntimeError, match="bf16 inference mode is not offered here"):
            cpu.set_bf16(True)
        assert not cpu.bf16_enabled() and why in cpu.describe()


@pytest.mark.parametrize("epilogue", ["linear", "none", "add"])
def test_bf16_mode_matches_bf16_gemm_by_rule(epilogue):
    """bf16 mode rounds x and W to bf16 once and accumulates in fp32: its error against fp64 is
    that of a bf16 GEMM (plain: F.linear on the rounded operands, epilogue in fp32)."""
    cpu.set_bf16(True, force=True)
    x, w, b, r = _inputs(96, 256, 384, seed=11)
    with torch.no_grad():
        assert cpu.should_use(x, w, b)
        out = _ours(x, w, b, epilogue, r)
        again = _ours(x, w, b, epilogue, r)  # the second call takes the cached bf16 weight
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        y = F.linear(xb, wb, bb).float()
        plain = {"linear": y, "none": F.gelu(y), "add": y + r}[epilogue].bfloat16()
    assert out.dtype == torch.float32
    # the bf16 result, before its fp32 epilogue is rounded, is compared in bf16
    assert_close_by_rule(out.bfloat16(), plain, _exact(x, w, b, epilogue, r), f"bf16 {epilogue}")
    assert torch.equal(out, again)
    assert cpu.cache_size() == 1  # the bf16 weight copy is kept, packed or plain
