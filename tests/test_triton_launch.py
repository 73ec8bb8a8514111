"""fastbert/triton/launch.py, pre-bound Triton launches (issue 22 part 2).

Default tier (CPU): the bucket key against Triton's own specialisation, caching, the direct
launch's arguments, the fallback and the kill switch, with a real JITFunction whose `run` (the
ordinary path) is stood in by a recorder. Interpreter tier: the ordinary launch is what runs.
GPU tier: every Triton launcher's outputs bitwise equal through either path, and JITFunction.run
not called again once a bucket is bound.
"""
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fastbert.triton import launch as launch_module
from fastbert.triton.launch import _Binding, _make_binder, _runtime_spec, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@triton.jit
def _stand_in_kernel(X, Y, n, scale, flag, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 7):
    pass  # never compiled here: its `run` is replaced by a recorder


class _Compiled:
    """A CompiledKernel's launch surface; records what the direct launch passed."""

    def __init__(self, fail=False):
        self.function, self.packed_metadata, self.fail = "function", ("meta",), fail
        self.launches = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid)

    def run(self, *args):
        if self.fail:
            raise TypeError("stand-in launcher refuses")
        self.launches.append(args)


@pytest.fixture
def stand_in(monkeypatch):
    """(kernel, ordinary calls list, compiled kernel): a fresh JITFunction per test whose
    ordinary launch records its call and returns the stand-in compiled kernel."""
    if launch_module.INTERPRET:
        pytest.skip("the default tier's stand-in kernel is a JITFunction")
    kernel = triton.jit(_stand_in_kernel.fn)
    compiled = _Compiled()
    calls = []

    def ordinary(*args, grid, warmup, **kwargs):
        calls.append((args, grid, kwargs))
        return compiled

    kernel.run = ordinary
    monkeypatch.setattr(launch_module, "enabled", True)
    monkeypatch.setattr(launch_module, "_current_device_and_stream", lambda: (0, 1234))
    yield kernel, calls, compiled
    launch_module._bindings.pop(id(kernel), None)


def _args(dtype=torch.float32, offset=0, n=64, **overrides):
    x = torch.zeros(32, dtype=dtype)[offset:]
    return (x, torch.zeros(32, dtype=dtype), n, 0.5, True), dict(dict(BLOCK=16), **overrides)


def _key(kernel, args, kwargs):
    return _Binding(kernel).bind(*args, **kwargs)[1]


# --------------------------------------------------------------------------------------------
# the key
# --------------------------------------------------------------------------------------------

def test_key_same_inputs_same_key(stand_in):
    kernel = stand_in[0]
    assert _key(kernel, *_args()) == _key(kernel, *_args())  # fresh tensors, same facts


@pytest.mark.parametrize("change", [
    dict(dtype=torch.float16), dict(offset=1),  # dtype; a 4-byte, not 16-byte, aligned pointer
    dict(n=1), dict(n=65), dict(n=2**31), dict(n=2**63),  # ==1; not %16; int64; uint64
    dict(BLOCK=32), dict(EXTRA=8), dict(num_warps=8),  # constexprs (also a default); options
])
def test_key_splits_what_triton_specialises(stand_in, change):
    kernel = stand_in[0]
    assert _key(kernel, *_args(**change)) != _key(kernel, *_args())


def test_key_merges_ints_triton_compiles_alike(stand_in):
    kernel = stand_in[0]
    assert _key(kernel, *_args(n=32)) == _key(kernel, *_args(n=64 * 1024))
    assert _key(kernel, *_args(n=17)) == _key(kernel, *_args(n=1023))


def test_runtime_spec_is_at_least_as_fine_as_tritons():
    """Two arguments our key puts in one bucket are one specialisation for Triton too (our key
    may split more finely; never less)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    buffer = torch.zeros(64)
    values = [0, 1, 2, 15, 16, 17, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -2**31,
              -2**31 - 1, 2**63 - 1, 2**63, 2**64 - 16, 0.0, 1.0, 2.5, True, False, None,
              buffer, buffer[1:], buffer[4:], buffer.half(), buffer.half()[8:],
              torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int32)]
    triton_spec = [native_specialize_impl(BaseBackend, v, False, True, True) for v in values]
    one_argument = _make_binder(["A"], [False], {})  # ints take its inline code, the rest a call
    ours = [one_argument(v)[1][0] for v in values]
    assert ours == [_runtime_spec(v) for v in values]
    for i in range(len(values)):
        for j in range(len(values)):
            if ours[i] == ours[j]:
                assert triton_spec[i] == triton_spec[j], (values[i], values[j])


def test_unmodelled_argument_takes_the_ordinary_launch(stand_in):
    kernel, calls, compiled = stand_in
    args, kwargs = _args()
    args = (args[0], args[1], (2, 3), args[3], args[4])  # a tuple where an int was
    for _ in range(2):
        launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 2 and compiled.launches == []


# --------------------------------------------------------------------------------------------
# caching, the direct launch, fallback, kill switch
# --------------------------------------------------------------------------------------------

def test_second_call_launches_the_compiled_kernel_directly(stand_in):
    kernel, calls, compiled = stand_in
    args, kwargs = _args()
    assert launch(kernel, (3, 2), *args, num_warps=4, **kwargs) is compiled
    assert len(calls) == 1 and calls[0][1] == (3, 2) and compiled.launches == []
    x, y = torch.zeros(32), torch.zeros(32)  # new tensors, same bucket
    assert launch(kernel, (5, 2), x, y, 128, 0.25, False, num_warps=4, BLOCK=16) is compiled
    assert len(calls) == 1
    (launched,) = compiled.launches
    # JITFunction.run's last line: grid, stream, handle, metadata, hooks, every argument in
    # signature order (the EXTRA default included)
    assert launched[:7] == (5, 2, 1, 1234, "function", ("meta",), ("metadata", (5, 2)))
    knobs = triton.knobs.runtime
    assert launched[7] is knobs.launch_enter_hook and launched[8] is knobs.launch_exit_hook
    assert launched[9] is x and launched[10] is y
    assert launched[11:] == (128, 0.25, False, 16, 7)


def test_new_bucket_takes_the_ordinary_path_once(stand_in):
    kernel, calls, compiled = stand_in
    for dtype in (torch.float32, torch.float16, torch.float32, torch.float16):
        args, kwargs = _args(dtype=dtype)
        launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 2 and len(compiled.launches) == 2


def test_callable_grid_gets_the_arguments_by_name(stand_in):
    kernel, calls, compiled = stand_in
    seen = []

    def grid(meta):
        seen.append(meta)
        return (triton.cdiv(meta["n"], meta["BLOCK"]),)

    for _ in range(2):
        args, kwargs = _args(n=64)
        launch(kernel, grid, *args, **kwargs)
    assert calls[0][1] is grid  # the ordinary path resolves it itself
    assert seen[0]["n"] == 64 and seen[0]["EXTRA"] == 7
    assert compiled.launches[0][:3] == (4, 1, 1)


def test_autotuned_kernel_launches_with_its_config(stand_in):
    kernel, calls, compiled = stand_in
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=2)], key=["n"])(kernel)
    try:
        for n in (64, 64, 128, 128):
            args, kwargs = _args(n=n)
            kwargs.pop("BLOCK")
            launch(tuned, (1,), *args, **kwargs)
        # n is the autotuner's key: each value its own bucket, even where Triton compiles alike
        assert len(calls) == 2 and len(compiled.launches) == 2
        assert calls[0][2]["BLOCK"] == 32 and calls[0][2]["num_warps"] == 2
        assert compiled.launches[1][11:] == (128, 0.5, True, 32, 7)
    finally:
        launch_module._bindings.pop(id(tuned), None)


def test_kernel_with_pre_run_hook_stays_ordinary(stand_in):
    kernel, calls, compiled = stand_in
    kernel.add_pre_run_hook(lambda *args, **kwargs: None)
    for _ in range(3):
        args, kwargs = _args()
        launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 3 and compiled.launches == []


def test_failing_direct_launch_falls_back_once_with_a_warning(stand_in):
    kernel, calls, compiled = stand_in
    compiled.fail = True
    args, kwargs = _args()
    launch(kernel, (1,), *args, **kwargs)
    with pytest.warns(RuntimeWarning, match="pre-bound launch of .* failed"):
        launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 2  # the failed direct launch was redone the ordinary way
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 5


def test_failure_after_a_working_direct_launch_raises(stand_in):
    kernel, calls, compiled = stand_in
    args, kwargs = _args()
    for _ in range(2):
        launch(kernel, (1,), *args, **kwargs)
    compiled.fail = True
    with pytest.raises(TypeError, match="stand-in launcher refuses"):
        launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 1


def test_kill_switch(stand_in, monkeypatch):
    kernel, calls, compiled = stand_in
    monkeypatch.setattr(launch_module, "enabled", False)
    for _ in range(3):
        args, kwargs = _args()
        launch(kernel, (1,), *args, **kwargs)
    assert len(calls) == 3 and compiled.launches == []


@pytest.mark.parametrize("env, expected", [
    ({}, True), ({"FASTBERT_PREBOUND": "0"}, False), ({"FASTBERT_PREBOUND": "1"}, True),
    ({"TRITON_INTERPRET": "1"}, False)])
def test_environment_switches(env, expected):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("FASTBERT_PREBOUND", "TRITON_INTERPRET")}
    code = "import fastbert.triton.launch as l; print(l.enabled)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(environ, **env), cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(expected)


# --------------------------------------------------------------------------------------------
# interpreter tier: the ordinary launch runs the kernels
# --------------------------------------------------------------------------------------------

@pytest.mark.interpreter
def test_interpreter_takes_the_ordinary_launch(monkeypatch):
    from fastbert.triton.layer_norm import add_layer_norm_forward
    assert launch_module.enabled is False

    def no_binding(kernel):
        raise AssertionError("the pre-bound path was entered under TRITON_INTERPRET=1")

    monkeypatch.setattr(launch_module, "_Binding", no_binding)
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    weight, bias = torch.randn(48), torch.randn(48)
    y, _, _ = add_layer_norm_forward(x, residual, weight, bias, 1e-5, 0.0, 0)[:3]
    expected = torch.nn.functional.layer_norm(x + residual, (48,), weight, bias, 1e-5)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# gpu tier: every launcher, both paths
# --------------------------------------------------------------------------------------------

def _launcher_cases(dtype, device="cuda"):
    """name -> a function running one launcher's forward and backward on fixed inputs."""
    from fastbert import triton as fb_triton
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    b, s, h, d = 3, 77, 4, 64
    q, k, v, dout = (randn(b, s, h, d) for _ in range(4))
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1, 50:] = False
    mask[2, 9:] = False
    cu = torch.tensor([0, 30, 77, 100], dtype=torch.int32, device=device)
    qp, kp, vp, doutp = (randn(100, h, d) for _ in range(4))
    x, residual, dy = randn(300, 768), randn(300, 768), randn(300, 768)
    ln_weight, ln_bias = randn(768), randn(768)
    xm, w, bias, w2 = randn(200, 256), randn(512, 256), randn(512), randn(1024, 256)
    dgelu, dgeglu = randn(200, 512), randn(200, 512)
    cos, sin = torch.randn(128, 16, device=device), torch.randn(128, 16, device=device)
    positions = torch.arange(s, device=device)

    def attention(masked, causal, dropout_p, deterministic):
        def run():
            m = mask.clone() if masked else None  # a new mask: its key-range kernel runs too
            out, lse = fb_triton.attention_forward(q, k, v, m, causal, dropout_p, 0.125, 7)
            grads = fb_triton.attention_backward(dout, q, k, v, out, lse, m, causal, dropout_p,
                                                 0.125, 7, deterministic)
            return (out, lse) + tuple(grads)
        return run

    def varlen():
        out, lse = fb_triton.attention_varlen_forward(qp, kp, vp, cu, cu, 47, 47, False, 0.1,
                                                      0.125, 9)
        grads = fb_triton.attention_varlen_backward(doutp, qp, kp, vp, out, lse, cu, cu, 47, 47,
                                                    False, 0.1, 0.125, 9, True)
        return (out, lse) + tuple(grads)

    def layer_norm():
        y, mean, rstd = fb_triton.add_layer_norm_forward(x, residual, ln_weight, ln_bias, 1e-12,
                                                         0.1, 11)[:3]
        grads = fb_triton.add_layer_norm_backward(dy, x, residual, ln_weight, mean, rstd, 0.1, 11)
        return (y, mean, rstd) + tuple(grads)

    def linear_gelu():
        out, pre = fb_triton.linear_bias_gelu_forward(xm, w, bias, "none")
        return (out, pre) + tuple(fb_triton.linear_bias_gelu_backward(dgelu, xm, w, pre, "none"))

    def linear_geglu():
        out, pre = fb_triton.linear_geglu_forward(xm, w2, None, "tanh")
        return (out, pre) + tuple(fb_triton.linear_geglu_backward(dgeglu, xm, w2, pre, "tanh"))

    def rotary():
        return (fb_triton.apply_rotary(q, cos, sin, positions, False, False),
                fb_triton.apply_rotary(q, cos, sin, positions, True, True))

    return {"attention masked dropout": attention(True, False, 0.1, True),
            "attention causal, atomic dQ": attention(False, True, 0.0, False),
            "attention varlen dropout": varlen, "add_layer_norm dropout": layer_norm,
            "linear_bias_gelu": linear_gelu, "linear_geglu": linear_geglu, "apply_rotary": rotary}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prebound_launches_match_ordinary_bitwise_gpu(dtype, monkeypatch):
    from triton.runtime.jit import JITFunction
    ordinary_run = JITFunction.run
    calls = []

    def counted_run(self, *args, **kwargs):
        calls.append(self)
        return ordinary_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted_run)
    for name, run in _launcher_cases(dtype).items():
        monkeypatch.setattr(launch_module, "enabled", False)
        expected = run()
        monkeypatch.setattr(launch_module, "enabled", True)
        first = run()  # binds each bucket (the ordinary path, counted)
        calls.clear()
        bound = [run() for _ in range(2)]
        torch.cuda.synchronize()
        assert calls == [], f"{name}: JITFunction.run called after binding: {calls}"
        for got in [first] + bound:
            for i, (a, e) in enumerate(zip(got, expected)):
                if "atomic" in name and i == 2:  # dQ summed by atomics: order varies per run
                    torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
                else:
                    assert torch.equal(a, e), f"{name}: output {i} differs"


# --------------------------------------------------------------------------------------------
# compile tier: real kernels compiled for sm_90 behind a stand-in driver; both paths' launcher
# arguments compared
# --------------------------------------------------------------------------------------------

class _StandInDriver:
    """What JITFunction.run and CompiledKernel ask of a GPU driver, without a GPU: an sm_90
    target, a device and stream, kernels that "load", and a launcher that records its
    arguments instead of launching."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)
        self.launches = []
        self.utils = self

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 4242

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return "module", f"function {name}", 32, 0, 1024

    def launcher_cls(self, src, metadata):
        return lambda *args: self.launches.append(args)


def _same_launch(a, b) -> bool:
    """Launcher argument lists that launch the same: tensors alike (fresh outputs each call),
    everything else equal."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if type(x).__name__ == "LazyDict":  # the launch metadata: a new one per launch
            if type(y) is not type(x) or vars(x) != vars(y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and (x.dtype, x.shape, x.stride()) == (y.dtype, y.shape, y.stride())):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.compile
def test_direct_launch_passes_what_jitfunction_run_passes(monkeypatch):
    from triton.runtime.jit import JITFunction

    from fastbert import triton as fb_triton
    from fastbert.triton import attention, layer_norm, linear_gelu, rotary
    driver = _StandInDriver()
    monkeypatch.setattr(triton.runtime.driver, "_active", driver)
    monkeypatch.setattr(launch_module, "_driver_calls", None)
    ordinary_run, runs = JITFunction.run, []

    def counted_run(self, *args, **kwargs):
        runs.append(self)
        return ordinary_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted_run)
    dt = torch.float16
    x, r, dy = (torch.randn(5, 96).to(dt) for _ in range(3))
    w, b = torch.randn(96).to(dt), torch.randn(96).to(dt)
    q, k, v = (torch.randn(2, 40, 3, 64).to(dt) for _ in range(3))
    mask = torch.arange(40)[None, :] < torch.tensor([[40], [17]])
    cos, sin = torch.randn(64, 16), torch.randn(64, 16)
    pre = torch.randn(5, 48).to(dt)

    def layer_norm_fwd_bwd():
        _, mean, rstd = fb_triton.add_layer_norm_forward(x, r, w, b, 1e-5, 0.1, 3)[:3]
        fb_triton.add_layer_norm_backward(dy, x, r, w, mean, rstd, 0.1, 3)

    cases = {
        "add_layer_norm": (layer_norm_fwd_bwd, [layer_norm._add_layer_norm_fwd_kernel,
                                                layer_norm._add_layer_norm_bwd_kernel]),
        "attention masked fwd": (
            lambda: fb_triton.attention_forward(q, k, v, mask.clone(), False, 0.0, 0.125, 1),
            [attention._key_range_kernel, attention._attn_fwd_kernel]),
        "apply_rotary": (lambda: fb_triton.apply_rotary(q, cos, sin, torch.arange(40), False,
                                                        False), [rotary._rotary_kernel]),
        "gelu dbias": (lambda: linear_gelu.linear_bias_gelu_backward(
            pre.clone(), x, torch.randn(48, 96).to(dt), pre, "none"),
            [linear_gelu._gelu_bwd_dbias_kernel]),
    }
    try:
        for name, (call, kernels) in cases.items():
            monkeypatch.setattr(launch_module, "enabled", True)
            call()  # binds: Triton compiles for sm_90 and "launches" through the recorder
            assert len(runs) == len(kernels), name
            expected = []
            for enabled in (False, True):  # the ordinary path, then the direct one
                monkeypatch.setattr(launch_module, "enabled", enabled)
                runs.clear()
                driver.launches.clear()
                call()
                assert len(runs) == (0 if enabled else len(kernels)), name
                expected = expected or list(driver.launches)
            assert len(driver.launches) == len(kernels), name
            for got, want in zip(driver.launches, expected):
                assert _same_launch(got, want), (name, [
                    (i, a, b) for i, (a, b) in enumerate(zip(got, want))
                    if not _same_launch([a], [b])])
    finally:
        for _, kernels in cases.values():
            for kernel in kernels:  # nothing compiled for the stand-in driver stays behind
                for caches in kernel.device_caches.values():
                    for compiled in caches[0].values():
                        compiled.module = None  # never loaded: nothing for __del__ to unload
                kernel.device_caches.clear()
                launch_module._bindings.pop(id(kernel), None)
