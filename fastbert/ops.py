"""The backends and what every fused op shares: backend choice, argument checks, the eager
autograd path; and the attention op. The other ops, one per module, build on these:
fastbert/layer_norm.py (add_layer_norm), linear_gelu.py (linear_bias_gelu), varlen.py
(attention_varlen), geglu.py (linear_geglu), rotary.py (apply_rotary).

Each backend is a module exposing the same kernel entry points (`fastbert/torch_backend.py`,
`fastbert/triton/__init__.py`, `fastbert/cuda.py`):

    attention_forward(q, k, v, mask, causal, dropout_p, scale, seed) -> (out, lse)
    attention_backward(dout, q, k, v, out, lse, mask, causal, dropout_p, scale, seed,
                       deterministic) -> (dq, dk, dv)
    add_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed, store_sum=False,
                           out_dtype=None)
        -> (y, mean, rstd), or (y, mean, rstd, s) with store_sum (return_residual: the pre-norm
        sum s = dropout(x) + residual); y and s in out_dtype (x's if None; under autocast x and
        residual may differ in dtype)
    add_layer_norm_backward(dy, x, residual, weight, mean, rstd, dropout_p, seed, dsum=None)
        -> (dx, dresidual, dweight, dbias) (dsum: the gradient reaching s, or None), each
        gradient in its input's dtype
    linear_bias_gelu_forward(x, weight, bias, approximate) -> (out, pre)
    linear_bias_gelu_backward(dout, x, weight, pre, approximate) -> (dx, dweight, dbias)
    attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, dropout_p, scale, seed) -> (out, lse)
    attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, dropout_p, scale, seed, deterministic)
        -> (dq, dk, dv)

plus `unsupported(op, **kw) -> str | None` saying why it cannot serve an input. A backend that
serves sliding windows takes `window=(left, right)` as a last keyword of the four attention entry
points (passed only when one is set; the others refuse `window` in unsupported), and ModernBERT's
ops have their entry points in fastbert/geglu.py and fastbert/rotary.py. Arguments reach
them already checked: q/k/v (B, S, H, D) with unit last stride, mask bool (B, Sk) contiguous or
None, x/residual 2-D contiguous (rows, hidden), seed a Python int; varlen q/k/v (total, H, D)
with unit last stride, cu_seqlens int32 (B + 1,) contiguous, lse (H, total_q) (fastbert/varlen.py
holds that op). Every tensor they return is contiguous (the fake implementations below promise
that layout to torch.compile).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert.torch_backend import TorchBackend as _TorchBackend

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)
# float64 is accepted for gradcheck and served only by the torch backend.
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _check_backend_name(op: str, name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{op}: argument 'backend' expected one of {_CHOICES}, got {name!r}")
    return name


_default_backend = _check_backend_name("FASTBERT_BACKEND", os.environ.get("FASTBERT_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Set the backend used when an op is called with backend="auto" (the default)."""
    global _default_backend
    _default_backend = _check_backend_name("set_backend", name)


def get_backend() -> str:
    return _default_backend


# --------------------------------------------------------------------------------------------
# backend modules and choice
# --------------------------------------------------------------------------------------------

_modules: dict = {}
_load_errors: dict = {}


def _backend_module(name: str):
    """The backend module, or None (with the reason in _load_errors) when it cannot load here."""
    if name in _modules:
        return _modules[name]
    module = None
    try:
        if name == "torch":
            module = _TorchBackend
        elif name == "triton":
            import fastbert.triton as module  # noqa: F811
        elif name == "cuda":
            from fastbert import cuda as module  # noqa: F811
            reason = module.unavailable_reason()
            if reason is not None:
                _load_errors[name] = reason
                module = None
    except ImportError as e:  # triton not installed, or the extension not built
        _load_errors[name] = f"{type(e).__name__}: {e}"
        module = None
    _modules[name] = module
    return module


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    if name == "torch":
        return None
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got {device}"
    return None


def _why_not(name: str, op: str, device: torch.device, kw: dict) -> Optional[str]:
    reason = _device_reason(name, device)
    if reason is not None:
        return reason
    module = _backend_module(name)
    if module is None:
        return f"backend {name!r} is not available here ({_load_errors.get(name, 'unknown reason')})"
    if name != "torch" and kw.get("dtype") == torch.float64:
        return "float64 runs only on the torch backend"
    return module.unsupported(op, **kw)


def resolve_backend(op: str, backend: str, device: torch.device, **kw) -> str:
    """Pick the backend: a named one must serve the input or raise; "auto" takes the fastest that can."""
    backend = _check_backend_name(op, backend)
    if backend == "auto":
        backend = _default_backend
    if backend != "auto":
        reason = _why_not(backend, op, device, kw)
        if reason is not None:
            raise ValueError(f"{op}: backend {backend!r} cannot serve this input: {reason}")
        return backend
    if device.type != "cuda":
        return "torch"
    for name in _auto_order(op, device):  # fastest first, by measurement or static analysis
        if _why_not(name, op, device, kw) is None:
            return name
    return "torch"


_orders: dict = {}


def _auto_order(op: str, device: torch.device) -> Tuple[str, ...]:
    """The backends `auto` tries for op on device, cached per (op, device) after the first call."""
    key = (op, device.index)
    if key not in _orders:
        from fastbert import backend_order
        _orders[key] = tuple(name for name, _ in backend_order.order(op, device))
    return _orders[key]


def _draw_seed(dropout_p: float) -> Optional[Tensor]:
    # From torch's default generator, so torch.manual_seed reproduces the dropout pattern.
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


def _seed_int(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


# nn.Parameter (a model's LayerNorm weights) dispatches as a plain Tensor; other subclasses (fake,
# functional, DTensor) keep the custom op's dispatch
_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors: Optional[Tensor]) -> bool:
    """Plain tensors outside torch.compile tracing: a call that records autograd runs the op's
    own forward, setup_context and backward through _EagerOp, not through the custom op, whose
    dispatch costs more host time than a small op's work and whose first call imports
    torch._dynamo (seconds). torch.compile and tensor subclasses keep the custom op."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _inference(*tensors: Optional[Tensor]) -> bool:
    """An eager call (above) with no autograd graph to record: the public ops then call the
    backend directly. Not while a profiler listens: then the call runs through _EagerOp, which
    names it as a training call's forward is named (fastbert::<op>_fwd)."""
    if not _eager(*tensors) or torch.autograd._profiler_enabled():
        return False
    return not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in tensors))


def own_view(t: Tensor, shape) -> Tensor:
    """t.view(shape) that autograd sees as a tensor of its own, not a view of t. A module that
    returns a view makes FSDP2 warn (an in-place op on it would skip the pre-backward
    all-gather), and transformers' layers return none. Only for a fresh op output that nothing
    else holds or saves for backward: an in-place change to the result is then tracked on it."""
    return torch.ops.aten._unsafe_view(t, shape)


class _EagerOp(torch.autograd.Function):
    """One custom op's implementation, setup_context and backward (the functions registered with
    it) as an autograd.Function. The backward functions see ctx.eager and call the backward
    implementation directly as well. Under the profiler, forward and backward show as the
    custom ops' names (name_fwd, name_bwd), as they do through the custom ops."""

    @staticmethod
    def forward(name, forward, setup, grad, *inputs):
        if not torch.autograd._profiler_enabled():  # no context manager: 4 Python calls less
            return forward(*inputs)
        with _profiled(f"{name}_fwd"):
            return forward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        name, _, setup, grad, *args = inputs
        setup(ctx, tuple(args), output)
        ctx.name, ctx.grad, ctx.eager = name, grad, True

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._profiler_enabled():
            return (None, None, None, None, *ctx.grad(ctx, *grads))
        with _profiled(f"{ctx.name}_bwd"):
            return (None, None, None, None, *ctx.grad(ctx, *grads))


# _EagerOp.apply(name, forward, setup, grad, *inputs) for callers that have checked that no
# functorch transform is active (torch._C._are_functorch_transforms_active()): autograd.Function's
# own C implementation, without Function.apply's Python wrapper, which binds the arguments to
# forward's signature with inspect (~130 Python calls a call, nothing to bind here) for functorch
apply_eager = super(torch.autograd.Function, _EagerOp).apply
_unwrap_dead_wrappers = torch._functorch.utils.unwrap_dead_wrappers


def eager_apply(name: str, forward, setup, grad, *inputs):
    """_EagerOp on a public op's training call: autograd.Function's C apply (apply_eager) on the
    inputs with dead functorch wrappers unwrapped (tensors that escaped a finished torch.func
    transform, as Function.apply unwraps them), or, while a transform is active,
    Function.apply itself (it also binds the arguments with inspect, ~45 us a call, which is why
    it is not the default) with fastbert._cpu's kernels suspended (fastbert.cpu_attention.
    suspended says why): a forward and its backward then both take the other path."""
    if not torch._C._are_functorch_transforms_active():
        return apply_eager(name, forward, setup, grad, *_unwrap_dead_wrappers(inputs))
    from fastbert import cpu_attention
    with cpu_attention.suspended():
        return _EagerOp.apply(name, forward, setup, grad, *inputs)


def _profiled(name: str):
    # record_function costs ~10 us a call: only when a profiler listens
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def _backward_impl(ctx, custom_op, impl):
    """The backward to call from a registered backward: the custom op under its own autograd,
    the plain implementation under _EagerOp."""
    return impl if getattr(ctx, "eager", False) else custom_op


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def _expect_tensor(op: str, name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: argument '{name}' expected a torch.Tensor, got {type(t).__name__}")
    return t


def _expect_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: argument '{name}' expected dtype float16, bfloat16, float32 (or float64 "
                        f"on the torch backend), "
                        f"got {t.dtype}")


def _expect_same_device(op: str, ref_name: str, ref: Tensor, name: str, t: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: argument '{name}' expected to be on {ref.device} like "
                         f"'{ref_name}', got {t.device}")


def _expect_dropout(op: str, p) -> float:
    if not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{op}: argument 'dropout_p' expected a float in [0, 1), got {p!r}")
    return float(p)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _gelu_linear_operands(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          approximate: str, halves: bool = False):
    """The checks linear_bias_gelu and linear_geglu share: x (..., K), weight (N, K) (halves: 2N
    rows, two stacked halves), bias (weight rows,) (None only for halves: linear_geglu's is
    optional), approximate "none" or "tanh"; one dtype, or all cast to autocast's.
    Returns (x, weight, bias)."""
    for name, t in (("x", x), ("weight", weight)) + (
            (("bias", bias),) if bias is not None or not halves else ()):
        _expect_tensor(op, name, t)
        _expect_float(op, name, t)
        _expect_same_device(op, "x", x, name, t)
    if x.dim() < 1:
        raise ValueError(f"{op}: argument 'x' expected at least 1 dim (..., K), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or (halves and weight.shape[0] % 2):
        want = (f"(2N, K={x.shape[-1]}) (the GELU half stacked on the gate half)" if halves
                else f"(N, K={x.shape[-1]})")
        raise ValueError(f"{op}: argument 'weight' expected shape {want}, got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: argument 'bias' expected shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: argument 'approximate' expected 'none' or 'tanh', got "
                         f"{approximate!r}")
    cast = _autocast_dtype(x.device)
    if cast is not None:
        return x.to(cast), weight.to(cast), bias.to(cast) if bias is not None else None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{op}: arguments 'x', 'weight', 'bias' expected one dtype, got "
                        f"{x.dtype}, {weight.dtype}, {bias.dtype if bias is not None else None}")
    return x, weight, bias


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

def _attention_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
                       dropout_p: float, scale: float, seed: Optional[Tensor],
                       deterministic: bool, backend: str, window_left: int = -1,
                       window_right: int = -1) -> Tuple[Tensor, Tensor]:
    # `deterministic` only changes backward; forward carries it so setup_context can keep it.
    out, lse = _backend_module(backend).attention_forward(
        q, k, v, mask, causal, dropout_p, scale, _seed_int(seed),
        **window_kw((window_left, window_right)))
    return out, lse


_attention_fwd = torch.library.custom_op("fastbert::attention_fwd",
                                         mutates_args=())(_attention_forward)


@_attention_fwd.register_fake
def _(q, k, v, mask, causal, dropout_p, scale, seed, deterministic, backend, window_left=-1,
      window_right=-1):
    b, sq, h, d = q.shape
    return q.new_empty(b, sq, h, d), q.new_empty(b, h, sq, dtype=torch.float32)


def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        mask: Optional[Tensor], causal: bool, dropout_p: float, scale: float,
                        seed: Optional[Tensor], deterministic: bool, backend: str,
                        window_left: int = -1,
                        window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _backend_module(backend).attention_backward(
        dout.contiguous(), q, k, v, out, lse, mask, causal, dropout_p, scale, _seed_int(seed),
        deterministic, **window_kw((window_left, window_right)))
    return dq, dk, dv


_attention_bwd = torch.library.custom_op("fastbert::attention_bwd",
                                         mutates_args=())(_attention_backward)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, causal, dropout_p, scale, seed, deterministic, backend,
      window_left=-1, window_right=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    (q, k, v, mask, causal, dropout_p, scale, seed, deterministic, backend, window_left,
     window_right) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
    ctx.window = (window_left, window_right)
    ctx.deterministic, ctx.backend = deterministic, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _attention_grad(ctx, dout, dlse):
    if dout is None:
        return (None,) * 12
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    backward = _backward_impl(ctx, _attention_bwd, _attention_backward)
    dq, dk, dv = backward(dout, q, k, v, out, lse, mask, ctx.causal, ctx.dropout_p, ctx.scale,
                          seed, ctx.deterministic, ctx.backend, *ctx.window)
    return dq, dk, dv, *([None] * 9)


_attention_fwd.register_autograd(_attention_grad, setup_context=_attention_setup)


def _softmax_scale(op: str, softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale) \
            or softmax_scale <= 0:
        raise ValueError(f"{op}: argument 'softmax_scale' expected a finite positive float or "
                         f"None, got {softmax_scale!r}")
    return float(softmax_scale)


FULL_WINDOW = (-1, -1)


def _window(op: str, window_size) -> Tuple[int, int]:
    """flash-attn's window_size=(left, right): ints >= 0, or -1 for unbounded."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1
                       for w in window_size)):
        raise ValueError(f"{op}: argument 'window_size' expected (left, right), each an int >= 0 "
                         f"or -1 for unbounded, got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def window_kw(window: Tuple[int, int]) -> dict:
    """Backends get `window` only when one is set: a backend that serves windows takes
    window=(-1, -1); the others refuse windowed inputs in unsupported(window=...)."""
    return {} if tuple(window) == FULL_WINDOW else {"window": tuple(window)}


def _attention_operands(q: Tensor, k: Tensor, v: Tensor):
    """q, k, v in autocast's dtype (when it is on), each with a unit last stride."""
    cast = _autocast_dtype(q.device)
    if cast is not None and q.dtype != cast:
        q, k, v = q.to(cast), k.to(cast), v.to(cast)
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, *,
              causal: bool = False, window_size: Tuple[int, int] = FULL_WINDOW,
              dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
              deterministic: bool = False, backend: str = "auto") -> Tensor:
    """Scaled-dot-product attention. q (B, Sq, H, D), k and v (B, Sk, H, D) -> (B, Sq, H, D).

    key_padding_mask (B, Sk): True/nonzero marks a real token. causal: query i sees keys
    j <= i + Sk - Sq. window_size (left, right), flash-attn's sliding window: query i sees keys
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1 = unbounded); it composes with the mask,
    causal and dropout. A query that sees no key returns zeros (and zero gradients).
    """
    op = "fastbert.attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _expect_tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: argument '{name}' expected a 4-D tensor (B, S, H, D), "
                             f"got shape {tuple(t.shape)}")
        _expect_float(op, name, t)
        _expect_same_device(op, "q", q, name, t)
    if not (k.dtype == q.dtype and v.dtype == q.dtype):
        raise TypeError(f"{op}: arguments 'q', 'k', 'v' expected one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if tuple(k.shape) != (b, sk, h, d) or tuple(v.shape) != (b, sk, h, d):
        raise ValueError(f"{op}: arguments 'k' and 'v' expected shape (B={b}, Sk, H={h}, D={d}) "
                         f"with one Sk, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: argument 'q' expected head dim 1..{MAX_HEAD_DIM}, got {d}")
    if key_padding_mask is not None:
        _expect_tensor(op, "key_padding_mask", key_padding_mask)
        _expect_same_device(op, "q", q, "key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (b, sk):
            # a mask that fits dim 2 as the length: q/k/v were given in SDPA's (B, H, S, D) order
            sdpa = (key_padding_mask.dim() == 2 and key_padding_mask.shape[1] == k.shape[2] != sk)
            raise ValueError(f"{op}: argument 'key_padding_mask' expected shape (B, Sk) = "
                             f"({b}, {sk}) for q/k/v in (B, S, H, D) layout, got "
                             f"{tuple(key_padding_mask.shape)}" + (
                                 f"; k {tuple(k.shape)} looks like SDPA's (B, H, S, D) layout: pass "
                                 f"q/k/v.transpose(1, 2) and transpose the output back" if sdpa else ""))
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise TypeError(f"{op}: argument 'key_padding_mask' expected a bool or integer tensor "
                            f"(True/nonzero = real token), got {key_padding_mask.dtype}")
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
        # the same bool mask object in every layer: the Triton launcher caches its key ranges
        key_padding_mask = key_padding_mask.contiguous()
    window = _window(op, window_size)
    dropout_p = _expect_dropout(op, dropout_p)
    softmax_scale = _softmax_scale(op, softmax_scale, d)
    q, k, v = _attention_operands(q, k, v)
    chosen = resolve_backend(op, backend, q.device, dtype=q.dtype, head_dim=d,
                             dropout_p=dropout_p, causal=bool(causal),
                             has_mask=key_padding_mask is not None, **window_kw(window))
    if _inference(q, k, v):
        return _backend_module(chosen).attention_forward(
            q, k, v, key_padding_mask, bool(causal), dropout_p, softmax_scale,
            _seed_int(_draw_seed(dropout_p)), **window_kw(window))[0]
    args = (q, k, v, key_padding_mask, bool(causal), dropout_p, float(softmax_scale),
            _draw_seed(dropout_p), bool(deterministic), chosen, *window)
    if _eager(q, k, v, key_padding_mask):
        return eager_apply("fastbert::attention", _attention_forward, _attention_setup,
                           _attention_grad, *args)[0]
    return _attention_fwd(*args)[0]
