"""The CUDA C++ backend: loads the extension fastbert._C (if it was built) and turns tensors into
data pointers, shapes, element strides, dtype codes and the current stream for it.

The extension does not include or link torch; every output is allocated here. It implements the
six entry points fixed in the docstring of fastbert/ops.py and ModernBERT's rotary and GeGLU ones
(fastbert/rotary.py, fastbert/geglu.py). Dropout runs inside the attention and
LayerNorm kernels with a counter-based RNG (Philox-4x32-10 keyed by `seed`, kernels/philox.cuh), so
backward regenerates forward's mask from the same seed; the masks differ from the Triton and torch
backends' masks (each backend is consistent with itself). The attention backward adds dQ with
fp32 atomics (one kernel over key blocks, then a conversion); `deterministic=True` (or
torch.use_deterministic_algorithms(True)) runs a separate dQ kernel instead, without atomics.
Attention also serves packed sequences (attention_varlen_*, the contract in fastbert/varlen.py)
and flash-attn's sliding window (`window=(left, right)`: only the key tiles a band reaches run).
Importing this module never raises: without the extension or a GPU, `unavailable_reason()` says why.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

try:
    from fastbert import _C
    _import_error: Optional[str] = None
except ImportError as e:  # not built (no nvcc at install time, or FASTBERT_BUILD_CUDA=0)
    _C = None
    _import_error = f"{type(e).__name__}: {e}"

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ATTENTION_HEAD_DIMS = (32, 64, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYER_NORM_MAX_HIDDEN = 4096  # the backward keeps 2 * hidden fp32 sums per row in shared memory


# --------------------------------------------------------------------------------------------
# what this backend can do here
# --------------------------------------------------------------------------------------------

def _built_archs() -> list:
    return [a for a in _C.archs.split(",") if a] if _C is not None else []


def _arch_runs_on(arch: str, capability: int) -> bool:
    """Can code built for CMake arch `arch` ("80", "90a", "80-real", ...) run on sm_<capability>?"""
    name, _, kind = arch.partition("-")
    if name.endswith("a"):  # arch-specific features: that exact GPU only
        return int(name[:-1]) == capability
    built = int(name)
    sass_fits = kind != "virtual" and built // 10 == capability // 10 and built <= capability
    ptx_fits = kind != "real" and built <= capability  # the driver JIT-compiles the PTX
    return sass_fits or ptx_fits


def extension_info() -> dict:
    """Whether fastbert._C was built, for which archs, against which CUDA (for fastbert.info)."""
    if _C is None:
        return {"built": False, "archs": [], "cuda_version": None, "error": _import_error}
    major, minor = divmod(int(_C.cuda_version), 1000)
    return {"built": True, "archs": _built_archs(), "cuda_version": f"{major}.{minor // 10}",
            "error": None}


def unavailable_reason() -> Optional[str]:
    """None when the extension can run here; otherwise why not."""
    if _C is None:
        return f"the CUDA extension fastbert._C is not built ({_import_error})"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    major, minor = torch.cuda.get_device_capability()
    capability = 10 * major + minor
    if not any(_arch_runs_on(a, capability) for a in _built_archs()):
        return (f"fastbert._C was built for archs {_C.archs}, which cannot run on this GPU "
                f"(sm_{capability}); reinstall with FASTBERT_CUDA_ARCHS including {capability}")
    device = torch.cuda.current_device()
    if device not in _probed:
        _probed[device] = _C.probe_device(device) or None
    if _probed[device] is not None:
        return (f"fastbert._C (CUDA {extension_info()['cuda_version']}) cannot run on this GPU: "
                f"{_probed[device]}")
    return None


_probed: dict = {}  # device index -> why the extension's kernels cannot load there, or None


def unsupported(op: str, **kw) -> Optional[str]:
    """Why these kernels cannot serve an input (None when they can)."""
    dtype = kw.get("dtype")
    if op in ("fastbert.attention", "fastbert.attention_varlen"):
        if dtype not in ATTENTION_DTYPES:
            return f"the CUDA attention kernels take float16, bfloat16 or float32, got {dtype}"
        if kw.get("head_dim") not in ATTENTION_HEAD_DIMS:
            return (f"the CUDA attention kernels support head dims {ATTENTION_HEAD_DIMS}, "
                    f"got {kw.get('head_dim')}")
        reason = _attention_smem_reason(kw["head_dim"], dtype)
        if reason is not None:
            return reason
    elif op == "fastbert.add_layer_norm":
        if dtype not in _DTYPE_CODES:
            return f"the CUDA LayerNorm kernels take float16, bfloat16 or float32, got {dtype}"
        if kw.get("hidden", 0) > LAYER_NORM_MAX_HIDDEN:
            return (f"the CUDA LayerNorm kernels support hidden sizes up to "
                    f"{LAYER_NORM_MAX_HIDDEN}, got {kw.get('hidden')}")
    elif op == "fastbert.linear_bias_gelu":
        if dtype not in _DTYPE_CODES:
            return f"the CUDA GELU kernels take float16, bfloat16 or float32, got {dtype}"
    elif op == "fastbert.linear_geglu":
        if dtype not in _DTYPE_CODES:
            return f"the CUDA GeGLU kernels take float16, bfloat16 or float32, got {dtype}"
        if kw.get("out_features", 0) < 2:
            return (f"the CUDA GeGLU kernels need out_features (the 2N rows of weight) "
                    f">= 2, got {kw.get('out_features')}")
    elif op == "fastbert.apply_rotary":
        if dtype not in _DTYPE_CODES:
            return f"the CUDA rotary kernel takes float16, bfloat16 or float32, got {dtype}"
    else:
        return f"unknown op {op!r}"
    return None


_smem_reasons: dict = {}  # (device, head dim, dtype) -> reason or None


def _attention_smem_reason(head_dim: int, dtype: torch.dtype) -> Optional[str]:
    """A GPU with less shared memory per block than a kernel asks for cannot run it."""
    if unavailable_reason() is not None:  # reported on its own
        return None
    device = torch.cuda.current_device()
    key = (device, head_dim, dtype)
    if key not in _smem_reasons:
        _C.set_device(device)
        need = _C.attention_smem_bytes(head_dim, _DTYPE_CODES[dtype])
        have = _C.max_smem_per_block()
        _smem_reasons[key] = None if need <= have else (
            f"head dim {head_dim} in {dtype} needs {need} bytes of shared memory per block, "
            f"this GPU allows {have}")
    return _smem_reasons[key]


# --------------------------------------------------------------------------------------------
# tensors -> pointers
# --------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> Tensor:
    """Every buffer the kernels write (tests poison these to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _ptr(t: Optional[Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


@contextlib.contextmanager
def _on_device(device: torch.device):
    """torch's current device and the extension's (its CUDA runtime is linked statically and
    keeps its own current device) both set to the tensors' device."""
    with torch.cuda.device(device):
        _C.set_device(torch.cuda.current_device())
        yield


def _bshd_strides(t: Tensor) -> tuple:
    """(batch, row, head) element strides of (B, S, H, D), or (0, row, head) of (total, H, D).
    The stride of a size-1 dim is never used (its only index is 0) and may be anything."""
    lead = t.dim() - 3  # 1 for (B, S, H, D), 0 for (total, H, D)
    strides = tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(t.dim() - 1))
    return (0,) * (1 - lead) + strides


def _vector_ready(t: Tensor) -> Tensor:
    """The attention kernels load 16-byte vectors: 16-byte aligned rows (copy only if not)."""
    elem = t.element_size()
    aligned = t.data_ptr() % 16 == 0 and all(s * elem % 16 == 0 for s in _bshd_strides(t))
    return t if aligned and t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _deterministic(requested: bool) -> bool:
    return bool(requested) or torch.are_deterministic_algorithms_enabled()


def _require_extension(op: str) -> None:
    if _C is None:
        raise RuntimeError(f"{op}: {unavailable_reason()}")


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

def _dq_accumulator(deterministic: bool, dq: Tensor) -> Optional[Tensor]:
    """The fp32 buffer the atomic dQ path adds into, zeroed by the delta kernel (None: the
    deterministic dQ kernel): an fp32 dq is its own accumulator."""
    if _deterministic(deterministic):
        return None
    return dq if dq.dtype == torch.float32 else _empty(dq.shape, torch.float32, dq.device)


def attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, window=(-1, -1)):
    op = "fastbert.attention"
    _require_extension(op)
    b, sq, h, d = q.shape
    q, k, v = (_vector_ready(t) for t in (q, k, v))
    out = _empty((b, sq, h, d), q.dtype, q.device)
    lse = _empty((b, h, sq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    with _on_device(q.device):
        _C.attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(mask), out.data_ptr(),
                             lse.data_ptr(), b, sq, k.shape[1], h, d, _bshd_strides(q),
                             _bshd_strides(k), _bshd_strides(v), _bshd_strides(out),
                             bool(causal), *window, float(scale), float(dropout_p), int(seed),
                             _DTYPE_CODES[q.dtype], _stream(q))
    return out, lse


def attention_backward(dout, q, k, v, out, lse, mask, causal, dropout_p, scale, seed,
                       deterministic, window=(-1, -1)):
    op = "fastbert.attention"
    _require_extension(op)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    dout, q, k, v, out = (_vector_ready(t) for t in (dout, q, k, v, out))
    dq = _empty((b, sq, h, d), q.dtype, q.device)
    dk = _empty((b, sk, h, d), q.dtype, q.device)
    dv = _empty((b, sk, h, d), q.dtype, q.device)
    delta = _empty((b, h, sq), torch.float32, q.device)
    acc = _dq_accumulator(deterministic, dq)
    if b == 0 or h == 0:
        return dq, dk, dv
    with _on_device(q.device):
        _C.attention_backward(dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                              out.data_ptr(), lse.contiguous().data_ptr(), _ptr(mask),
                              dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr(),
                              _ptr(acc), b, sq, sk, h, d, _bshd_strides(dout), _bshd_strides(q),
                              _bshd_strides(k), _bshd_strides(v), _bshd_strides(out),
                              _bshd_strides(dq), _bshd_strides(dk), _bshd_strides(dv),
                              bool(causal), *window, float(scale), float(dropout_p), int(seed),
                              _DTYPE_CODES[q.dtype], _stream(q))
    return dq, dk, dv


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal, dropout_p, scale, seed, window=(-1, -1)):
    op = "fastbert.attention_varlen"
    _require_extension(op)
    total_q, h, d = q.shape
    batch = cu_seqlens_q.numel() - 1
    q, k, v = (_vector_ready(t) for t in (q, k, v))
    out = _empty((total_q, h, d), q.dtype, q.device)
    lse = _empty((h, total_q), torch.float32, q.device)
    if out.numel() == 0 or batch == 0:
        return out, lse
    with _on_device(q.device):
        _C.attention_varlen_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(),
                                    out.data_ptr(), lse.data_ptr(), batch, total_q,
                                    int(max_seqlen_q), int(max_seqlen_k), h, d, _bshd_strides(q),
                                    _bshd_strides(k), _bshd_strides(v), _bshd_strides(out),
                                    bool(causal), *window, float(scale), float(dropout_p),
                                    int(seed),
                                    _DTYPE_CODES[q.dtype], _stream(q))
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, dropout_p, scale, seed, deterministic,
                              window=(-1, -1)):
    op = "fastbert.attention_varlen"
    _require_extension(op)
    total_q, h, d = q.shape
    total_k = k.shape[0]
    batch = cu_seqlens_q.numel() - 1
    dout, q, k, v, out = (_vector_ready(t) for t in (dout, q, k, v, out))
    dq = _empty((total_q, h, d), q.dtype, q.device)
    dk = _empty((total_k, h, d), q.dtype, q.device)
    dv = _empty((total_k, h, d), q.dtype, q.device)
    delta = _empty((h, total_q), torch.float32, q.device)
    acc = _dq_accumulator(deterministic, dq)
    if batch == 0 or h == 0 or (total_q == 0 and total_k == 0):
        return dq, dk, dv
    with _on_device(q.device):
        _C.attention_varlen_backward(dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                     out.data_ptr(), lse.contiguous().data_ptr(),
                                     cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(),
                                     dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                     delta.data_ptr(), _ptr(acc), batch, total_q,
                                     int(max_seqlen_q), int(max_seqlen_k), h, d,
                                     _bshd_strides(dout), _bshd_strides(q), _bshd_strides(k),
                                     _bshd_strides(v), _bshd_strides(out), _bshd_strides(dq),
                                     _bshd_strides(dk), _bshd_strides(dv), bool(causal),
                                     *window, float(scale), float(dropout_p), int(seed),
                                     _DTYPE_CODES[q.dtype], _stream(q))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# residual add + LayerNorm
# --------------------------------------------------------------------------------------------

def _kernel_weight(x: Tensor, weight: Tensor) -> Tensor:
    # The kernels take weight/bias in x's dtype or in fp32; anything else goes through fp32.
    return weight if weight.dtype in (x.dtype, torch.float32) else weight.float()


def _one_dtype(dtype: torch.dtype, *tensors: Optional[Tensor]):
    """The kernels take x, residual, y and their gradients in one dtype: mixed inputs (autocast's
    bf16 x beside an fp32 residual) are cast to it here (a pass the Triton kernels do without)."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def add_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed, store_sum=False,
                           out_dtype=None):
    """(y, mean, rstd), and with store_sum the pre-norm sum dropout(x) + residual as a fourth
    (the kernel writes it from its fp32 sums in the same pass); both in out_dtype (x's if None)."""
    op = "fastbert.add_layer_norm"
    _require_extension(op)
    x, residual = _one_dtype(out_dtype or x.dtype, x, residual)
    rows, hidden = x.shape
    w, bias_k = _kernel_weight(x, weight), _kernel_weight(x, bias)
    y = _empty(x.shape, x.dtype, x.device)
    s = _empty(x.shape, x.dtype, x.device) if store_sum else None
    mean = _empty((rows,), torch.float32, x.device)
    rstd = _empty((rows,), torch.float32, x.device)
    with _on_device(x.device):
        _C.add_layer_norm_forward(x.data_ptr(), _ptr(residual), w.data_ptr(), bias_k.data_ptr(),
                                  y.data_ptr(), _ptr(s), mean.data_ptr(), rstd.data_ptr(), rows,
                                  hidden, float(eps), float(dropout_p), int(seed),
                                  _DTYPE_CODES[x.dtype], _DTYPE_CODES[w.dtype], _stream(x))
    return (y, mean, rstd, s) if store_sum else (y, mean, rstd)


def add_layer_norm_backward(dy, x, residual, weight, mean, rstd, dropout_p, seed, dsum=None):
    """dsum: the gradient reaching the pre-norm sum as an output (return_residual), or None.
    dx and dresidual in x's and residual's dtypes, dy (and dsum) in y's."""
    op = "fastbert.add_layer_norm"
    _require_extension(op)
    x_dtype, res_dtype = x.dtype, residual.dtype if residual is not None else None
    x, residual, dsum = _one_dtype(dy.dtype, x, residual, dsum)
    rows, hidden = x.shape
    w = _kernel_weight(x, weight)
    dx = _empty(x.shape, x.dtype, x.device)
    dres = _empty(x.shape, x.dtype, x.device) if residual is not None else None
    dweight = _empty((hidden,), w.dtype, x.device)
    dbias = _empty((hidden,), w.dtype, x.device)
    with _on_device(x.device):
        parts = _C.add_layer_norm_backward_parts(rows, hidden)
        partial = _empty((2, parts, hidden), torch.float32, x.device)
        _C.add_layer_norm_backward(dy.data_ptr(), _ptr(dsum), x.data_ptr(), _ptr(residual),
                                   w.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                                   _ptr(dres), partial.data_ptr(), dweight.data_ptr(),
                                   dbias.data_ptr(), rows, hidden, parts, float(dropout_p),
                                   int(seed), _DTYPE_CODES[x.dtype], _DTYPE_CODES[w.dtype],
                                   _stream(x))
    dx, dres = dx.to(x_dtype), dres.to(res_dtype) if dres is not None else None
    return dx, dres, dweight.to(weight.dtype), dbias.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# linear + bias + GELU: GEMMs in cuBLAS (through torch), bias/GELU epilogues in the extension
# --------------------------------------------------------------------------------------------

def linear_bias_gelu_forward(x, weight, bias, approximate):
    op = "fastbert.linear_bias_gelu"
    _require_extension(op)
    m, n = x.shape[0], weight.shape[0]
    pre = torch.matmul(x, weight.t())  # (M, N); the kernel adds the bias in place
    out = _empty(pre.shape, pre.dtype, pre.device)
    with _on_device(x.device):
        _C.bias_gelu_forward(pre.data_ptr(), bias.data_ptr(), pre.data_ptr(), out.data_ptr(), m,
                             n, approximate == "tanh", _DTYPE_CODES[x.dtype], _stream(x))
    return out, pre


def linear_bias_gelu_backward(dout, x, weight, pre, approximate):
    op = "fastbert.linear_bias_gelu"
    _require_extension(op)
    m, n = pre.shape
    dpre = _empty(pre.shape, pre.dtype, pre.device)
    dbias = _empty((n,), pre.dtype, pre.device)
    with _on_device(x.device):
        parts = _C.gelu_backward_parts(m, n)
        partial = _empty((parts, n), torch.float32, x.device)
        _C.gelu_backward(dout.data_ptr(), pre.data_ptr(), dpre.data_ptr(), partial.data_ptr(),
                         dbias.data_ptr(), m, n, parts, approximate == "tanh",
                         _DTYPE_CODES[pre.dtype], _stream(x))
    dx = torch.matmul(dpre, weight)
    dweight = dpre.t().matmul(x)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# ModernBERT: linear + GeGLU (GEMM in cuBLAS through torch, epilogues in the extension) and
# rotary embeddings
# --------------------------------------------------------------------------------------------

def linear_geglu_forward(x, weight, bias, approximate):
    op = "fastbert.linear_geglu"
    _require_extension(op)
    m, n = x.shape[0], weight.shape[0] // 2
    pre = torch.matmul(x, weight.t())  # (M, 2N) = [a | g]; the kernel adds the bias in place
    out = _empty((m, n), pre.dtype, pre.device)
    with _on_device(x.device):
        _C.geglu_forward(pre.data_ptr(), _ptr(bias), out.data_ptr(), m, n, approximate == "tanh",
                         _DTYPE_CODES[x.dtype], _stream(x))
    return out, pre


def linear_geglu_backward(dout, x, weight, pre, approximate):
    op = "fastbert.linear_geglu"
    _require_extension(op)
    m, n2 = pre.shape
    dpre = _empty(pre.shape, pre.dtype, pre.device)
    dbias = _empty((n2,), pre.dtype, pre.device)
    with _on_device(x.device):
        parts = _C.geglu_backward_parts(m, n2 // 2)
        partial = _empty((parts, n2), torch.float32, x.device)
        _C.geglu_backward(dout.data_ptr(), pre.data_ptr(), dpre.data_ptr(), partial.data_ptr(),
                          dbias.data_ptr(), m, n2 // 2, parts, approximate == "tanh",
                          _DTYPE_CODES[pre.dtype], _stream(x))
    dx = torch.matmul(dpre, weight)  # (M, 2N) @ (2N, K)
    dweight = dpre.t().matmul(x)
    return dx, dweight.to(weight.dtype), dbias.to(weight.dtype)


def apply_rotary(x, cos, sin, positions, interleaved, conjugate):
    """-> out, contiguous, x's shape and dtype. x (..., H, D) may be a strided view (q or k of a
    packed projection): the kernel takes its row and head strides."""
    op = "fastbert.apply_rotary"
    _require_extension(op)
    h, d = x.shape[-2], x.shape[-1]
    rows = x.reshape(-1, h, d)  # a view for q/k slices of a packed projection
    pos = positions.expand(x.shape[:-2]).reshape(-1).contiguous()
    # the kernel reads cos / sin in x's dtype or fp32; anything else goes through fp32
    if cos.dtype != sin.dtype or cos.dtype not in (x.dtype, torch.float32):
        cos, sin = cos.float(), sin.float()
    out = _empty(rows.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out.view(x.shape)
    # a size-1 dim's stride is never used; 0 keeps it from blocking the vectorised path
    row_stride, head_stride = (rows.stride(i) if rows.shape[i] > 1 else 0 for i in (0, 1))
    with _on_device(x.device):
        _C.apply_rotary(rows.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos.data_ptr(),
                        out.data_ptr(), rows.shape[0], h, d, cos.shape[1], cos.shape[0],
                        row_stride, head_stride, bool(interleaved), bool(conjugate),
                        _DTYPE_CODES[x.dtype], _DTYPE_CODES[cos.dtype], _stream(x))
    return out.view(x.shape)
