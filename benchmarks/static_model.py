"""Static performance model of the Triton kernels (issue 21): what each kernel the model launches
costs on an H100 (sm_90a) or A100 (sm_80), read from its compiled code, no GPU needed.

The kernels are the compile tier's variants (tests/test_resources.py: the launchers' own tiles and
flags) at BERT-base shapes; each is compiled (Triton's on-disk cache serves the compile tier's
builds) and its SASS read with the cuobjdump Triton ships. Per kernel:

- registers, spill bytes, shared memory, and occupancy (CTAs and warps per SM, from registers,
  shared memory and warps);
- the main loop (the shortest loop holding MMAs, else the longest loop): its
  static instruction count per iteration (a branch-skipped path or a retry loop inside it counts
  once), the MMA work it issues against the useful FLOPs of its tile (HMMA.16816 = 4096 FLOP per
  warp; HGMMA.64xNxK = 2*64*N*K per warpgroup), and warp-instructions per useful kFLOP
  (instructions x warps / kFLOP: the issue cost of the tensor-core work); the same for the
  next-shortest loop holding MMAs (the attention forward with a key mask: the tiles of a mask
  with holes, which check the mask alone);
- memory-bound kernels (LayerNorm, dGELU, delta, mask ranges): issue clocks per unit of work (a
  row, a tile; instructions x warps / 4 schedulers) against the DRAM clocks that unit's bytes take
  (bytes / DRAM bytes per SM-clock): at or below 1 the kernel can run at the memory roofline;
- linear+GELU: the epilogue after the K loop, in issue clocks per CTA, against the MMA clocks of
  its K loop at K = hidden (the first FFN GEMM), and how much of it is exposed: with 2 or more
  CTAs per SM one CTA's epilogue issues in the slots another CTA's K loop leaves free (its MMA
  clocks less its own issue clocks), so only what exceeds them is exposed; with 1 CTA, all of it.

Machine constants per SM and clock: H100 SXM 4096 dense fp16/bf16 FLOP, 3.35 TB/s / 132 SMs /
1.83 GHz = 13.9 DRAM bytes; A100 SXM 2048 FLOP, 2.04 TB/s / 108 / 1.41 GHz = 13.4 bytes; both 4
warp-instructions, 64 warps, 32 CTAs, 64 K registers; 228 KB (sm_90) / 164 KB (sm_80) shared.

    python -m benchmarks.static_model            # print the table (markdown)
    python -m benchmarks.static_model --readme   # rewrite benchmarks/README.md's copy
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

MACHINES = {  # capability: (MMA FLOP, DRAM bytes, shared bytes) per SM (and clock)
    90: (4096, 3.35e12 / 132 / 1.83e9, 228 * 1024),
    80: (2048, 2.039e12 / 108 / 1.41e9, 164 * 1024),
}
SCHEDULERS, MAX_WARPS, MAX_CTAS, REGISTERS = 4, 64, 32, 65536
MODEL = "base"  # BERT-base: hidden 768, head dim 64, FFN 3072


@dataclasses.dataclass
class Sass:
    """The instructions of one kernel: (address, opcode line) in order."""
    lines: list

    @classmethod
    def parse(cls, text: str) -> "Sass":
        found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)
        return cls([(int(address, 16), code.strip()) for address, code in found])

    def loops(self) -> list:
        """(first, last) instruction index of every backward branch's loop, outermost first."""
        index = {address: i for i, (address, _) in enumerate(self.lines)}
        loops = []
        for i, (address, code) in enumerate(self.lines):
            match = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", code)
            if match and int(match.group(1), 16) < address:  # the trap's self-branch is not
                loops.append((index[int(match.group(1), 16)], i))
        return sorted(loops, key=lambda loop: loop[0] - loop[1])

    def end(self) -> int:
        """Index one past the last EXIT (the trap and alignment NOPs after it never issue)."""
        return max(i for i, (_, code) in enumerate(self.lines) if re.search(r"\bEXIT\b", code)) + 1

    def mma_loops(self) -> list:
        """Every loop holding MMAs, shortest first."""
        return [loop for loop in reversed(self.loops()) if self.mma_flops(*loop)]

    def main_loop(self) -> Optional[tuple]:
        """The shortest loop holding MMAs (a kernel that splits full tiles from the boundary tile
        runs the leaner loop all but once), else the longest loop, else None."""
        loops, with_mma = self.loops(), self.mma_loops()
        return with_mma[0] if with_mma else loops[0] if loops else None

    def mma_flops(self, first: int, last: int, warps: int = 4) -> int:
        """FLOPs the MMA instructions in [first, last] issue per CTA (each warp runs the code)."""
        flops = 0
        for _, code in self.lines[first:last + 1]:
            if code.startswith("HMMA.16816"):
                flops += 2 * 16 * 8 * 16 * warps
            elif code.startswith("HMMA.1688"):
                flops += 2 * 16 * 8 * 8 * warps
            elif match := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", code):
                m, n, k = map(int, match.groups())
                flops += 2 * m * n * k * warps // 4  # one instruction per warpgroup
        return flops


def sass_of(cubin: bytes) -> str:
    from tests.helpers import nvidia_tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout


def compile_and_read(variant) -> tuple:
    """(resource usage, SASS text) of one tests.test_resources.Variant (a process-pool entry)."""
    import importlib

    from tests.helpers import aot_compile, resource_usage
    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    compiled = aot_compile(fn, dict(variant.signature), dict(variant.constexprs),
                           variant.capability, variant.num_warps, variant.num_stages,
                           variant.aligned)
    return resource_usage(compiled, variant.capability), sass_of(compiled.asm["cubin"])


# --------------------------------------------------------------------------------------------
# the work each kernel's unit does: useful FLOPs (MMA kernels) or DRAM bytes (memory-bound ones)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Work:
    unit: str  # what one main-loop iteration (the whole kernel where there is no loop) does
    flops: int = 0  # useful MMA FLOPs per unit
    dram_bytes: int = 0  # DRAM bytes per unit
    gemm_k: int = 0  # linear+GELU: the K its epilogue is weighed against


def work(kernel: str, constexprs: dict, element_size: int, shape, stream_size: int = 0) -> Work:
    """stream_size: the LayerNorm's residual, y and their gradients' element size where it is
    not x's (autocast's bf16 x beside the fp32 residual stream); element_size is x's."""
    c = constexprs
    stream_size = stream_size or element_size
    if kernel == "_attn_fwd_kernel":  # S = Q K^T, O += P V
        return Work("key tile", flops=4 * c["BLOCK_M"] * c["BLOCK_N"] * shape.head_dim)
    if kernel == "_attn_bwd_dkdv_kernel":  # S^T, dP^T, dV, dK (and the atomic dQ)
        products = 5 if c["DQ_ATOMIC"] else 4
        return Work("query tile", flops=2 * products * c["BLOCK_M"] * c["BLOCK_N"] * shape.head_dim)
    if kernel == "_attn_bwd_dq_kernel":  # S, dP, dQ
        return Work("key tile", flops=6 * c["BLOCK_M"] * c["BLOCK_N"] * shape.head_dim)
    if kernel == "_attn_bwd_preprocess_kernel":  # read O, dO; write delta
        return Work(f"{c['BLOCK_M']} queries",
                    dram_bytes=c["BLOCK_M"] * (2 * shape.head_dim * element_size + 4))
    if kernel == "_key_range_kernel":
        return Work(f"{c['BLOCK']} mask bytes", dram_bytes=c["BLOCK"])
    if kernel == "_add_layer_norm_fwd_kernel":  # x (+ residual) in, y (+ the sum) out, mean, rstd
        per_column = element_size + (1 + c["HAS_RESIDUAL"] + c.get("STORE_SUM", 0)) * stream_size
        return Work("row", dram_bytes=per_column * shape.hidden + 8)
    if kernel == "_add_layer_norm_bwd_kernel":  # dy, x (+ residual, dsum) in; dx (+ dresidual) out
        per_column = 2 * element_size + (1 + 2 * c["HAS_RESIDUAL"] + c.get("HAS_DSUM", 0)) \
            * stream_size
        return Work("row", dram_bytes=per_column * shape.hidden + 8)
    if kernel == "_gelu_bwd_dbias_kernel":  # dout, pre in; dpre out
        return Work(f"{c['BLOCK_M']}x{c['BLOCK_N']} tile",
                    dram_bytes=3 * c["BLOCK_M"] * c["BLOCK_N"] * element_size)
    if kernel == "_linear_bias_gelu_fwd_kernel":
        return Work("K step", flops=2 * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"],
                    gemm_k=shape.hidden)
    # a kernel the compile tier lists must say what its unit of work is, or the model would
    # silently leave it out
    raise KeyError(f"benchmarks/static_model.py: no work model for {kernel}; add it to work()")


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
    kernel: str
    what: str
    dtype: str
    capability: int
    regs: int
    spill_bytes: int
    shared: int
    ctas_per_sm: int
    occupancy: float  # warps per SM / 64
    unit: str
    loop_instructions: Optional[int]  # static instructions per main-loop iteration
    mma_issued_per_useful: Optional[float]
    warp_instructions_per_kflop: Optional[float]
    next_loop_warp_instructions_per_kflop: Optional[float]  # the next-shortest MMA loop
    issue_per_dram_clocks: Optional[float]  # memory-bound: issue clocks / DRAM clocks per unit
    issue_clocks: Optional[float]  # per unit (memory-bound) or per CTA (GEMM epilogue)
    dram_clocks: Optional[float]
    epilogue_clocks: Optional[float]  # linear+GELU: issue clocks per CTA after the K loop
    mma_clocks: Optional[float]  # linear+GELU: tensor-core clocks of its K loop per CTA
    epilogue_exposed_clocks: Optional[float]  # linear+GELU: epilogue clocks no K loop hides


def occupancy(regs: int, shared: int, warps: int, capability: int) -> tuple:
    """(CTAs per SM, warps per SM / 64): registers go by warp in 256-register units, and each
    CTA's shared memory carries 1 KB the driver reserves."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (REGISTERS // per_warp) // warps
    by_shared = MACHINES[capability][2] // (shared + 1024)
    ctas = min(by_regs, by_shared, MAX_WARPS // warps, MAX_CTAS)
    return ctas, ctas * warps / MAX_WARPS


def estimate(row, variant, usage: dict, sass_text: str, shape) -> Estimate:
    sass = Sass.parse(sass_text)
    constexprs = dict(variant.constexprs)
    # "bf16+fp32": x's dtype, then the residual stream's (autocast's LayerNorm rows)
    parts = row.dtype.split("+")
    element_size, stream_size = (4 if t == "fp32" else 2 for t in (parts[0], parts[-1]))
    job = work(row.kernel, constexprs, element_size, shape, stream_size)
    warps = variant.num_warps
    flop_rate, dram_rate, _ = MACHINES[row.capability]
    ctas, occ = occupancy(usage["regs"], usage["shared"], warps, row.capability)
    loop = sass.main_loop()
    first, last = loop if loop else (0, sass.end() - 1)
    count = last - first + 1
    values = dict(loop_instructions=count if loop else None, mma_issued_per_useful=None,
                  warp_instructions_per_kflop=None, next_loop_warp_instructions_per_kflop=None,
                  issue_per_dram_clocks=None,
                  issue_clocks=None, dram_clocks=None, epilogue_clocks=None, mma_clocks=None,
                  epilogue_exposed_clocks=None)
    if job.flops:
        values["mma_issued_per_useful"] = sass.mma_flops(first, last, warps) / job.flops
        values["warp_instructions_per_kflop"] = count * warps / (job.flops / 1000)
        mma_loops = sass.mma_loops()
        if len(mma_loops) > 1 and mma_loops[0] == loop:
            next_first, next_last = mma_loops[1]
            values["next_loop_warp_instructions_per_kflop"] = \
                (next_last - next_first + 1) * warps / (job.flops / 1000)
    if job.dram_bytes:
        issue, dram = count * warps / SCHEDULERS, job.dram_bytes / dram_rate
        values.update(issue_clocks=issue, dram_clocks=dram, issue_per_dram_clocks=issue / dram)
    if job.gemm_k:
        epilogue = sass.end() - (last + 1)
        values["epilogue_clocks"] = epilogue * warps / SCHEDULERS
        values["mma_clocks"] = (2 * constexprs["BLOCK_M"] * constexprs["BLOCK_N"] * job.gemm_k
                                / flop_rate)
        k_loop_issue = count * warps / SCHEDULERS * job.gemm_k / constexprs["BLOCK_K"]
        free = max(values["mma_clocks"] - k_loop_issue, 0.0) if ctas >= 2 else 0.0
        values["epilogue_exposed_clocks"] = max(values["epilogue_clocks"] - free, 0.0)
    return Estimate(row.kernel, row.what, row.dtype, row.capability, usage["regs"],
                    usage["spill_stores"] + usage["spill_loads"], usage["shared"], ctas, occ,
                    job.unit, **values)


def estimates(dtypes=("bf16", "fp16"), capabilities=(90, 80), model: str = MODEL,
              kernels: Optional[tuple] = None) -> list:
    """An Estimate for every variant `model` launches (of `kernels`, default all), in the compile
    tier's order."""
    from tests import test_resources as resources
    shape = resources.MODELS[model]
    chosen = []
    for family in resources.FAMILIES:
        for row, (variant, models) in resources.collect(family).items():
            if model in models and row.dtype in dtypes and row.capability in capabilities \
                    and (kernels is None or row.kernel in kernels):
                chosen.append((row, variant))
    variants = list(dict.fromkeys(variant for _, variant in chosen))
    workers = min(resources._workers(), len(variants))
    if workers > 1:
        import multiprocessing  # spawn, as the compile tier (torch's threads and fork)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            read = dict(zip(variants, pool.map(compile_and_read, variants)))
    else:
        read = {variant: compile_and_read(variant) for variant in variants}
    return [estimate(row, variant, *read[variant], shape) for row, variant in chosen]


def _number(value, digits=2) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def markdown_table(rows: list) -> str:
    lines = [
        "| kernel | variant | sm | regs | spill B | shared KB | CTAs/SM (occupancy) | unit | "
        "insns / iteration | MMA issued / useful | warp-insns / kFLOP | issue / DRAM clocks per "
        "unit | epilogue / MMA clocks per CTA (exposed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(rows, key=lambda e: (e.kernel, e.what, -e.capability)):
        memory = (f"{e.issue_clocks:.0f} / {e.dram_clocks:.0f} = {e.issue_per_dram_clocks:.2f}"
                  if e.issue_clocks is not None else "")
        gemm = (f"{e.epilogue_clocks:,.0f} / {e.mma_clocks:,.0f} "
                f"({e.epilogue_exposed_clocks:,.0f} exposed)" if e.epilogue_clocks is not None
                else "")
        lines.append(
            f"| {e.kernel.strip('_')} | {e.what} | {e.capability} | {e.regs} | {e.spill_bytes} | "
            f"{e.shared / 1024:.1f} | {e.ctas_per_sm} ({e.occupancy:.0%}) | {e.unit} | "
            f"{_number(e.loop_instructions, 0)} | {_number(e.mma_issued_per_useful)} | "
            f"{_number(e.warp_instructions_per_kflop)} | {memory} | {gemm} |")
    return "\n".join(lines)


README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- static model table: begin -->", "<!-- static model table: end -->"


def write_readme_table(table: str, path: str = README, begin: str = BEGIN,
                       end: str = END) -> None:
    """Replace the table between the begin and end markers of benchmarks/README.md."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path + ".tmp", "w") as f:
        f.write(head + begin + "\n" + table + "\n" + end + tail)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":  # --kernel NAME (repeatable) limits the table to those kernels
    chosen = tuple(sys.argv[i + 1] for i, arg in enumerate(sys.argv) if arg == "--kernel")
    table = markdown_table(estimates(dtypes=("bf16",), kernels=chosen or None))
    if "--readme" in sys.argv:
        write_readme_table(table)
    else:
        print(table)
