"""fastbert.cpu_train: oneDNN GEMMs for CPU training against the fp64 reference (forward and every
gradient, by the tolerance rule), when the route is (not) taken, its fallbacks, and the models
that take it (a patched transformers BERT and ModernBERT, whose training steps match unpatched)."""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import cpu, cpu_train
from tests.helpers import assert_close_by_rule

pytestmark = pytest.mark.skipif(cpu_train.reason() is not None,
                                reason=f"no oneDNN training route here: {cpu_train.reason()}")


@pytest.fixture(autouse=True)
def fresh_state():
    cpu_train._state.clear()
    yield
    cpu_train._state.clear()


@pytest.fixture
def onednn_calls(monkeypatch):
    """Shapes of every oneDNN GEMM the route runs: (a rows, b rows) of a @ b.T."""
    calls = []
    gemm = cpu_train._gemm_nt
    assert cpu_train.reason() is None  # probed before counting

    def counting(a, b, bias=None):
        calls.append((a.shape[0], b.shape[0]))
        return gemm(a, b, bias)
    monkeypatch.setattr(cpu_train, "_gemm_nt", counting)
    return calls


def _leaves(shape_x, k, n, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * k ** -0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(*shape_x, n, generator=g, dtype=torch.float64)
    return x, w, b, dy


def _grads(fn, x, w, b, dy, dtype):
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves, *([None] if b is None else []))
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape_x", [(300,), (3, 100)], ids=["2d", "3d"])
def test_matches_fp64_reference_by_rule(onednn_calls, bias, shape_x):
    x, w, b, dy = _leaves(shape_x, 64, 96, bias, seed=len(shape_x) + bias)
    ours = _grads(cpu_train.linear_nd, x, w, b, dy, torch.float32)
    plain = _grads(F.linear, x, w, b, dy, torch.float32)
    exact = _grads(F.linear, x, w, b, dy, torch.float64)
    for name, o, p, e in zip(("out", "dx", "dweight", "dbias"), ours, plain, exact):
        assert_close_by_rule(o, p, e, f"{name} {shape_x}")
    assert sorted(onednn_calls) == sorted([(300, 96), (300, 64), (96, 64)])  # y, dx, dweight


def test_small_rows_and_other_inputs_stay_on_f_linear(onednn_calls):
    w = torch.randn(96, 64, requires_grad=True)
    for x in (torch.randn(cpu_train.MIN_ROWS - 1, 64),  # too few rows to pay
              torch.randn(64, 400).t(),  # not contiguous
              torch.randn(300, 64, dtype=torch.float64)):  # not fp32
        assert not cpu_train.should_use(x, w.to(x.dtype))
        cpu_train.linear_nd(x, w.to(x.dtype)).sum().backward()
    with torch.no_grad():  # nothing to record: fastbert.cpu's inference route is the one
        assert not cpu_train.should_use(torch.randn(300, 64), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_train.should_use(torch.randn(300, 64), w)
    cpu.set_enabled(False)
    try:
        assert not cpu_train.should_use(torch.randn(300, 64), w)
    finally:
        cpu.set_enabled(True)
    assert onednn_calls == []


def test_expanded_gradient_and_frozen_weight(onednn_calls):
    """y.sum().backward() hands an expanded (stride 0) gradient; a frozen weight gets none."""
    x = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(48, 32)
    cpu_train.linear_nd(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(300, 32), rtol=1e-5, atol=1e-5)
    assert sorted(onednn_calls) == [(300, 32), (300, 48)]  # dx and y: no dweight


def test_forward_mode_ad_stays_on_f_linear():
    """_Linear has no jvp: under a dual level the route is closed, tangents as F.linear's."""
    import torch.autograd.forward_ad as fwad
    x, tangent = torch.randn(300, 32), torch.randn(300, 32)
    w = torch.randn(48, 32, requires_grad=True)
    with fwad.dual_level():
        out = cpu_train.linear_nd(fwad.make_dual(x, tangent), w)
        torch.testing.assert_close(fwad.unpack_dual(out).tangent, F.linear(tangent, w))


def test_double_backward_takes_differentiable_formulas():
    """create_graph=True: the gradients are themselves differentiable, as F.linear's."""
    x0 = torch.randn(300, 16, dtype=torch.float64)
    w0 = torch.randn(24, 16, dtype=torch.float64)
    results = []
    for fn in (cpu_train.linear_nd, F.linear):
        x, w = x0.float().requires_grad_(), w0.float().requires_grad_()
        dx, = torch.autograd.grad(fn(x, w).pow(2).sum(), x, create_graph=True)
        dw, = torch.autograd.grad(dx.pow(2).sum(), w)
        results.append(dw)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_dweight_over_many_rows_keeps_the_rule(onednn_calls):
    """dweight sums over the rows: at one BERT-base B8 S512 step's size (4,096 x 768 x 768) one
    oneDNN GEMM rounded 3x worse than MKL; the row blocks must stay within the rule."""
    x, w, b, dy = _leaves((4096,), 768, 768, True, seed=11)
    ours = _grads(cpu_train.linear_nd, x, w, b, dy, torch.float32)
    plain = _grads(F.linear, x, w, b, dy, torch.float32)
    exact = _grads(F.linear, x, w, b, dy, torch.float64)
    for name, o, p, e in zip(("out", "dx", "dweight", "dbias"), ours, plain, exact):
        assert_close_by_rule(o, p, e, f"{name} 4096 rows")
    assert sorted(onednn_calls) == [(768, 768), (4096, 768), (4096, 768)]  # dweight's first block
    # (the later blocks add onto it through the binary op), dx, y


def test_saves_only_what_backward_reads():
    """As F.linear: with a frozen weight, x is not kept (an in-place write to it after the
    forward is allowed); with an input that needs no gradient, the weight is not kept."""
    def frozen_weight(fn):
        w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
        x = torch.randn(300, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
        h = x * 1.0
        y = fn(h, w)
        h.mul_(2.0)  # allowed: dx needs only the weight
        y.sum().backward()
        return x.grad

    def input_without_grad(fn):
        w = torch.randn(48, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
        v = w * 1.0
        y = fn(torch.randn(300, 32, generator=torch.Generator().manual_seed(4)), v)
        v.mul_(2.0)  # allowed: dweight needs only x
        y.sum().backward()
        return w.grad
    for case in (frozen_weight, input_without_grad):
        torch.testing.assert_close(case(cpu_train.linear_nd), case(F.linear), rtol=1e-5,
                                   atol=1e-4)


def test_run_time_failures_fall_back(monkeypatch):
    """A oneDNN call failing after the probe passed: the forward and the backward finish on
    F.linear's formulas and the route stays closed."""
    assert cpu_train.reason() is None

    def broken(*args, **kw):
        raise RuntimeError("no primitive for this shape")
    x, w = torch.randn(300, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    monkeypatch.setattr(cpu_train, "_gemm_nt", broken)
    y = cpu_train.linear(x, w, None)  # forward fails
    torch.testing.assert_close(y, F.linear(x, w))
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(300, 32), rtol=1e-5, atol=1e-5)
    assert "no primitive" in cpu_train.reason()
    monkeypatch.undo()
    cpu_train._state.clear()
    y = cpu_train.linear(x, w, None)
    monkeypatch.setattr(cpu_train, "_gemm_nt", broken)
    y.sum().backward()  # backward fails
    torch.testing.assert_close(w.grad, 2 * x.sum(0).expand(48, 32), rtol=1e-4, atol=1e-4)
    assert "no primitive" in cpu_train.reason()


def test_switches_and_modes_close_the_route(onednn_calls):
    """torch.backends.mkldnn switched off, a dispatch mode (FlopCounterMode counts aten's GEMMs)
    and the first call under another default dtype or device do not mislead the route."""
    from torch.utils.flop_counter import FlopCounterMode
    x, w = torch.randn(300, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cpu_train.should_use(x, w)
        assert "switched off" in cpu_train.describe() or "F.linear" in cpu_train.describe()
    with FlopCounterMode(display=False) as counter:
        cpu_train.linear_nd(x, w).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 300 * 32 * 48
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert cpu_train.reason() is None  # the probe builds fp32 CPU tensors whatever the default
    finally:
        torch.set_default_dtype(previous)
    assert onednn_calls == []
    assert cpu_train.should_use(x, w)


def test_edge_shapes_behave_as_f_linear():
    w = torch.randn(48, 0, requires_grad=True)
    x = torch.randn(300, 0, requires_grad=True)
    torch.testing.assert_close(cpu_train.linear_nd(x, w), F.linear(x, w))
    # no output features: oneDNN builds no primitive for it; F.linear trains it
    w = torch.randn(0, 32, requires_grad=True)
    x = torch.randn(300, 32, requires_grad=True)
    cpu_train.linear_nd(x, w).sum().backward()
    assert torch.equal(x.grad, torch.zeros(300, 32)) and cpu_train.reason() is None
    with pytest.raises(RuntimeError):
        cpu_train.linear_nd(torch.tensor(1.0, requires_grad=True), torch.randn(48, 32))


def test_a_failing_op_falls_back_for_good(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no primitive for this shape")
    monkeypatch.setattr(cpu_train, "_gemm_nt", broken)
    x, w = torch.randn(300, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
    y = cpu_train.linear_nd(x, w)
    torch.testing.assert_close(y, F.linear(x, w))
    assert "no primitive" in cpu_train.reason()
    assert not cpu_train.should_use(x, w)


@pytest.mark.parametrize("op", ["linear_bias_gelu", "linear_geglu"])
def test_fused_ops_take_the_route_in_training(onednn_calls, op):
    """The torch backend's fused FFN ops run their forward GEMM and both backward GEMMs on the
    route from MIN_ROWS rows, matching the fp64 reference by rule."""
    n = 96 if op == "linear_bias_gelu" else 2 * 48
    x, w, b, _ = _leaves((300,), 64, n, True, seed=5)
    dy = torch.randn(300, n if op == "linear_bias_gelu" else n // 2, dtype=torch.float64)

    def run(dtype, fused):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        if fused:
            y = getattr(fastbert, op)(*leaves, backend="torch")
        elif op == "linear_bias_gelu":
            y = F.gelu(F.linear(*leaves))
        else:
            act, gate = F.linear(*leaves).chunk(2, dim=-1)
            y = F.gelu(act) * gate
        y.backward(dy.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]
    ours, plain, exact = run(torch.float32, True), run(torch.float32, False), \
        run(torch.float64, False)
    for name, o, p, e in zip(("out", "dx", "dweight", "dbias"), ours, plain, exact):
        assert_close_by_rule(o, p, e, f"{op} {name}")
    assert sorted(onednn_calls) == sorted([(300, n), (300, 64), (n, 64)])


def _step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (out * mask[..., None]).pow(2).sum().backward()  # real tokens only (padding is zeros here)
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_patched_training_step_on_the_route_matches_transformers(onednn_calls, family):
    """A training step of 2 x 200 tokens (past MIN_ROWS) through patch_hf takes the route and
    matches the unpatched model in fp64 (output on real tokens and every parameter's gradient)
    by the rule, with the unpatched fp32 model as the plain reference."""
    transformers = pytest.importorskip("transformers")
    if family == "bert":
        config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         attn_implementation="sdpa")
        make = transformers.BertModel
    else:
        config = transformers.ModernBertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, local_attention=16, global_attn_every_n_layers=2,
            pad_token_id=0, max_position_embeddings=256, attention_dropout=0.0, mlp_dropout=0.0,
            embedding_dropout=0.0, attn_implementation="sdpa")
        make = transformers.ModernBertModel
    torch.manual_seed(0)
    base = make(config)
    ids = torch.randint(1, 99, (2, 200))
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, 170:] = 0
    reference64 = make(config)
    reference64.load_state_dict(base.state_dict())
    plain = make(config)
    plain.load_state_dict(base.state_dict())
    patched = make(config)
    patched.load_state_dict(base.state_dict())
    fastbert.patch_hf(patched)
    for m in (reference64, plain, patched):
        m.train()
    exact_out, exact_grads = _step(reference64.double(), ids, mask)
    plain_out, plain_grads = _step(plain, ids, mask)
    ours_out, ours_grads = _step(patched, ids, mask)
    real = mask.bool()
    assert_close_by_rule(ours_out[real], plain_out[real], exact_out[real], f"{family} output")
    assert set(ours_grads) == set(exact_grads)
    for name, g in ours_grads.items():
        assert_close_by_rule(g, plain_grads[name], exact_grads[name], f"{family} d{name}")
    assert any(rows >= cpu_train.MIN_ROWS for rows, _ in onednn_calls), "the route was not taken"
