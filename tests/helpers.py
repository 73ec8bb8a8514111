"""Shared test utilities: the tolerance rule, padding-mask generators, poisoned outputs,
ahead-of-time compilation and the resources (registers, spills, stack) of compiled kernels."""
from __future__ import annotations

import inspect
import math
import os
import re

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


# --------------------------------------------------------------------------------------------
# resources of compiled kernels, read from the cubin with the tools Triton ships
# --------------------------------------------------------------------------------------------

def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary Triton ships (ptxas, cuobjdump, nvdisasm)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_path(capability: int) -> str:
    """The ptxas Triton itself runs for this target (3.9 uses its CUDA 13 `ptxas-blackwell` from
    sm_90 on; older releases one ptxas for all)."""
    from triton.backends.nvidia import compiler
    get_ptxas = getattr(compiler, "get_ptxas", None)
    if get_ptxas is None:
        return nvidia_tool("ptxas")
    tool = get_ptxas(capability) if inspect.signature(get_ptxas).parameters else get_ptxas()
    return tool.path


def ptxas_version(capability: int) -> str:
    import subprocess
    out = subprocess.run([ptxas_path(capability), "--version"], capture_output=True,
                         text=True).stdout
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else "unknown"


def cubin_resources(cubin: bytes) -> dict:
    """{"regs", "stack", "local", "static_shared"} per thread/block, from `cuobjdump -res-usage`."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert match, f"unexpected cuobjdump -res-usage output:\n{out}"
    regs, stack, shared, local = map(int, match.groups())
    return {"regs": regs, "stack": stack, "local": local, "static_shared": shared}


def ptxas_spills(ptx: str, capability: int) -> dict:
    """{"stack_frame", "spill_stores", "spill_loads"} in bytes from `ptxas -v` on the PTX, with the
    flags Triton's own ptxas call uses (-lineinfo, and --regAllocOptLevel=2 where ptxas takes it)."""
    import subprocess
    import tempfile
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [ptxas_path(capability), "-v", "-lineinfo", f"--gpu-name={arch}", src,
                "-o", os.path.join(tmp, "kernel.cubin")]
        run = subprocess.run(base[:1] + ["--regAllocOptLevel=2"] + base[1:],
                             capture_output=True, text=True)
        if run.returncode != 0:  # an older ptxas without the option
            run = subprocess.run(base, capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    assert match, f"unexpected ptxas -v output:\n{log}"
    frame, stores, loads = map(int, match.groups())
    return {"stack_frame": frame, "spill_stores": stores, "spill_loads": loads}


def resource_usage(compiled, capability: int) -> dict:
    """Registers, stack, local memory, spill bytes and shared memory of a triton.compile result.

    Spills live in local memory inside the stack frame, so a kernel with neither stack nor local
    memory has none and ptxas is not run again; otherwise its spill bytes come from `ptxas -v`."""
    usage = cubin_resources(compiled.asm["cubin"])
    usage["spill_stores"] = usage["spill_loads"] = 0
    if usage["stack"] or usage["local"]:
        spills = ptxas_spills(compiled.asm["ptx"], capability)
        usage["spill_stores"], usage["spill_loads"] = spills["spill_stores"], spills["spill_loads"]
    usage["shared"] = compiled.metadata.shared  # bytes per block, dynamic included
    return usage


def compile_resources(module: str, kernel: str, signature: dict, constexprs: dict,
                      capability: int, num_warps: int, num_stages: int, aligned=()) -> dict:
    """aot_compile `module.kernel` and return its resource_usage: a picklable, top-level entry
    point, so a process pool can compile variants in parallel."""
    import importlib
    fn = getattr(importlib.import_module(module), kernel)
    compiled = aot_compile(fn, signature, constexprs, capability, num_warps, num_stages,
                           aligned=aligned)
    return resource_usage(compiled, capability)


def check_mixed_dtype_layer_norm(backend, device="cpu", rows=19, hidden=96, dropout_p=0.0,
                                 seed=5, low=torch.bfloat16, pre_norm=False, factor=2.0):
    """A backend's add_layer_norm entry points on autocast's mixed inputs: x in `low` (a
    projection's output) beside an fp32 residual stream, y (and the pre-norm sum) asked in fp32.
    fp32 outputs and gradients match fp64 to fp32's precision (x's values are exact in fp32, so
    nothing is lost reading them as they are); dx, in x's dtype, by the tolerance rule against
    plain PyTorch's fp32 gradient rounded to it. Dropout's keep mask is read off the same
    backend on an all-ones x (the backends draw it from the seed)."""
    from fastbert import reference

    x = torch.randn(rows, hidden, device=device).to(low)
    residual = torch.randn(rows, hidden, device=device)
    weight = 1.0 + 0.5 * torch.randn(hidden, device=device)
    bias = 0.5 * torch.randn(hidden, device=device)
    dy, dsum = torch.randn(rows, hidden, device=device), torch.randn(rows, hidden, device=device)
    keep = None
    if dropout_p > 0.0:
        ones = torch.ones(rows, hidden, device=device)
        keep = backend.add_layer_norm_forward(ones, None, torch.ones_like(weight),
                                              torch.zeros_like(bias), 1e-5, dropout_p, seed)[0] > 0
    y, mean, rstd, *s = backend.add_layer_norm_forward(
        x, residual, weight, bias, 1e-5, dropout_p, seed, store_sum=pre_norm,
        out_dtype=torch.float32)
    grads = backend.add_layer_norm_backward(dy, x, residual, weight, mean, rstd, dropout_p, seed,
                                            dsum=dsum if pre_norm else None)
    assert y.dtype == mean.dtype == rstd.dtype == torch.float32 and y.shape == x.shape
    assert [g.dtype for g in grads] == [low] + [torch.float32] * 3

    d = [t.double() for t in (x, residual, weight, bias, dy)]
    ey, emean, erstd = reference.add_layer_norm_forward(*d[:4], 1e-5, dropout_p, keep)
    edx, edres, edw, edb = reference.add_layer_norm_backward(
        d[4], d[0], d[1], d[2], emean, erstd, dropout_p, keep,
        dsum=dsum.double() if pre_norm else None)
    close = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.double(), ey, **close)
    torch.testing.assert_close(rstd.double(), erstd, **close)
    if pre_norm:
        es = reference.prenorm_sum(d[0], d[1], dropout_p, keep, torch.float64)
        assert s[0].dtype == torch.float32
        torch.testing.assert_close(s[0].double(), es, **close)
    dx, dres, dw, db = grads
    torch.testing.assert_close(dres.double(), edres, **close)
    for name, got, want in (("dweight", dw, edw), ("dbias", db, edb)):
        torch.testing.assert_close(got.double(), want, rtol=2e-5,
                                   atol=2e-5 * max(1.0, want.abs().max().item()), msg=name)
    assert_close_by_rule(dx, edx.float().to(low), edx, "dx", factor=factor)


def check_out_of_band_tiles_are_never_read(backend, device, d, dtype, queries_cut, cut=320):
    """A backend module's attention_forward/backward with a window visits no key tile outside
    every band (a local layer costs O(S * window)). 40 queries against 400 keys, window (8, 8):
    the band (bottom-right aligned) holds keys 352..399 only, so keys 0..cut-1 (cut = 320: five
    64-key tiles, ten 32-key ones) are outside every band; with NaN there, a kernel that visited
    their tiles would spread it (P = 0 times NaN is NaN). Forward, dQ (deterministic) and dK/dV
    must equal bit for bit the kernels' results on the last 400 - cut keys alone, and the cut
    keys' dK, dV be 0. queries_cut: the mirror case (400 queries, 40 keys: queries 0..351 see
    nothing), NaN in q and dO rows 0..cut-1, for the dK/dV kernel's loop over query tiles;
    their out and dQ must be 0. cut: a multiple of the backend's tiles (a poisoned row in a
    tile with in-band rows gets NaN in its own dQ: P (dP - delta) is 0 * NaN)."""
    window, kept = (8, 8), 400 - cut
    sq, sk = (cut + kept, 40) if queries_cut else (40, cut + kept)
    q, k, v = (torch.randn(1, s, 2, d, dtype=dtype, device=device) for s in (sq, sk, sk))
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)

    def run(q, k, v, dout):
        out, lse = backend.attention_forward(q, k, v, None, False, 0.0, scale, 0, window=window)
        grads = backend.attention_backward(dout, q, k, v, out, lse, None, False, 0.0, scale, 0,
                                           True, window=window)
        atomic = backend.attention_backward(dout, q, k, v, out, lse, None, False, 0.0, scale, 0,
                                            False, window=window)
        assert torch.equal(grads[1], atomic[1]) and torch.equal(grads[2], atomic[2])
        assert not atomic[0].isnan().any()
        return (out, lse) + grads

    kept_inputs = ((q[:, cut:], k, v, dout[:, cut:]) if queries_cut else
                   (q, k[:, cut:], v[:, cut:], dout))
    want = run(*kept_inputs)
    poisoned = [t.clone() for t in (q, k, v, dout)]
    for t in (poisoned[0], poisoned[3]) if queries_cut else poisoned[1:3]:
        t[:, :cut] = float("nan")
    out, lse, dq, dk, dv = run(*poisoned)
    if queries_cut:
        assert (out[:, :cut] == 0).all() and (dq[:, :cut] == 0).all()
        assert (lse[..., :cut] == float("inf")).all()
        got = (out[:, cut:], lse[..., cut:], dq[:, cut:], dk, dv)
    else:
        assert (dk[:, :cut] == 0).all() and (dv[:, :cut] == 0).all()
        got = (out, lse, dq, dk[:, cut:], dv[:, cut:])
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name
