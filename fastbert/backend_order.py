"""Which backend `auto` tries first, per op and GPU family, and why.

Evidence first: the committed benchmark results (benchmarks/results/*.csv) rank the backends on
the GPU family they were measured on, by the geometric mean over the cases every ranked backend
ran of (its time / the fastest time). Without results for a family, the order is the one static
analysis of the kernels predicts, with that analysis as the reason. `torch` (the reference math
on ATen) always comes last on a GPU: it is the fallback that serves every input.

    order("fastbert.attention", torch.device("cuda")) -> [("triton", "why"), ("cuda", "why"), ...]

ops.resolve_backend walks the list and takes the first backend that can serve the input;
`python -m fastbert.info` prints the lists.
"""
from __future__ import annotations

import csv
import functools
import math
import os
import statistics
from typing import Dict, List, Optional, Tuple

import torch

OPS = ("fastbert.attention", "fastbert.attention_varlen", "fastbert.add_layer_norm",
       "fastbert.linear_bias_gelu", "fastbert.linear_geglu", "fastbert.apply_rotary")
GPU_BACKENDS = ("cuda", "triton", "torch")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "results")

AMPERE, HOPPER, OTHER = "sm_80 (Ampere)", "sm_90 (Hopper)", "other GPU"

# Device-name fragments of each family, for the `device` column of the benchmark CSVs (which
# records the name torch reports, not the capability).
_FAMILY_NAMES = {
    HOPPER: ("H100", "H200", "H800", "H20", "GH200"),
    AMPERE: ("A100", "A800", "A10", "A30", "A40", "A16", "A6000", "A5000", "A4000", "RTX 30"),
}

# The benchmark providers that are fastbert backends.
_PROVIDERS = {"fastbert-cuda": "cuda", "fastbert-triton": "triton", "fastbert-torch": "torch"}

_TORCH_LAST = ("the reference math on ATen ops: unfused, several passes over memory; the "
               "fallback that serves every input")

# What static analysis predicts where no measurement exists: (backend, reason), fastest first.
# These are estimates from the kernels' code and compiled output, not measurements.
_STATIC: Dict[str, List[Tuple[str, str]]] = {
    "fastbert.attention": [
        ("triton", "predicted faster: FlashAttention-2-style kernel with S and P in registers "
                   "(no spills, tests/test_resources.py); not measured on a GPU yet"),
        ("cuda", "predicted at ~25-35 % of FlashAttention-2: its WMMA fragments send S, P and O "
                 "through shared memory every 64-key tile (static estimate, issue 14); not "
                 "measured on a GPU yet"),
        ("torch", _TORCH_LAST),
    ],
    "fastbert.attention_varlen": [
        ("triton", "packed kernels (IS_VARLEN) with the dense kernels' tiles: no padding work; "
                   "not measured on a GPU yet"),
        ("cuda", "second while its attention is predicted slower than Triton's (static "
                 "estimate, issue 14); serves varlen only where the extension has it"),
        ("torch", "runs the packed batch on a padded view: padding work plus copies; "
                  + _TORCH_LAST),
    ],
    "fastbert.add_layer_norm": [
        ("cuda", "predicted faster: both are one memory-bound pass (BERT-base, 16k x 768 bf16 "
                 "rows: ~17 us of traffic at 4.3 TB/s), so host launch cost decides; the C++ "
                 "launcher costs a few us, Triton's Python launch path tens of us "
                 "(benchmarks/host_overhead.py), and CUDA loads 16-byte vectors over exactly 768 "
                 "columns where Triton pads rows to 1024 lanes; not measured on a GPU yet"),
        ("triton", "same single pass, higher host cost per launch; not measured on a GPU yet"),
        ("torch", _TORCH_LAST),
    ],
    "fastbert.linear_bias_gelu": [
        ("triton", "predicted faster: bias + GELU fused into the GEMM epilogue, so the M x N "
                   "product never goes through memory; no pre-activation store without "
                   "gradients; not measured on a GPU yet"),
        ("cuda", "cuBLAS GEMM, then a separate bias + GELU pass: writes and re-reads the M x N "
                 "product (BERT-base FFN at 16k tokens: ~200 MB, ~47 us at 4.3 TB/s, against "
                 "~100 us for the GEMM itself at 790 TFLOP/s); wins only if cuBLAS beats "
                 "Triton's GEMM by more than that (static estimate); not measured on a GPU yet"),
        ("torch", _TORCH_LAST),
    ],
    # ModernBERT's ops (issue 20)
    "fastbert.linear_geglu": [
        ("triton", "GELU and the gate product in the GEMM epilogue: the M x 2N product never "
                   "goes through memory; not measured on a GPU yet"),
        ("cuda", "cuBLAS GEMM, then one fused pass (bias + gelu(a) * g) that re-reads the M x 2N "
                 "product Triton's epilogue keeps in registers; wins only if cuBLAS beats "
                 "Triton's GEMM by more than that pass (static estimate); not measured on a GPU "
                 "yet"),
        ("torch", _TORCH_LAST),
    ],
    "fastbert.apply_rotary": [
        ("cuda", "predicted faster: both read and write each element of q and k once, so host "
                 "launch cost decides, and the C++ launcher's is below Triton's Python launch "
                 "path (as for add_layer_norm); 16-byte loads where the head layout allows; not "
                 "measured on a GPU yet"),
        ("triton", "the same single pass, higher host cost per launch; not measured on a GPU "
                   "yet"),
        ("torch", _TORCH_LAST),
    ],
}


def family(capability: Optional[Tuple[int, int]]) -> str:
    """The GPU family of a compute capability (major, minor)."""
    if capability is None:
        return OTHER
    if capability[0] == 9:
        return HOPPER
    if capability[0] == 8 and capability[1] in (0, 6, 7):
        return AMPERE
    return OTHER


def family_of_name(device_name: str) -> Optional[str]:
    """The family of a device name as the benchmark CSVs record it (None: not a known GPU)."""
    for fam, fragments in _FAMILY_NAMES.items():
        if any(fragment in device_name for fragment in fragments):
            return fam
    return None


@functools.lru_cache(maxsize=8)
def measured_times(results_dir: str = RESULTS_DIR) -> Dict[tuple, Dict[str, float]]:
    """{(family, op, mode, shape, device, file): {backend: median time_ms}} from every CSV."""
    samples: Dict[tuple, Dict[str, list]] = {}
    if not os.path.isdir(results_dir):
        return {}
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".csv"):
            continue
        with open(os.path.join(results_dir, name), newline="") as f:
            for row in csv.DictReader(f):
                backend = _PROVIDERS.get(row.get("provider", ""))
                fam = family_of_name(row.get("device", ""))
                if backend is None or fam is None or row.get("metric") != "time_ms":
                    continue
                try:
                    value = float(row["value"])
                except (TypeError, ValueError):
                    continue
                key = (fam, "fastbert." + row["op"], row["mode"], row["shape"], row["device"], name)
                samples.setdefault(key, {}).setdefault(backend, []).append(value)
    return {k: {b: statistics.median(v) for b, v in per.items()} for k, per in samples.items()}


def _measured_order(op: str, fam: str, results_dir: str) -> List[Tuple[str, str]]:
    """Backends ranked by measurement on this family ([] when fewer than two were measured in a
    common case). Training (fwd+bwd) cases decide where there are any."""
    cases = {k: v for k, v in measured_times(results_dir).items()
             if k[0] == fam and k[1] == op and len(v) >= 2}
    training = {k: v for k, v in cases.items() if k[2] in ("fwd+bwd", "train")}
    cases = training or cases
    if not cases:
        return []
    # rank the backends measured in the most cases, over the cases all of them ran
    counts: Dict[str, int] = {}
    for times in cases.values():
        for backend in times:
            counts[backend] = counts.get(backend, 0) + 1
    most = max(counts.values())
    ranked = [b for b in GPU_BACKENDS if counts.get(b) == most]
    common = [times for times in cases.values() if all(b in times for b in ranked)]
    if len(ranked) < 2 or not common:
        return []
    slowdown = {b: math.exp(statistics.fmean(math.log(t[b] / min(t[x] for x in ranked))
                                            for t in common)) for b in ranked}
    devices = sorted({k[4] for k in cases})
    files = sorted({k[5] for k in cases})
    mode = "fwd+bwd" if training else "forward"
    where = (f"measured on {', '.join(devices)} ({len(common)} {mode} cases, "
             f"benchmarks/results/{', '.join(files)})")
    return [(b, f"{where}: {slowdown[b]:.2f}x the fastest time, geometric mean")
            for b in sorted(ranked, key=slowdown.get)]


def order(op: str, device: torch.device, capability: Optional[Tuple[int, int]] = None,
          results_dir: str = RESULTS_DIR) -> List[Tuple[str, str]]:
    """[(backend, why)] in the order `auto` tries them for `op` on `device`.

    `capability` overrides the device's compute capability (tests pass a fake one); CPU tensors
    get the torch backend alone (Triton and CUDA kernels need CUDA tensors)."""
    if op not in _STATIC:
        raise ValueError(f"backend_order: argument 'op' expected one of {', '.join(OPS)}, got "
                         f"{op!r}")
    device = torch.device(device)
    if device.type != "cuda" and capability is None:
        return [("torch", f"{device.type} tensors: only the torch backend runs them")]
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    fam = family(capability)
    measured = _measured_order(op, fam, results_dir)
    static = [(b, f"no benchmark results for {fam}; static analysis: {why}")
              for b, why in _STATIC[op]]
    if not measured:
        return static
    # backends the results do not rank follow, in the static order
    seen = {b for b, _ in measured}
    return measured + [(b, f"not ranked by the benchmark results for {fam}; static analysis: "
                           f"{why}") for b, why in _STATIC[op] if b not in seen]
