"""Shared test utilities: the tolerance rule, padding-mask generators, poisoned outputs."""
from __future__ import annotations

import inspect
import os

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Small absolute floor per dtype: the error a single rounding of the output can add.
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def assert_close_by_rule(kernel: Tensor, plain: Tensor, exact: Tensor, name: str = "",
                         factor: float = 2.0, floor: float | None = None) -> None:
    """FlashAttention's rule: |kernel - exact| <= factor * |plain - exact| + floor (max norms).

    `kernel` is the op under test, `plain` the same math in plain PyTorch in the same dtype, and
    `exact` an fp64 (or fp32) reference. The kernel may not be more than `factor` times worse than
    what PyTorch itself achieves in that dtype.
    """
    exact = exact.double()
    err_kernel = (kernel.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    if floor is None:
        floor = FLOOR[kernel.dtype]
    bound = factor * err_plain + floor
    assert not torch.isnan(kernel).any(), f"{name}: NaN in kernel output"
    assert err_kernel <= bound, (f"{name}: kernel error {err_kernel:.3e} > {factor} x plain error "
                                 f"{err_plain:.3e} + floor {floor:.1e}")


def assert_fp32_close(kernel: Tensor, exact: Tensor, name: str = "", rtol: float = 1e-5,
                      atol: float = 1e-5) -> None:
    """fp32 kernels must match the reference to ~1e-5 relative."""
    torch.testing.assert_close(kernel.double(), exact.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


def random_padding_mask(batch: int, seqlen: int, device="cpu", mode: str = "random",
                        generator: torch.Generator | None = None) -> Tensor:
    """(B, S) bool, True = real token. Modes: "full" (no padding), "random" (lengths uniform in
    [1, S]), "third" (lengths in [S/3, S]), "with_empty" (random, and row 0 fully padded)."""
    if mode == "full":
        return torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    low = 1 if mode in ("random", "with_empty") else max(1, seqlen // 3)
    lengths = torch.randint(low, seqlen + 1, (batch,), generator=generator)
    mask = torch.arange(seqlen).unsqueeze(0) < lengths.unsqueeze(1)
    if mode == "with_empty":
        mask[0] = False
    return mask.to(device)


def poison_(t: Tensor) -> Tensor:
    """Fill with NaN so elements a kernel forgets to write show up."""
    return t.fill_(float("nan"))


def rule_factor(dtype: torch.dtype) -> float:
    """The tolerance rule's factor. The interpreter converts fp32 -> bf16 by truncation (measured
    on triton 3.9: up to 1 ulp, twice a rounding's 0.5 ulp), so bf16 outputs get twice the usual
    factor under TRITON_INTERPRET=1; compiled kernels round to nearest and keep the factor 2."""
    return 4.0 if INTERPRET and dtype == torch.bfloat16 else 2.0


def pointers(signature: dict) -> list:
    """The pointer arguments of a Triton signature."""
    return [name for name, ty in signature.items() if ty.startswith("*")]


def aot_compile(kernel, signature: dict, constexprs: dict, capability: int, num_warps: int,
                num_stages: int = 3, aligned=()):
    """Compile a Triton kernel for CUDA sm_<capability> without a GPU; raises on a compile error.

    `signature` maps runtime argument names to Triton types ("*fp16", "i32", ...), `constexprs`
    the constexpr names to values. Triton >= 3.3 (3.6 and 3.9 included) takes both by name, with
    constexprs also listed in the signature as "constexpr"; older releases keyed them by index.
    `aligned` names the arguments declared divisible by 16, as Triton's launcher specialises
    pointers and integers on a GPU, so the variant compiled is the one that really runs there.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuned kernel wraps it
        fn = fn.fn
    index = fn.arg_names.index
    attrs = {(index(name),): [["tt.divisibility", 16]] for name in aligned}
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        full = dict(signature, **{name: "constexpr" for name in constexprs})
        src = ASTSource(fn, full, constexprs=constexprs, attrs=attrs)
    else:
        src = ASTSource(fn, {index(k): v for k, v in signature.items()}, attrs=attrs,
                        constants={index(k): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    # The attrs format has changed across Triton releases; an ignored one would silently compile
    # the unaligned variant instead of the one a GPU launches.
    annotated = compiled.asm["ttir"].count("tt.divisibility = 16")
    assert annotated == len(aligned), (
        f"{fn.__name__}: {annotated} of {len(aligned)} alignment attributes reached the TTIR")
    return compiled
