"""fastbert's own fp32 CPU attention, forward and backward (the extension fastbert._cpu,
csrc/cpu/): packed variable-length sequences, and padded batches with a key-padding mask, with
flash-attn's sliding window and causal mask: the torch backend's attention_varlen and attention
on CPU wherever they apply.

ATen's fused CPU attention runs its tiles on MKL's sgemm, which on AMD CPUs takes half-rate code
paths (F.linear's own GEMMs there reach half of oneDNN's); its banded form also needs the keys
copied into per-block spans, and its backward scatters packed tokens into a padded grid. This
kernel (FlashAttention-2's loops: 32 query rows per task, S^T and O in per-thread tiles, the
online softmax) reads q, k and v in place, visits only the keys a row block can see,
and keeps its tiles in AVX-512 or AVX2+FMA registers, chosen at run time, threaded by OpenMP:
built with -fopenmp, it binds to the libgomp torch has already loaded, so it runs on torch's
thread team (torch.get_num_threads() threads) and no team spins against another. Its backward
recomputes the softmax from the forward's lse (so forward and backward both run here or both on
ATen: `serves` decides on attributes both calls see alike) in key tasks (dK, dV) and query tasks
(dQ), no atomics. A decoding step's 1-3 query rows run one at a time, keys along the lanes.
Measured on a Zen 5 CPU, 2 threads, interleaved with ATen's path: benchmarks/README.md.

    from fastbert import cpu_attention
    if cpu_attention.serves(q, k, v):  # q, k, v (T, H, D) fp32 on CPU
        out, lse = cpu_attention.varlen_forward(q, k, v, cu_q, cu_k, causal, scale, window,
                                                dropout_p, seed)
        dq, dk, dv = cpu_attention.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal,
                                                   scale, window, dropout_p, seed)
    if cpu_attention.serves(q, k, v):  # q (B, Sq, H, D), k, v (B, Sk, H, D)
        out, lse = cpu_attention.padded_forward(q, k, v, key_padding_mask, causal, scale, window,
                                                dropout_p, seed)

The output contracts are attention_varlen's (out (T, H, D), lse (H, T) fp32) and attention's
(out (B, Sq, H, D), lse (B, H, Sq)): zeros and lse = +inf for a query that sees no key, zero
gradients for it and for padding keys. A padded batch's padding keys before a row's first real
key and after its last are never visited. Dropout drops a probability where a hash of (seed,
sequence, head, query, key) falls below dropout_p's share of 2^32 (MurmurHash3's finaliser), so
the backward, given the forward's seed, drops the same ones; torch.manual_seed reproduces it (the
op draws the seed from torch's generator). It serves head_dim a multiple of the vector width (16
or 8 floats) up to 256; fp16/bf16 (ATen's brgemm serves those) stay on ATen's fused attention.
Without the extension (not built: no C++ compiler, not x86-64, FASTBERT_BUILD_CPU=0) or the
ISA, `reason()` says why and the ATen paths serve as before. `set_enabled(False)` switches it
off (between steps: a backward follows its forward's path only if the switch stays put). No
double backward (create_graph=True through it raises, as ATen's fused attention does).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

try:
    from fastbert import _cpu
    _import_error: Optional[str] = None
except ImportError as e:
    _cpu = None
    _import_error = f"{type(e).__name__}: {e}"

MAX_HEAD_DIM = 256
_enabled = True
_WIDTH = _cpu.vector_width() if _cpu is not None else 0


def set_enabled(enabled: bool) -> None:
    """Switch the kernel on or off for this process (off: ATen's fused attention serves)."""
    global _enabled
    _enabled = bool(enabled)


class _ThreadState(threading.local):
    suspended = 0  # > 0 inside `suspended()` on this thread


_state = _ThreadState()


@contextlib.contextmanager
def suspended():
    """The kernels of fastbert._cpu (this one and fastbert.cpu_layer_norm's) off for the
    forwards inside, on this thread. The public ops run their autograd.Function under it while
    a torch.func transform is active: functorch runs that Function's forward on unwrapped
    tensors (a kernel could serve them) but its backward on wrapped ones (it cannot:
    `serves_backward`), and a backward on ATen's path after a forward on a kernel would draw
    another dropout mask."""
    _state.suspended += 1
    try:
        yield
    finally:
        _state.suspended -= 1


def use_isa(name: str) -> None:
    """Run the kernel with instruction set `name` ("avx512", "avx2"; "" for the best this CPU
    has): tests reach the AVX2 kernel on an AVX-512 CPU this way."""
    global _WIDTH
    _cpu.set_isa(name)
    _WIDTH = _cpu.vector_width()


def extension_reason() -> Optional[str]:
    """Why no kernel of fastbert._cpu (attention, fastbert.cpu_layer_norm's) can run here, or
    None."""
    if _cpu is None:
        return f"the extension fastbert._cpu is not built ({_import_error})"
    if _WIDTH == 0:
        return "this CPU has neither AVX-512 nor AVX2 with FMA"
    return None


def reason() -> Optional[str]:
    """Why the kernel cannot serve at all here, or None."""
    why = extension_reason()
    if why is not None:
        return why
    if not _enabled:
        return "switched off (fastbert.cpu_attention.set_enabled(False))"
    return None


def describe() -> str:
    why = reason()
    return (f"fastbert's CPU attention kernel ({_cpu.isa()}, fp32, head_dim a multiple of "
            f"{_WIDTH} up to {MAX_HEAD_DIM})" if why is None else f"ATen's fused attention ({why})")


def takes(x: Tensor) -> bool:
    """Whether the kernel serves attention on q, k, v like x (its device, dtype, head dim),
    before their layout is known."""
    d = x.shape[-1]
    return (_enabled and not _state.suspended and _WIDTH != 0 and x.device.type == "cpu"
            and x.dtype == torch.float32 and d % _WIDTH == 0 and d <= MAX_HEAD_DIM)


def serves(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the varlen (q, k, v (T, H, D)) or padded (q (B, Sq, H, D), k and v (B, Sk, H, D))
    kernels take these inputs: `takes`, plain CPU fp32 tensors of one head count and head dim
    (and one batch). A backward asks with the tensors its forward saved, so both agree (the
    backward recomputes its forward's softmax from lse). Beyond `takes`, attribute reads only:
    this runs once per attention call."""
    ndim = q.ndim
    if (not takes(q) or forward_ad._current_level >= 0  # no dual tensors
            or ndim not in (3, 4) or v.shape[:-2] != k.shape[:-2]
            or (ndim == 4 and k.shape[0] != q.shape[0])):
        return False
    for t in (q, k, v):
        if (t.__class__ is not Tensor or t.ndim != ndim
                or t.device.type != "cpu" or t.dtype != torch.float32
                or t.shape[-2:] != q.shape[-2:]):
            return False
    return not _functorch_active()  # torch.func's wrapped tensors have no data pointer


_functorch_active = torch._C._are_functorch_transforms_active
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_SEED_BITS = (1 << 64) - 1


def serves_backward(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the backward of an attention call on these (saved) tensors runs on the kernel:
    `serves`, and q not a functorch wrapper (torch.func.vjp's backward runs after its transform
    has exited, on the dead wrappers of a forward that ran under `suspended()`)."""
    return serves(q, k, v) and not _functorch_wrapped(q)


def _bounds(window: Tuple[int, int], causal: bool, reach: int) -> Tuple[int, int]:
    """flash-attn's (left, right) with causal folded in (right <= 0), and a bound of `reach` or
    more (it bounds nothing) made unbounded, so the kernel's lane arithmetic stays in int32."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return (-1 if left >= reach else left), (-1 if right >= reach else right)


def _flat_features(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """The tensors, copied (and held until the kernel returns) where a head's features are not
    contiguous: the kernel reads each head's row as one run."""
    if any(t.stride(-1) != 1 for t in tensors):
        return tuple(t.contiguous() for t in tensors)
    return tensors


def _offsets(op: str, cu_q: Tensor, cu_k: Tensor) -> Tuple[Tensor, Tensor]:
    offsets_q = cu_q.to(torch.int64).contiguous()  # tiny; the kernel reads int64
    offsets_k = offsets_q if cu_k is cu_q else cu_k.to(torch.int64).contiguous()
    if offsets_k.shape != offsets_q.shape:
        raise ValueError(f"fastbert.cpu_attention.{op}: cu_seqlens_k expected "
                         f"{tuple(offsets_q.shape)} entries like cu_seqlens_q, got "
                         f"{tuple(offsets_k.shape)}")
    return offsets_q, offsets_k


def _mask(op: str, key_padding_mask: Optional[Tensor], batch: int, sk: int) -> Optional[Tensor]:
    """The (B, Sk) bool mask with its keys contiguous (a copy if not: the caller holds it while
    the kernel reads it), or None."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (batch, sk):
        raise ValueError(f"fastbert.cpu_attention.{op}: key_padding_mask expected a ({batch}, "
                         f"{sk}) bool tensor, got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")
    return key_padding_mask if key_padding_mask.stride(1) == 1 else key_padding_mask.contiguous()


def _mask_args(mask: Optional[Tensor]) -> Tuple[int, int]:
    """(address, row stride) of _mask's result for the kernel, (0, 0) for none."""
    return (0, 0) if mask is None else (mask.data_ptr(), mask.stride(0))


def _backward_inputs(op: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                     lse_shape) -> Tensor:
    """lse contiguous (held by the caller while the kernel reads it), after checking that dout
    and lse have the shapes the kernel will read (it trusts them: no read past their ends)."""
    if dout.shape != q.shape or tuple(lse.shape) != tuple(lse_shape) or \
            dout.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"fastbert.cpu_attention.{op}: expected fp32 dout {tuple(q.shape)} and "
                         f"lse {tuple(lse_shape)}, got {dout.dtype} {tuple(dout.shape)} and "
                         f"{lse.dtype} {tuple(lse.shape)}")
    # backward(create_graph=True) would want a graph through the C++ kernel: none is recorded
    if torch.is_grad_enabled() and (dout.requires_grad or q.requires_grad or k.requires_grad
                                    or v.requires_grad):
        raise NotImplementedError(
            f"fastbert.cpu_attention.{op}: a double backward through fastbert's CPU attention "
            f"kernel is not implemented (fastbert.cpu_attention.set_enabled(False) switches it "
            f"off; ATen's fused CPU attention does not have one either)")
    return lse.contiguous()


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, causal: bool,
                   scale: float, window: Tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                   seed: int = 0) -> Tuple[Tensor, Tensor]:
    """attention_varlen's forward on inputs `serves` took: (out (T, H, D), lse (H, T) fp32).
    window: flash-attn's (left, right), -1 unbounded; causal bounds right at 0. dropout_p on the
    probabilities, its mask a hash of (seed, sequence, head, query, key): backward, given the
    same seed, drops the same elements."""
    total, heads, dim = q.shape
    left, right = _bounds(window, causal, total + k.shape[0])
    q, k, v = _flat_features(q, k, v)
    out = torch.empty(total, heads, dim, dtype=torch.float32, device="cpu")
    lse = torch.empty(heads, total, dtype=torch.float32, device="cpu")
    offsets_q, offsets_k = _offsets("varlen_forward", cu_q, cu_k)
    _cpu.attention_varlen_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        offsets_q.data_ptr(), offsets_k.data_ptr(), offsets_q.shape[0] - 1, total, k.shape[0],
        heads, dim, q.stride()[:2], k.stride()[:2], v.stride()[:2], scale, left, right,
        dropout_p, seed & _SEED_BITS, torch.get_num_threads())
    return out, lse


def varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    cu_q: Tensor, cu_k: Tensor, causal: bool, scale: float,
                    window: Tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                    seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """varlen_forward's backward: (dq, dk, dv), each like its input, contiguous. lse is the
    forward's (its softmax is recomputed from it, as FlashAttention's backward does)."""
    total, heads, dim = q.shape
    lse = _backward_inputs("varlen_backward", dout, q, k, v, lse, (heads, total))
    left, right = _bounds(window, causal, total + k.shape[0])
    dout, q, k, v = _flat_features(dout, q, k, v)
    delta = (dout * out).sum(-1).t().contiguous()  # (H, T): rowsum(dO * O)
    dq = torch.empty(total, heads, dim, dtype=torch.float32, device="cpu")
    dk = torch.empty(k.shape[0], heads, dim, dtype=torch.float32, device="cpu")
    dv = torch.empty(k.shape[0], heads, dim, dtype=torch.float32, device="cpu")
    offsets_q, offsets_k = _offsets("varlen_backward", cu_q, cu_k)
    _cpu.attention_varlen_backward(
        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), lse.data_ptr(),
        delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), offsets_q.data_ptr(),
        offsets_k.data_ptr(), offsets_q.shape[0] - 1, total, k.shape[0], heads, dim,
        dout.stride()[:2], q.stride()[:2], k.stride()[:2], v.stride()[:2], scale, left, right,
        dropout_p, seed & _SEED_BITS, torch.get_num_threads())
    return dq, dk, dv


def padded_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                   causal: bool, scale: float, window: Tuple[int, int] = (-1, -1),
                   dropout_p: float = 0.0, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """attention's forward on inputs `serves` took: q (B, Sq, H, D), k and v (B, Sk, H, D),
    key_padding_mask (B, Sk) bool (True = a real key) or None -> (out (B, Sq, H, D),
    lse (B, H, Sq) fp32). Query i's diagonal is key i + Sk - Sq (bottom-right, as attention's)."""
    batch, sq, heads, dim = q.shape
    sk = k.shape[1]
    left, right = _bounds(window, causal, sq + sk)
    q, k, v = _flat_features(q, k, v)
    mask = _mask("padded_forward", key_padding_mask, batch, sk)
    out = torch.empty(batch, sq, heads, dim, dtype=torch.float32, device="cpu")
    lse = torch.empty(batch, heads, sq, dtype=torch.float32, device="cpu")
    _cpu.attention_padded_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        *_mask_args(mask), batch, sq, sk, heads, dim, q.stride()[:3], k.stride()[:3],
        v.stride()[:3], scale, left, right, dropout_p, seed & _SEED_BITS, torch.get_num_threads())
    return out, lse


def padded_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    key_padding_mask: Optional[Tensor], causal: bool, scale: float,
                    window: Tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
                    seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """padded_forward's backward: (dq, dk, dv), each like its input, contiguous; padding keys get
    zero gradients."""
    batch, sq, heads, dim = q.shape
    sk = k.shape[1]
    lse = _backward_inputs("padded_backward", dout, q, k, v, lse, (batch, heads, sq))
    left, right = _bounds(window, causal, sq + sk)
    dout, q, k, v = _flat_features(dout, q, k, v)
    mask = _mask("padded_backward", key_padding_mask, batch, sk)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()  # (B, H, Sq): rowsum(dO * O)
    dq = torch.empty(batch, sq, heads, dim, dtype=torch.float32, device="cpu")
    dk = torch.zeros(batch, sk, heads, dim, dtype=torch.float32, device="cpu")
    dv = torch.zeros(batch, sk, heads, dim, dtype=torch.float32, device="cpu")
    _cpu.attention_padded_backward(
        dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), lse.data_ptr(),
        delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), *_mask_args(mask), batch,
        sq, sk, heads, dim, dout.stride()[:3], q.stride()[:3], k.stride()[:3], v.stride()[:3],
        scale, left, right, dropout_p, seed & _SEED_BITS, torch.get_num_threads())
    return dq, dk, dv
