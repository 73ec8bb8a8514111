"""CPU inference GEMMs through oneDNN, with bias (and optionally GELU and a residual add) fused
into the GEMM, weights prepacked where that pays.

`F.linear` on CPU goes to MKL, which on AMD CPUs runs below what the same cores reach through
oneDNN (the engine torch's inductor uses on CPU). torch ships oneDNN's inner product as private
ops (`torch.ops.mkldnn._linear_pointwise`, `torch.ops.mkldnn._reorder_linear_weight`); this
module calls them for inference (no autograd graph), and falls back to the public `F.linear` /
`F.gelu` whenever they are missing, refuse an input, or fail once.

    from fastbert import cpu
    if cpu.should_use(x, weight, bias):        # x (rows, K) on CPU, nothing needs a gradient
        y = cpu.linear(x, weight, bias)        # x @ weight.T + bias
        h = cpu.linear_gelu(x, weight, bias, approximate="none")
        z = cpu.linear_add(x, weight, bias, residual)   # x @ weight.T + bias + residual
    print(cpu.describe())                      # which CPU path is active and why

Prepacked weights (bf16 mode, or fp32 with PREPACK_FP32 = True, both opt-in) live in a
small cache keyed by the weight tensor's identity and invalidated when its storage, shape or
version counter (bumped by every in-place write, e.g. `load_state_dict`) changes, and by every
torch.optim step (fused optimizers write without bumping version counters). There is one copy
per live weight, with no count limit (an LRU bound would repack every call on a model with more
weights than the bound): the cache holds each weight only weakly and drops its copy when the
weight is freed, so models are freed as usual; `clear_cache()` frees the copies at once. A write
through `.data` (`w.data.mul_(2)`, peft's merge_and_unload) reaches neither signal: call
`clear_cache()` after one. (fp32 GEMMs, the default, take weights as they are.)

bf16 mode (`set_bf16(True)`, opt-in): fp32 activations are rounded to bf16 for each GEMM and
multiplied with a cached bf16 copy of the weight (fp32 accumulation inside oneDNN); outputs come
back in fp32, so LayerNorm and softmax statistics and everything between GEMMs stay fp32. It is
offered only on CPUs with native bf16 dot products (AVX512-BF16 or AMX) that torch's oneDNN can use.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Chosen by measurement (benchmarks/README.md, "CPU inference GEMMs" and "A third machine"):
# - fp32 weights prepacked into oneDNN's blocked layout (a cached second copy of each weight):
#   no faster than the plain weight on the first development CPU (AVX2 AMD EPYC; oneDNN's brgemm
#   kernel blocks the plain layout on the fly), 1.02-1.07x at BERT-base's projections (1,024
#   rows) and 1.2x a whole patched BERT-base forward of 1 x 16 tokens on an AVX-512 one (Zen 5).
#   Off by default all the same: a write through `.data` (EMA, peft's merge) reaches neither of
#   the cache's signals, and the drop-in rule is that no derived copy goes stale unasked.
#   PREPACK_FP32 = True opts in (packing again per call costs what it saves: no gain).
# - GELU as a oneDNN post-op was slower than ATen's vectorised F.gelu after the GEMM on the AVX2
#   CPU (erf 0.85x, tanh 0.8x of the separate pass), and the residual add as a binary post-op was
#   no faster than a separate add_.
PREPACK_FP32 = False
GELU_POST_OP = False
RESIDUAL_POST_OP = False

_enabled = True
_bf16 = False
_lock = threading.RLock()  # re-entered by _drop when a collection frees a weight under it


# --------------------------------------------------------------------------------------------
# what this torch and this CPU offer
# --------------------------------------------------------------------------------------------

def _private_ops_reason() -> Optional[str]:
    """Why torch's oneDNN linear ops cannot be used at all here, or None."""
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is switched off (torch.backends.mkldnn.enabled is False)"
    return _missing_ops()


@functools.lru_cache(maxsize=None)
def _missing_ops() -> Optional[str]:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    mkldnn = torch.ops.mkldnn
    for name in ("_linear_pointwise", "_reorder_linear_weight"):
        try:
            getattr(mkldnn, name)
        except (AttributeError, RuntimeError):
            return f"this torch ({torch.__version__}) has no torch.ops.mkldnn.{name}"
    return None


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """CPU feature names, from torch when it can tell, else /proc/cpuinfo."""
    try:
        caps = torch.cpu.get_capabilities()  # torch >= 2.8
        return frozenset(k for k, v in caps.items() if v is True)
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_support() -> Tuple[bool, str]:
    """(whether bf16 mode can run at native speed here, why or why not)."""
    if not torch.backends.mkldnn.enabled:
        return False, _private_ops_reason()
    return _bf16_support()


@functools.lru_cache(maxsize=None)
def _bf16_support() -> Tuple[bool, str]:
    flags = _cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not native:
        return False, "this CPU has no native bf16 dot products (neither avx512_bf16 nor amx_bf16)"
    reason = _missing_ops()
    if reason is not None:
        return False, reason
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, "torch's oneDNN reports no bf16 support on this CPU"
    except (AttributeError, RuntimeError):
        pass  # no such query in this torch: the probe on first use decides
    return True, f"the CPU has {' and '.join(native)}"


# --------------------------------------------------------------------------------------------
# switches
# --------------------------------------------------------------------------------------------

def set_enabled(enabled: bool) -> None:
    """Turn the oneDNN inference path on or off (off: `should_use` is always False)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"fastbert.cpu.set_enabled: argument 'enabled' expected a bool, "
                        f"got {type(enabled).__name__}")
    _enabled = enabled


def is_enabled() -> bool:
    return _enabled


def set_bf16(enabled: bool, *, force: bool = False) -> None:
    """Opt in to bf16 GEMMs for fp32 CPU inference (see the module docstring).

    Raises RuntimeError on a CPU without native bf16, where the mode would be slower than fp32;
    `force=True` turns it on anyway (the GEMMs then run through the public F.linear in bf16),
    which is only useful to check its accuracy on such a machine.
    """
    global _bf16
    if not isinstance(enabled, bool):
        raise TypeError(f"fastbert.cpu.set_bf16: argument 'enabled' expected a bool, "
                        f"got {type(enabled).__name__}")
    if enabled and not force:
        ok, why = bf16_support()
        if not ok:
            raise RuntimeError(f"fastbert.cpu.set_bf16: bf16 inference mode is not offered here: "
                               f"{why} (force=True runs it anyway, slower than fp32)")
    _bf16 = enabled


def bf16_enabled() -> bool:
    return _bf16


# --------------------------------------------------------------------------------------------
# the oneDNN ops, checked once against F.linear before first use
# --------------------------------------------------------------------------------------------

# ("attr:algorithm", dtype) -> None when the variant works here, else why not (probed once)
_op_state: dict = {}


def _onednn(x: Tensor, packed: Tensor, bias: Optional[Tensor], attr: str, algorithm: str,
            residual: Optional[Tensor]) -> Tensor:
    if attr == "add":
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)


def _reference_epilogue(y: Tensor, attr: str, algorithm: str, residual: Optional[Tensor]) -> Tensor:
    if attr == "gelu":
        return F.gelu(y, approximate=algorithm)
    if attr == "add":
        return y + residual
    return y


def _probe(key: str, dtype: torch.dtype) -> Optional[str]:
    """Run one oneDNN variant on a small problem and compare it with F.linear in fp64."""
    attr, algorithm = key.split(":")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 40, generator=g)
    w = torch.randn(24, 40, generator=g) * 40 ** -0.5
    b = torch.randn(24, generator=g)
    r = torch.randn(9, 24, generator=g)
    exact = _reference_epilogue(F.linear(x.double(), w.double(), b.double()), attr, algorithm,
                                r.double())
    try:
        got = _onednn(x.to(dtype), _onednn_weight(w, dtype, x.shape[0]), b.to(dtype), attr,
                      algorithm, r.to(dtype))
    except Exception as e:  # any failure means: do not use this variant here
        return f"torch.ops.mkldnn._linear_pointwise({attr!r}) failed: {type(e).__name__}: {e}"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    err = (got.double() - exact).abs().max().item()
    if not err <= tol:
        return (f"torch.ops.mkldnn._linear_pointwise({attr!r}) disagrees with F.linear "
                f"(max error {err:.2e} > {tol:g})")
    return None


def _variant_reason(attr: str, algorithm: str, dtype: torch.dtype) -> Optional[str]:
    """Why this oneDNN variant cannot be used for `dtype`, or None; probed once per process."""
    key = (f"{attr}:{algorithm}", dtype)
    if key not in _op_state:
        reason = _private_ops_reason()
        _op_state[key] = reason if reason is not None else _probe(key[0], dtype)
    return _op_state[key]


def _disable_variant(attr: str, algorithm: str, dtype: torch.dtype, error: Exception) -> None:
    _op_state[(f"{attr}:{algorithm}", dtype)] = (
        f"torch.ops.mkldnn._linear_pointwise({attr!r}) failed at run time: "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


# --------------------------------------------------------------------------------------------
# prepacked-weight cache
# --------------------------------------------------------------------------------------------

class _Packed:
    __slots__ = ("ref", "signature", "tensor")

    def __init__(self, ref, signature, tensor):
        self.ref, self.signature, self.tensor = ref, signature, tensor


_cache: "dict[tuple, _Packed]" = {}  # (id(weight), kind) -> its packed copy


_optimizer_steps = 0  # torch.optim steps since import (once _count_optimizer_steps is hooked)


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


@functools.lru_cache(maxsize=None)
def _count_optimizer_steps() -> None:
    """Hook every torch.optim optimizer's step, once: fused optimizers (AdamW(fused=True), the
    Trainer's default) write parameters without bumping their version counters."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(_count_optimizer_step)


def _signature(weight: Tensor) -> Optional[tuple]:
    """What must be unchanged for a packed copy to stay valid; None if it cannot be tracked."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter: writes would go unseen
        return None
    _count_optimizer_steps()
    return (weight.data_ptr(), version, _optimizer_steps, tuple(weight.shape),
            tuple(weight.stride()), weight.dtype)


def _drop(key, ref):
    """The weight behind `ref` was freed: forget its copy (not a later weight's under its id)."""
    with _lock:
        entry = _cache.get(key)
        if entry is not None and entry.ref is ref:
            del _cache[key]


def _cached(weight: Tensor, kind: tuple, make: Callable[[Tensor], Tensor]) -> Tensor:
    """make(weight) from the cache when the weight is unchanged since it was made."""
    signature = _signature(weight)
    if signature is None:
        return make(weight)
    key = (id(weight),) + kind
    with _lock:
        entry = _cache.get(key)
        if entry is not None and entry.ref() is weight and entry.signature == signature:
            return entry.tensor
    tensor = make(weight.detach())
    ref = weakref.ref(weight, functools.partial(_drop, key))
    with _lock:
        _cache[key] = _Packed(ref, signature, tensor)  # replaces a stale copy of this weight
    return tensor


def packed_weight(weight: Tensor, dtype: torch.dtype, rows_hint: int) -> Tensor:
    """The weight reordered into oneDNN's blocked layout in `dtype`, from the cache when valid."""
    return _cached(weight, ("packed", dtype), lambda w: torch.ops.mkldnn._reorder_linear_weight(
        w.to(dtype).contiguous(), rows_hint))


def _onednn_weight(weight: Tensor, dtype: torch.dtype, rows_hint: int) -> Tensor:
    """The weight as the oneDNN op takes it: plain fp32, or packed (cached) where that pays."""
    # an inference tensor has no version counter, so its packed copy would be made per call
    if dtype == torch.float32 and weight.dtype == torch.float32 and (
            not PREPACK_FP32 or weight.is_inference()):
        return weight.detach().contiguous()
    return packed_weight(weight, dtype, rows_hint)


def clear_cache() -> None:
    """Forget every prepacked weight."""
    with _lock:
        _cache.clear()


def cache_size() -> int:
    with _lock:
        return len(_cache)


# --------------------------------------------------------------------------------------------
# scratch buffers
# --------------------------------------------------------------------------------------------

# A fresh multi-MB CPU tensor costs a page fault per 4 KB page on every call (glibc hands large
# blocks back to the OS). On the development VM a ModernBERT-base-3l B8x512 forward took 27K
# faults, and 23% less time with glibc told to keep freed memory (a process-wide setting this
# library does not make). Temporaries that only the next call reads reuse one buffer per role and
# thread instead, between WORKSPACE_MIN_ELEMENTS (smaller ones come from memory the allocator
# keeps) and WORKSPACE_MAX_BYTES (larger ones are not held on to).
WORKSPACE_MIN_ELEMENTS = 1 << 16
WORKSPACE_MAX_BYTES = 64 << 20
_workspace = threading.local()


def scratch(role: str, shape: tuple, like: Tensor) -> Tensor:
    """An uninitialised tensor of `shape` like `like`, for a temporary that the caller's next
    call consumes and nothing keeps: the thread's buffer for `role` on CPU outside autograd (a
    graph could save it), else a new tensor. Two live temporaries need two roles."""
    numel = math.prod(shape)
    if numel < WORKSPACE_MIN_ELEMENTS or like.device.type != "cpu" or torch.is_grad_enabled() \
            or numel * like.element_size() > WORKSPACE_MAX_BYTES:
        return like.new_empty(shape)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (role, like.dtype, torch.is_inference_mode_enabled())  # inference tensors apart
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


# --------------------------------------------------------------------------------------------
# the entry points
# --------------------------------------------------------------------------------------------

def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:
        return False


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_cpu_enabled()


def should_use(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether linear/linear_gelu/linear_add of this module should serve x @ weight.T (+ bias).

    True for plain CPU tensors, x 2-D (rows, K), weight (N, K), no autograd graph to record (grad
    mode off, or nothing requires grad), fp32 throughout (or bf16 throughout on a CPU with native
    bf16), outside torch.compile tracing and CPU autocast (their own rewrites apply there).
    """
    if not _enabled or _compiling():
        return False
    if type(x) is not torch.Tensor or not isinstance(weight, torch.Tensor):
        return False  # tensor subclasses (fake, functional, DTensor) keep their own dispatch
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.layout != torch.strided:
        return False
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return False
    if bias is not None and (bias.device.type != "cpu" or bias.shape != weight.shape[:1]):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if _autocast_on():
        return False
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if dtypes == {torch.float32}:
        return _private_ops_reason() is None or _bf16
    if dtypes == {torch.bfloat16}:
        return bf16_support()[0] and _private_ops_reason() is None
    return False


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.bfloat16 if (_bf16 and x.dtype == torch.float32) else x.dtype


def _fallback(x: Tensor, weight: Tensor, bias: Optional[Tensor], attr: str, algorithm: str,
              residual: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The public ops: F.linear (MKL) in the compute dtype, epilogue in fp32."""
    if dtype == x.dtype:
        w, b = weight, bias
    else:  # bf16 mode without oneDNN bf16: reuse a cached bf16 copy rather than convert per call
        w, b = _converted(weight, dtype), (bias.to(dtype) if bias is not None else None)
    y = F.linear(x.to(dtype), w, b)
    if attr != "none":
        y = _reference_epilogue(y.float(), attr, algorithm, residual.float() if residual is not None
                                else None)
    return y.to(x.dtype)


def _converted(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight in `dtype` (plain layout), from the cache when valid."""
    return _cached(weight, ("plain", dtype), lambda w: w.to(dtype).contiguous())


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], attr: str, algorithm: str,
         residual: Optional[Tensor]) -> Tensor:
    dtype = _compute_dtype(x)
    if x.shape[0] == 0:
        return _fallback(x, weight, bias, attr, algorithm, residual, dtype)
    if _variant_reason(attr, algorithm, dtype) is not None:
        if attr == "gelu" and _variant_reason("none", "", dtype) is None:
            return torch.ops.aten.gelu_(_run(x, weight, bias, "none", "", None),
                                        approximate=algorithm)
        return _fallback(x, weight, bias, attr, algorithm, residual, dtype)
    try:
        packed = _onednn_weight(weight, dtype, x.shape[0])
        b = bias.to(dtype) if bias is not None else None
        r = residual.to(dtype).contiguous() if residual is not None else None
        y = _onednn(x.to(dtype).contiguous(), packed, b, attr, algorithm, r)
    except Exception as e:  # the private op refused: remember, and take the public path from now on
        _disable_variant(attr, algorithm, dtype, e)
        return _fallback(x, weight, bias, attr, algorithm, residual, dtype)
    return y.to(x.dtype)


def _check(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
           residual: Optional[Tensor] = None) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' expected a Tensor, got {type(t).__name__}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: expected x (rows, K) and weight (N, K), got x {tuple(x.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} features but weight expects {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: argument 'bias' expected shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{op}: argument 'residual' expected shape "
                         f"({x.shape[0]}, {weight.shape[0]}), got {tuple(residual.shape)}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T + bias for x (rows, K), weight (N, K); callers check `should_use` first."""
    _check("fastbert.cpu.linear", x, weight, bias)
    return _run(x, weight, bias, "none", "", None)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                approximate: str = "none") -> Tensor:
    """gelu(x @ weight.T + bias), exact erf ("none") or tanh GELU, as F.gelu's `approximate`."""
    _check("fastbert.cpu.linear_gelu", x, weight, bias)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastbert.cpu.linear_gelu: argument 'approximate' expected 'none' or "
                         f"'tanh', got {approximate!r}")
    if not GELU_POST_OP:
        # in place on the GEMM's own fresh output: no second (rows, N) buffer
        return torch.ops.aten.gelu_(_run(x, weight, bias, "none", "", None),
                                    approximate=approximate)
    return _run(x, weight, bias, "gelu", approximate, None)


def linear_add(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    """x @ weight.T + bias + residual, the add fused into the GEMM as a oneDNN binary post-op."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"fastbert.cpu.linear_add: argument 'residual' expected a Tensor, "
                        f"got {type(residual).__name__}")
    _check("fastbert.cpu.linear_add", x, weight, bias, residual)
    if not RESIDUAL_POST_OP:
        return _run(x, weight, bias, "none", "", None).add_(residual)
    return _run(x, weight, bias, "add", "", residual)


def inference_routes(dtype: torch.dtype) -> Optional[Tuple[Callable, Callable]]:
    """(linear, linear_gelu) as this module computes them for CPU inputs of `dtype` that
    `should_use` accepts, resolved once for a caller that checks should_use's per-tensor
    conditions itself (fastbert/lean.py, once per model forward): for fp32 the oneDNN op itself
    (plain or, with PREPACK_FP32, prepacked weights), without the per-call checks; None where
    should_use refuses `dtype`."""
    if not _enabled or _compiling() or _autocast_on():
        return None
    if dtype == torch.float32:
        if _private_ops_reason() is not None and not _bf16:
            return None
    elif dtype != torch.bfloat16 or not (bf16_support()[0] and _private_ops_reason() is None):
        return None
    if (dtype == torch.float32 and not _bf16 and not GELU_POST_OP
            and _variant_reason("none", "", dtype) is None):
        return _fp32_linear, _fp32_linear_gelu
    return linear, linear_gelu


def _fp32_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """_run's oneDNN call for contiguous fp32 x with rows: fp32 weights as they are, or prepacked
    with PREPACK_FP32 (an inference tensor as it is): _onednn_weight's rule, inline because this
    runs once per projection."""
    try:
        w = weight if not PREPACK_FP32 or weight.is_inference() else \
            packed_weight(weight, torch.float32, x.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    except Exception as e:  # as in _run: remember, and take the public path from now on
        _disable_variant("none", "", torch.float32, e)
        return _fallback(x, weight, bias, "none", "", None, torch.float32)


def _fp32_linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      approximate: str) -> Tensor:
    return torch.ops.aten.gelu_(_fp32_linear(x, weight, bias), approximate=approximate)


def describe() -> str:
    """One line: which CPU inference path is active and why."""
    if not _enabled:
        return ("CPU inference GEMMs: F.linear (MKL); the oneDNN path is switched off "
                "(fastbert.cpu.set_enabled)")
    reason = _private_ops_reason()
    mode = "bf16" if _bf16 else "fp32"
    if reason is None:
        reason = _variant_reason("none", "", _compute_dtype(torch.empty(0)))
    if reason is not None:
        return f"CPU inference GEMMs ({mode}): F.linear (MKL), because {reason}"
    weights = "prepacked weights" if (PREPACK_FP32 or _bf16) else \
        "plain weights (fastbert.cpu.PREPACK_FP32 = True prepacks them: faster on AVX-512 CPUs)"
    gelu = "GELU as oneDNN post-op" if GELU_POST_OP else "GELU in place after the GEMM"
    add = "residual add as oneDNN post-op" if RESIDUAL_POST_OP else "residual add after the GEMM"
    ok, why = bf16_support()
    bf16 = ("bf16 mode on" if _bf16 else "bf16 mode available (fastbert.cpu.set_bf16(True))") \
        if ok else f"bf16 mode not offered: {why}"
    return (f"CPU inference GEMMs ({mode}): oneDNN inner product on {weights}, {gelu}, {add} "
            f"(choices measured on AVX2 and AVX-512 CPUs; no-grad CPU inputs only: training's "
            f"are fastbert.cpu_train's); {bf16}; {_wait_policy()}")


def _wait_policy() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    if policy:
        return f"OMP_WAIT_POLICY={policy}"
    return ("OpenMP workers spin-wait (OMP_WAIT_POLICY unset; on a CPU shared with other jobs "
            "set OMP_WAIT_POLICY=PASSIVE before starting Python)")
