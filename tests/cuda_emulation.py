"""fastbert._C built for the host: the real launchers (csrc/*.cu) and kernels (kernels/*.cuh) run
on CPU tensors under the emulation of tests/cuda_emulation.h and tests/cuda_emulation.cpp.

`build(tmp_dir, compiler, include)` rewrites the CUDA syntax a host compiler does not take, in
copies of the sources (line numbers kept, `#line` names the original file):
- `kernel<<<grid, block, smem, stream>>>(args)` -> `::emu::launch(::emu::config(grid, block, smem,
  stream), kernel, args)`; `cudaLaunchKernel((const void*)kernel, ...)` -> `::emu::launch_kernel(
  kernel, ...)` (keeps the kernel's type);
- `extern __shared__ T name[];` -> a pointer to the launch's dynamic shared memory;
  `__shared__ T name[N]...;` -> a reference to one object per block.
It compiles them with every memory access instrumented (-fsanitize=kernel-address, a callback per
access, and -fsanitize=alignment for the vector accesses; no sanitizer runtime: the callbacks are
tests/cuda_emulation.cpp's) next to the uninstrumented runtime, and links one shared library.

`EmuC(path)` has fastbert._C's entry points with the same signatures, so fastbert/cuda.py runs
unchanged with `_C` replaced by it. Each call copies its global buffers between poisoned guard
regions (extents from the call's shapes and strides, overlapping views merged), runs the launcher,
copies them back, and raises `EmulationFinding` with what memcheck, racecheck or synccheck found
(kernel, block, thread, buffer, byte offset). Launcher errors raise ValueError / RuntimeError as
the pybind11 module does.

bankcheck (`EmuC.bankcheck()`, off by default): shared-memory bank conflicts counted per kernel
and access site, as wavefronts against the ideal (tests/cuda_emulation_bankcheck.cpp states the
model); `EmuC.bank_report()` returns them, `format_bank_report` makes a table. It counts the
kernels' plain shared loads and stores (instrumented) and the emulated ldmatrix and cp.async
requests.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUMENT = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
              "--param", "asan-stack=0", "--param", "asan-globals=0",
              "--param", "asan-use-after-return=0", "-fsanitize=alignment",
              # an aggregate (float4, uint4, ...) load or store stays one access, as the GPU's
              # LDS.128 / STS.128 (GCC would split a float4 copy into four 4-byte loads)
              "-fno-tree-sra"]

P, I, L, D, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_uint64
ELEMENT_BYTES = {0: 2, 1: 2, 2: 4}  # fastbert/cuda.py's dtype codes
# the checks' own test kernels, built only into the emulation
SELFTESTS = ("tests/cuda_emulation_selftest.cu", "tests/cuda_emulation_bank_selftest.cu")


class EmulationFinding(AssertionError):
    """What the emulation's memcheck, racecheck or synccheck found in a call."""


def cuda_include_dir():
    """The CUDA headers (cuda_fp16.h, ...) next to nvcc, or under CUDA_HOME; None if absent."""
    homes = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    homes += ["/usr/local/cuda"] + sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for home in homes:
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


# --------------------------------------------------------------------------------------------
# source rewriting and the build
# --------------------------------------------------------------------------------------------

_LAUNCH = re.compile(r"(?P<kernel>\b[A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(?P<config>.*?)>>>\s*\(",
                     re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?"
                            r"(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\((?P<align>\d+)\)\s+)?"
                            r"(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+(?P<name>\w+)\s*"
                            r"(?P<dims>(?:\[[^\]]+\])+)\s*;")


def _same_lines(old: str, new: str) -> str:
    """`new` padded with the newlines `old` had, so later lines keep their numbers."""
    return new + "\n" * (old.count("\n") - new.count("\n"))


def rewrite(text: str, name: str) -> str:
    """The CUDA source `text` (repository path `name`) in the form the host compiler takes."""
    def launch(m):
        return _same_lines(m.group(0), f"::emu::launch(::emu::config({m['config']}), "
                                       f"{m['kernel']}, ")

    def extern_shared(m):
        return _same_lines(m.group(0), f"{m['type']}* const {m['name']} = "
                                       f"reinterpret_cast<{m['type']}*>(::emu::dynamic_smem());")

    def static_shared(m):
        key = "[]() -> const void* { static char site; return &site; }()"
        return _same_lines(m.group(0), f"auto& {m['name']} = ::emu::shared_object<{m['type']}"
                                       f"{m['dims']}>({key}, {m['align'] or 16});")

    text = _LAUNCH.sub(launch, text)
    text = text.replace("cudaLaunchKernel((const void*)", "::emu::launch_kernel(")
    text = _EXTERN_SHARED.sub(extern_shared, text)
    text = _STATIC_SHARED.sub(static_shared, text)
    return f'#line 1 "{name}"\n{text}'


def build(tmp_dir: Path, compiler: str, include: Path) -> Path:
    """Rewrites kernels/, csrc/ and the self-test kernels into tmp_dir and links the library."""
    src = tmp_dir / "src"
    for pattern in ("kernels/*.cuh", "csrc/*.cu", "csrc/*.h") + SELFTESTS:
        for path in ROOT.glob(pattern):
            name = str(path.relative_to(ROOT))
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(rewrite(path.read_text(), name))
    common = [compiler, "-std=c++20", "-fPIC", "-w", f"-I{src}", f"-I{ROOT}", f"-I{include}"]
    sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/*.cu"))
    jobs, objects = [], []
    for name in sources + list(SELFTESTS):
        obj = tmp_dir / (Path(name).stem + ".o")
        jobs.append(common + ["-O1", "-x", "c++", "-include", "tests/cuda_emulation.h"] +
                    INSTRUMENT + ["-c", str(src / name), "-o", str(obj)])
        objects.append(obj)
    for runtime in ("cuda_emulation.cpp", "cuda_emulation_bankcheck.cpp"):  # not instrumented
        obj = tmp_dir / (Path(runtime).stem + ".o")
        jobs.append(common + ["-O2", "-c", str(ROOT / "tests" / runtime), "-o", str(obj)])
        objects.append(obj)
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for cmd in jobs]  # parallel
    stderrs = [proc.communicate()[1] for proc in procs]
    failed = [" ".join(cmd) + "\n" + err[-6000:]
              for cmd, proc, err in zip(jobs, procs, stderrs) if proc.returncode != 0]
    if failed:
        raise RuntimeError("emulation build failed:\n" + "\n".join(failed))
    lib = tmp_dir / "cuda_emulation.so"
    subprocess.run([compiler, "-shared", "-o", str(lib)] + [str(o) for o in objects],
                   check=True)
    return lib


# --------------------------------------------------------------------------------------------
# bankcheck's report
# --------------------------------------------------------------------------------------------

def short_kernel_name(name: str) -> str:
    """A demangled function name without return type, namespaces and parameters:
    "void ns::kernel<64, false>(ns::Params<float>)" -> "kernel<64, false>"."""
    depth = 0
    for i, ch in enumerate(name):  # the parameter list: the first "(" outside template arguments
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    depth, start = 0, 0
    for i, ch in enumerate(name):  # the return type ends at the last space outside them
        depth += (ch == "<") - (ch == ">")
        if ch == " " and depth == 0:
            start = i + 1
    head, angle, rest = name[start:].partition("<")
    return head.split("::")[-1] + angle + rest


def short_site_name(site: str) -> str:
    """"void ns::dot_rows<4, 4, 64>(float (&) [4][4], ...)+0x145" -> "dot_rows<4, 4, 64>+0x145"."""
    function, plus, offset = site.rpartition("+")
    return short_kernel_name(function) + plus + offset if plus else site


def format_bank_report(report: dict, kinds=None) -> str:
    """A table of bank_report(): a row per kernel and kind of access (all kinds, or `kinds`):
    warp instructions, wavefronts, ideal wavefronts, their ratio, the strict-phase count and the
    worst site of that kind."""
    rows = [("kernel", "kind", "instr", "wavefronts", "ideal", "ratio", "phased", "worst site")]
    for kernel in sorted(report):
        entry = report[kernel]
        for kind in sorted(entry["kinds"]):
            if kinds is not None and kind not in kinds:
                continue
            t = entry["kinds"][kind]
            sites = [(s["worst"][0] - s["worst"][1], name, s) for name, s in entry["sites"].items()
                     if s["kind"] == kind]
            _, name, site = max(sites, key=lambda x: (x[0], x[2]["worst"][0]))
            worst = (f"{name} ({site['width']} B: {site['worst'][0]} wavefronts, ideal "
                     f"{site['worst'][1]})")
            rows.append((kernel, kind, str(t["instructions"]), str(t["wavefronts"]),
                         str(t["ideal"]), f"{t['wavefronts'] / max(t['ideal'], 1):.2f}",
                         str(t["phased"]), worst))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


# --------------------------------------------------------------------------------------------
# the entry points
# --------------------------------------------------------------------------------------------

def _strided_bytes(batch, rows, heads, d, strides, elem):
    """Bytes from the first element of a (B, S, H, D) tensor with (batch, row, head) element
    strides `strides` (last dim contiguous) to one past its last; 0 when it has no elements."""
    if min(batch, rows, heads, d) <= 0:
        return 0
    sb, ss, sh = strides
    return ((batch - 1) * sb + (rows - 1) * ss + (heads - 1) * sh + d) * elem


def _strides(s):
    return (L * 3)(*s)


class EmuC:
    """fastbert._C's entry points (same signatures), run by the host emulation."""
    archs = "emu"
    cuda_version = 13000
    dtype_codes = {"float16": 0, "bfloat16": 1, "float32": 2}

    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(str(path))
        lib.emu_error.restype = lib.emu_findings.restype = ctypes.c_char_p
        lib.emu_launched_kernels.restype = ctypes.c_char_p
        lib.emu_attention_tile_info.argtypes = [L, I]
        lib.emu_attention_smem_bytes.restype = lib.emu_max_smem_per_block.restype = L
        lib.emu_attention_smem_bytes.argtypes = [L, I]
        lib.emu_guard_begin.argtypes = [I, P, P, P, P]
        # ..., causal, window left, window right, scale, dropout p, seed, dtype, stream
        tail = [I, L, L, D, D, U, I, P]
        lib.emu_attention_forward.argtypes = [P] * 6 + [L] * 5 + [P] * 4 + tail
        lib.emu_attention_backward.argtypes = [P] * 12 + [L] * 5 + [P] + tail
        lib.emu_attention_varlen_forward.argtypes = [P] * 7 + [L] * 6 + [P] * 4 + tail
        lib.emu_attention_varlen_backward.argtypes = [P] * 13 + [L] * 6 + [P] + tail
        lib.emu_add_layer_norm_forward.argtypes = [P] * 8 + [L, L, D, D, U, I, I, P]
        lib.emu_add_layer_norm_backward_parts.argtypes = [L, L, P]
        lib.emu_add_layer_norm_backward.argtypes = [P] * 12 + [L, L, L, D, U, I, I, P]
        lib.emu_bias_gelu_forward.argtypes = [P] * 4 + [L, L, I, I, P]
        lib.emu_gelu_backward_parts.argtypes = [L, L, P]
        lib.emu_gelu_backward.argtypes = [P] * 5 + [L, L, L, I, I, P]
        lib.emu_apply_rotary.argtypes = [P] * 5 + [L] * 7 + [I, I, I, I, P]
        lib.emu_geglu_forward.argtypes = [P] * 3 + [L, L, I, I, P]
        lib.emu_geglu_backward_parts.argtypes = [L, L, P]
        lib.emu_geglu_backward.argtypes = [P] * 5 + [L, L, L, I, I, P]
        lib.emu_selftest.argtypes = [I, P, P, I]
        lib.emu_bank_selftest.argtypes = [I, P, P, I]
        lib.emu_set_bankcheck.argtypes = [I]
        lib.emu_bank_report.restype = ctypes.c_char_p

    # ---- plumbing ------------------------------------------------------------------------

    def set_sm_count(self, n: int) -> None:
        """The multiprocessor count the emulated device reports (sizes the reduction grids)."""
        self.lib.emu_set_sm_count(n)

    def _status(self, status, findings=""):
        """Raises the launcher's error (as pybind11 would), else what the checks found."""
        if status == 1:
            raise ValueError(self.lib.emu_error().decode() + findings)
        if status:
            raise RuntimeError(self.lib.emu_error().decode() + findings)
        if findings:
            raise EmulationFinding(findings)

    def _take_findings(self) -> str:
        count = self.lib.emu_finding_count()
        findings = self.lib.emu_findings().decode()
        self.lib.emu_clear_findings()
        return f"\n{count} finding(s):\n{findings}" if count else ""

    def guarded(self, buffers: dict, call):
        """call(ptrs) with every buffer {name: (address, bytes)} (address 0: none) replaced by a
        copy between guard regions; copied back after; raises what the checks found."""
        live = [(name, ptr, size) for name, (ptr, size) in buffers.items() if ptr]
        n = len(live)
        ptrs = (U * n)(*(ptr for _, ptr, _ in live))
        sizes = (U * n)(*(size for _, _, size in live))
        names = (ctypes.c_char_p * n)(*(name.encode() for name, _, _ in live))
        out = (U * n)()
        self.lib.emu_guard_begin(n, ptrs, sizes, names, out)
        moved = {name: 0 for name in buffers}
        moved.update({name: out[i] for i, (name, _, _) in enumerate(live)})
        try:
            status = call(moved)
        finally:
            self.lib.emu_guard_end()
        self._status(status, self._take_findings())

    # ---- bankcheck ---------------------------------------------------------------------------

    def set_bankcheck(self, on: bool) -> None:
        """Counts bank conflicts of the launches from now on (on), or stops counting."""
        self.lib.emu_set_bankcheck(int(bool(on)))

    def reset_bank_report(self) -> None:
        self.lib.emu_reset_bank_report()

    @contextlib.contextmanager
    def bankcheck(self):
        """Counting on, from an empty report, inside the block; off after it."""
        self.reset_bank_report()
        self.set_bankcheck(True)
        try:
            yield self
        finally:
            self.set_bankcheck(False)

    def bank_report(self) -> dict:
        """What bankcheck counted since the last reset, per kernel (short name with template
        arguments, e.g. "fwd_kernel_fp32<64, false>"):
        {"instructions", "wavefronts", "ideal", "phased": totals over its warp instructions,
         "worst": the instruction with the most wavefronts over its ideal, as a dict (site, kind,
         width, wavefronts, ideal, phased),
         "kinds": {"load" | "store" | "ldmatrix" | "cp.async": the same four totals},
         "sites": {site ("function+0xoffset": the function holding the access, the kernel
                   or a helper it calls and GCC did not inline): totals, "kind", "width" (bytes
                   per lane) and "worst" (wavefronts, ideal, phased)}}."""
        report = {}
        for line in self.lib.emu_bank_report().decode().splitlines():
            kernel, site, kind, width, *numbers = line.split("\t")
            n, w, i, ph, worst_w, worst_i, worst_ph = map(int, numbers)
            totals = {"instructions": n, "wavefronts": w, "ideal": i, "phased": ph}
            entry = report.setdefault(short_kernel_name(kernel), {
                "instructions": 0, "wavefronts": 0, "ideal": 0, "phased": 0, "worst": None,
                "kinds": {}, "sites": {}})
            kinds = entry["kinds"].setdefault(kind, dict.fromkeys(totals, 0))
            for name, value in totals.items():
                entry[name] += value
                kinds[name] += value
            site = short_site_name(site)
            entry["sites"][site] = dict(totals, kind=kind, width=int(width),
                                        worst=(worst_w, worst_i, worst_ph))
            worst = entry["worst"]
            if worst is None or (worst_w - worst_i, worst_w) > (worst["wavefronts"] -
                                                               worst["ideal"],
                                                               worst["wavefronts"]):
                entry["worst"] = {"site": site, "kind": kind, "width": int(width),
                                  "wavefronts": worst_w, "ideal": worst_i, "phased": worst_ph}
        return report

    # ---- fastbert._C's entry points --------------------------------------------------------

    def set_device(self, device):
        self._status(self.lib.emu_set_device(device))

    def probe_device(self, device):
        self._status(self.lib.emu_probe_device(device))
        return self.lib.emu_error().decode()

    def attention_smem_bytes(self, d, dtype):
        return self.lib.emu_attention_smem_bytes(d, dtype)

    def max_smem_per_block(self):
        return self.lib.emu_max_smem_per_block()

    def attention_tile_info(self, d, dropout):
        self._status(self.lib.emu_attention_tile_info(d, dropout))
        lines = self.lib.emu_error().decode().split()
        return {name: int(value) for name, value in (line.split("=") for line in lines)}

    def launched_kernels(self) -> set:
        """The names (without namespace and template arguments) of every kernel launched so far."""
        names = self.lib.emu_launched_kernels().decode().splitlines()
        return {re.match(r"void ([\w:]+)", name).group(1).split("::")[-1] for name in names}

    def attention_forward(self, q, k, v, mask, out, lse, B, Sq, Sk, H, D, q_st, k_st, v_st,
                          out_st, causal, left, right, scale, p, seed, dtype, stream):
        e = ELEMENT_BYTES[dtype]
        buffers = {"q": (q, _strided_bytes(B, Sq, H, D, q_st, e)),
                   "k": (k, _strided_bytes(B, Sk, H, D, k_st, e)),
                   "v": (v, _strided_bytes(B, Sk, H, D, v_st, e)),
                   "mask": (mask, B * Sk), "out": (out, _strided_bytes(B, Sq, H, D, out_st, e)),
                   "lse": (lse, B * H * Sq * 4)}
        self.guarded(buffers, lambda m: self.lib.emu_attention_forward(
            m["q"], m["k"], m["v"], m["mask"], m["out"], m["lse"], B, Sq, Sk, H, D,
            *map(_strides, (q_st, k_st, v_st, out_st)), causal, left, right, scale, p, seed,
            dtype, stream))

    def attention_backward(self, dout, q, k, v, out, lse, mask, dq, dk, dv, delta, acc, B, Sq, Sk,
                           H, D, *rest):
        strides, (causal, left, right, scale, p, seed, dtype, stream) = rest[:8], rest[8:]
        dout_st, q_st, k_st, v_st, out_st, dq_st, dk_st, dv_st = strides
        e = ELEMENT_BYTES[dtype]
        buffers = {"dout": (dout, _strided_bytes(B, Sq, H, D, dout_st, e)),
                   "q": (q, _strided_bytes(B, Sq, H, D, q_st, e)),
                   "k": (k, _strided_bytes(B, Sk, H, D, k_st, e)),
                   "v": (v, _strided_bytes(B, Sk, H, D, v_st, e)),
                   "out": (out, _strided_bytes(B, Sq, H, D, out_st, e)),
                   "lse": (lse, B * H * Sq * 4), "mask": (mask, B * Sk),
                   "dq": (dq, _strided_bytes(B, Sq, H, D, dq_st, e)),
                   "dk": (dk, _strided_bytes(B, Sk, H, D, dk_st, e)),
                   "dv": (dv, _strided_bytes(B, Sk, H, D, dv_st, e)),
                   "delta": (delta, B * H * Sq * 4), "dq_accum": (acc, B * Sq * H * D * 4)}
        all_strides = (P * 8)(*(ctypes.cast(_strides(s), P) for s in strides))
        self.guarded(buffers, lambda m: self.lib.emu_attention_backward(
            *(m[n] for n in ("dout", "q", "k", "v", "out", "lse", "mask", "dq", "dk", "dv",
                             "delta", "dq_accum")),
            B, Sq, Sk, H, D, all_strides, causal, left, right, scale, p, seed, dtype, stream))

    @staticmethod
    def _total_k(cu_k, batch):
        return ctypes.c_int32.from_address(cu_k + 4 * batch).value

    def attention_varlen_forward(self, q, k, v, cu_q, cu_k, out, lse, B, total_q, max_q, max_k, H,
                                 D, q_st, k_st, v_st, out_st, causal, left, right, scale, p, seed,
                                 dtype, stream):
        e, total_k = ELEMENT_BYTES[dtype], self._total_k(cu_k, B)
        buffers = {"q": (q, _strided_bytes(1, total_q, H, D, q_st, e)),
                   "k": (k, _strided_bytes(1, total_k, H, D, k_st, e)),
                   "v": (v, _strided_bytes(1, total_k, H, D, v_st, e)),
                   "cu_seqlens_q": (cu_q, (B + 1) * 4), "cu_seqlens_k": (cu_k, (B + 1) * 4),
                   "out": (out, _strided_bytes(1, total_q, H, D, out_st, e)),
                   "lse": (lse, H * total_q * 4)}
        self.guarded(buffers, lambda m: self.lib.emu_attention_varlen_forward(
            m["q"], m["k"], m["v"], m["cu_seqlens_q"], m["cu_seqlens_k"], m["out"], m["lse"], B,
            total_q, max_q, max_k, H, D, *map(_strides, (q_st, k_st, v_st, out_st)), causal,
            left, right, scale, p, seed, dtype, stream))

    def attention_varlen_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, delta,
                                  acc, B, total_q, max_q, max_k, H, D, *rest):
        strides, (causal, left, right, scale, p, seed, dtype, stream) = rest[:8], rest[8:]
        dout_st, q_st, k_st, v_st, out_st, dq_st, dk_st, dv_st = strides
        e, total_k = ELEMENT_BYTES[dtype], self._total_k(cu_k, B)
        buffers = {"dout": (dout, _strided_bytes(1, total_q, H, D, dout_st, e)),
                   "q": (q, _strided_bytes(1, total_q, H, D, q_st, e)),
                   "k": (k, _strided_bytes(1, total_k, H, D, k_st, e)),
                   "v": (v, _strided_bytes(1, total_k, H, D, v_st, e)),
                   "out": (out, _strided_bytes(1, total_q, H, D, out_st, e)),
                   "lse": (lse, H * total_q * 4),
                   "cu_seqlens_q": (cu_q, (B + 1) * 4), "cu_seqlens_k": (cu_k, (B + 1) * 4),
                   "dq": (dq, _strided_bytes(1, total_q, H, D, dq_st, e)),
                   "dk": (dk, _strided_bytes(1, total_k, H, D, dk_st, e)),
                   "dv": (dv, _strided_bytes(1, total_k, H, D, dv_st, e)),
                   "delta": (delta, H * total_q * 4), "dq_accum": (acc, total_q * H * D * 4)}
        all_strides = (P * 8)(*(ctypes.cast(_strides(s), P) for s in strides))
        self.guarded(buffers, lambda m: self.lib.emu_attention_varlen_backward(
            *(m[n] for n in ("dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k",
                             "dq", "dk", "dv", "delta", "dq_accum")),
            B, total_q, max_q, max_k, H, D, all_strides, causal, left, right, scale, p, seed,
            dtype, stream))

    def add_layer_norm_forward(self, x, residual, weight, bias, y, sum_, mean, rstd, rows, hidden,
                               eps, p, seed, dtype, weight_dtype, stream):
        e, w = ELEMENT_BYTES[dtype], ELEMENT_BYTES[weight_dtype]
        buffers = {"x": (x, rows * hidden * e), "residual": (residual, rows * hidden * e),
                   "weight": (weight, hidden * w), "bias": (bias, hidden * w),
                   "y": (y, rows * hidden * e), "sum": (sum_, rows * hidden * e),
                   "mean": (mean, rows * 4), "rstd": (rstd, rows * 4)}
        self.guarded(buffers, lambda m: self.lib.emu_add_layer_norm_forward(
            *(m[n] for n in ("x", "residual", "weight", "bias", "y", "sum", "mean", "rstd")),
            rows, hidden, eps, p, seed, dtype, weight_dtype, stream))

    def add_layer_norm_backward_parts(self, rows, hidden):
        parts = L()
        self._status(self.lib.emu_add_layer_norm_backward_parts(rows, hidden, ctypes.byref(parts)))
        return parts.value

    def add_layer_norm_backward(self, dy, dsum, x, residual, weight, mean, rstd, dx, dresidual,
                                partial, dweight, dbias, rows, hidden, parts, p, seed, dtype,
                                weight_dtype, stream):
        e, w = ELEMENT_BYTES[dtype], ELEMENT_BYTES[weight_dtype]
        buffers = {"dy": (dy, rows * hidden * e), "dsum": (dsum, rows * hidden * e),
                   "x": (x, rows * hidden * e),
                   "residual": (residual, rows * hidden * e), "weight": (weight, hidden * w),
                   "mean": (mean, rows * 4), "rstd": (rstd, rows * 4),
                   "dx": (dx, rows * hidden * e), "dresidual": (dresidual, rows * hidden * e),
                   "partial": (partial, 2 * parts * hidden * 4),
                   "dweight": (dweight, hidden * w), "dbias": (dbias, hidden * w)}
        self.guarded(buffers, lambda m: self.lib.emu_add_layer_norm_backward(
            *(m[n] for n in ("dy", "dsum", "x", "residual", "weight", "mean", "rstd", "dx",
                             "dresidual", "partial", "dweight", "dbias")),
            rows, hidden, parts, p, seed, dtype, weight_dtype, stream))

    def bias_gelu_forward(self, acc, bias, pre, out, m, n, tanh_approx, dtype, stream):
        e = ELEMENT_BYTES[dtype]
        buffers = {"acc": (acc, m * n * e), "bias": (bias, n * e), "pre": (pre, m * n * e),
                   "out": (out, m * n * e)}
        self.guarded(buffers, lambda b: self.lib.emu_bias_gelu_forward(
            b["acc"], b["bias"], b["pre"], b["out"], m, n, tanh_approx, dtype, stream))

    def gelu_backward_parts(self, m, n):
        parts = L()
        self._status(self.lib.emu_gelu_backward_parts(m, n, ctypes.byref(parts)))
        return parts.value

    def gelu_backward(self, dout, pre, dpre, partial, dbias, m, n, parts, tanh_approx, dtype,
                      stream):
        e = ELEMENT_BYTES[dtype]
        buffers = {"dout": (dout, m * n * e), "pre": (pre, m * n * e), "dpre": (dpre, m * n * e),
                   "partial": (partial, parts * n * 4), "dbias": (dbias, n * e)}
        self.guarded(buffers, lambda b: self.lib.emu_gelu_backward(
            b["dout"], b["pre"], b["dpre"], b["partial"], b["dbias"], m, n, parts, tanh_approx,
            dtype, stream))

    def apply_rotary(self, x, cos, sin, positions, out, rows, heads, head_dim, half, table_rows,
                     row_stride, head_stride, interleaved, conjugate, dtype, table_dtype, stream):
        e, c = ELEMENT_BYTES[dtype], ELEMENT_BYTES[table_dtype]
        buffers = {"x": (x, _strided_bytes(1, rows, heads, head_dim, (0, row_stride, head_stride),
                                           e)),
                   "cos": (cos, table_rows * half * c), "sin": (sin, table_rows * half * c),
                   "positions": (positions, rows * 8), "out": (out, rows * heads * head_dim * e)}
        self.guarded(buffers, lambda b: self.lib.emu_apply_rotary(
            b["x"], b["cos"], b["sin"], b["positions"], b["out"], rows, heads, head_dim, half,
            table_rows, row_stride, head_stride, interleaved, conjugate, dtype, table_dtype,
            stream))

    def geglu_forward(self, pre, bias, out, m, n, tanh_approx, dtype, stream):
        e = ELEMENT_BYTES[dtype]
        buffers = {"pre": (pre, m * 2 * n * e), "bias": (bias, 2 * n * e), "out": (out, m * n * e)}
        self.guarded(buffers, lambda b: self.lib.emu_geglu_forward(
            b["pre"], b["bias"], b["out"], m, n, tanh_approx, dtype, stream))

    def geglu_backward_parts(self, m, n):
        parts = L()
        self._status(self.lib.emu_geglu_backward_parts(m, n, ctypes.byref(parts)))
        return parts.value

    def geglu_backward(self, dout, pre, dpre, partial, dbias, m, n, parts, tanh_approx, dtype,
                       stream):
        e = ELEMENT_BYTES[dtype]
        buffers = {"dout": (dout, m * n * e), "pre": (pre, m * 2 * n * e),
                   "dpre": (dpre, m * 2 * n * e), "partial": (partial, parts * 2 * n * 4),
                   "dbias": (dbias, 2 * n * e)}
        self.guarded(buffers, lambda b: self.lib.emu_geglu_backward(
            b["dout"], b["pre"], b["dpre"], b["partial"], b["dbias"], m, n, parts, tanh_approx,
            dtype, stream))

    # ---- the checks' own test kernels (tests/cuda_emulation_selftest.cu) --------------------

    def bank_selftest(self, case: int, x, y, n: int) -> int:
        """Runs bank pattern `case` of tests/cuda_emulation_bank_selftest.cu (one warp), like
        selftest; bankcheck counts it when on."""
        codes = []
        self.guarded({"x": x, "y": y},
                     lambda b: codes.append(self.lib.emu_bank_selftest(case, b["x"], b["y"], n))
                     or 0)
        return codes[0]

    def selftest(self, case: int, x, y, n: int) -> int:
        """Runs self-test kernel `case` on float buffers x and y ((address, bytes) each) of n
        elements; returns the launch's cudaError_t code."""
        codes = []
        self.guarded({"x": x, "y": y},
                     lambda b: codes.append(self.lib.emu_selftest(case, b["x"], b["y"], n)) or 0)
        return codes[0]
