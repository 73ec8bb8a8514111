"""Timing harness: run the alternatives of one case side by side, interleaved, and record rows.

A `Case` is one op at one shape in one mode (fwd, bwd, fwd+bwd, train, infer). Each provider
(fastbert-triton, sdpa-flash, transformers-eager, ...) is a `setup()` that builds its inputs and
returns the function to time, or raises `Unsupported`. The harness probes every provider once
(warm-up and compilation happen there, outside the timing), then times all of them in rounds,
one provider after another, so a clock or thermal drift hits them all alike. Inputs are rotated
inside each timed function (several input sets cycled), so no provider times on warm caches.

Every ratio is computed round by round (each round times all providers back to back, so a busy
spell hits both sides of a ratio alike) and reported as the median over rounds with its spread,
the interquartile range over rounds relative to the median. A ratio whose spread is wider than
UNSTABLE_PCT is marked unstable: the machine was too busy for that case to be trusted.
"""
from __future__ import annotations

import csv
import datetime
import gc
import itertools
import os
import platform
import re
import statistics
import subprocess
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastbert.info import package_version

# spread (IQR over rounds / median) above which a ratio is reported as unstable
UNSTABLE_PCT = 10.0

COLUMNS = ["op", "provider", "mode", "shape", "metric", "value", "note", "device", "torch",
           "triton", "transformers", "fastbert", "commit", "date", "suite"]


class Unsupported(Exception):
    """Raised by a provider's setup when it cannot serve the input; the message says why."""


class Skipped(Unsupported):
    """Raised by a provider's setup that could run but is left out (memory, time, flags)."""


@dataclass
class Case:
    op: str                     # "attention", "add_layer_norm", "linear_bias_gelu", "model", "ceiling"
    mode: str                   # fwd | bwd | fwd+bwd | train | infer
    shape: str                  # human-readable label, e.g. "B32 S512 H12 D64 mask"
    providers: Dict[str, Callable[[], Callable[[], Any]]]
    work: Dict[str, float] = field(default_factory=dict)   # flops / bytes / tokens per call
    params: Dict[str, Any] = field(default_factory=dict)   # numbers for plots (seqlen, ...)
    measure_memory: bool = False
    gpu_rep_scale: float = 1.0  # longer do_bench repetition for cases whose calls take ~10+ ms


@dataclass
class Timing:
    """How long to time each provider per round: on GPU do_bench's warm-up and repetition time
    (ms); on CPU the least time torch.utils.benchmark spends measuring (s)."""
    rounds: int = 5
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_min_s: float = 0.5


def is_fastbert(provider: str) -> bool:
    return provider.startswith(("fastbert", "patch_hf"))


def rotate(calls: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One function that runs the next input set's call each time it is invoked."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


# --------------------------------------------------------------------------------------------
# device and run metadata
# --------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run_metadata(device: torch.device, suite: str) -> Dict[str, str]:
    import fastbert
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "fastbert": fastbert.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "suite": suite,
    }


# --------------------------------------------------------------------------------------------
# timers
# --------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(fn: Callable[[], Any], device: torch.device, timing: Timing,
               gpu_rep_scale: float = 1.0) -> float:
    """Median time (ms) of one call, from one round of one provider."""
    if device.type == "cuda":
        from triton.testing import do_bench  # median of many launches, L2 flushed between them
        return do_bench(fn, warmup=timing.warmup_ms, rep=int(timing.rep_ms * gpu_rep_scale),
                        return_mode="median")
    from torch.utils.benchmark import Timer  # blocks of calls, enough to outlast timer noise
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=timing.cpu_min_s).median * 1e3


def peak_memory_gib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30


# --------------------------------------------------------------------------------------------
# spread
# --------------------------------------------------------------------------------------------

def median_and_spread(values: Sequence[float]) -> tuple:
    """(median, interquartile range as % of the median); one value has no spread (0)."""
    med = statistics.median(values)
    if len(values) < 2 or med == 0:
        return med, 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return med, 100.0 * (q3 - q1) / abs(med)


def is_unstable(spread_pct: float) -> bool:
    return spread_pct > UNSTABLE_PCT


# --------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------

def _first_line(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).strip().splitlines()[:1]) or "(no message)"
    return line[:limit]


def _probe(setup: Callable[[], Callable[[], Any]], device: torch.device):
    """Build a provider and run it once. Returns (fn, None) or (None, (status, reason))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = setup()
            fn()
            _sync(device)
            return fn, None
        except Skipped as e:
            return None, ("skipped", _first_line(e))
        except Unsupported as e:
            return None, ("unsupported", _first_line(e))
        except torch.cuda.OutOfMemoryError as e:
            return None, ("oom", _first_line(e))
        except Exception as e:  # a failing provider is reported, never crashes the suite
            if "No available kernel" in str(e) or "No viable backend" in str(e):
                # torch SDPA says why a backend declined only through warnings
                why = dict.fromkeys(_first_line(w.message) for w in caught)
                return None, ("unsupported", "; ".join(why) or _first_line(e))
            if isinstance(e, ValueError) and "cannot serve this input" in str(e):
                return None, ("unsupported", _first_line(e))  # fastbert's named-backend refusal
            return None, ("failed", f"{type(e).__name__}: {_first_line(e)}")


def _free(device: torch.device) -> None:
    """Give a failed or finished provider's GPU memory back (reference cycles included)."""
    if device.type == "cuda":
        gc.collect()  # slow with transformers loaded (~0.3 s), so only where memory is tight
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, timing: Timing) -> List[Dict[str, Any]]:
    """Time every provider of `case`, interleaved; returns rows (without run metadata)."""
    rows: List[Dict[str, Any]] = []

    def row(provider, metric, value, note=""):
        rows.append(dict(op=case.op, provider=provider, mode=case.mode, shape=case.shape,
                         metric=metric, value=value, note=note))

    live: Dict[str, Callable[[], Any]] = {}
    for name, setup in case.providers.items():
        fn, problem = _probe(setup, device)
        if problem is not None:
            row(name, "status", problem[0], problem[1])
            _free(device)
        else:
            live[name] = fn

    samples: Dict[str, List[float]] = {name: [] for name in live}
    names = list(live)
    failed = set()
    for r in range(timing.rounds):
        # start each round with a different provider so none always runs first
        for name in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
            if name in failed:
                continue
            try:
                samples[name].append(time_round(live[name], device, timing, case.gpu_rep_scale))
            except Exception as e:
                failed.add(name)
                row(name, "status", "oom" if isinstance(e, torch.cuda.OutOfMemoryError)
                    else "failed", f"{type(e).__name__}: {_first_line(e)}")

    for name in names:
        if name in failed:
            continue
        ms, spread = median_and_spread(samples[name])
        row(name, "status", "ok")
        row(name, "time_ms", ms)
        row(name, "time_spread_pct", spread)
        seconds = ms / 1e3
        if "flops" in case.work:
            row(name, "tflops", case.work["flops"] / seconds / 1e12)
        if "bytes" in case.work:
            row(name, "gbps", case.work["bytes"] / seconds / 1e9)
        if "tokens" in case.work:
            row(name, "tokens_per_s", case.work["tokens"] / seconds)
        if case.measure_memory:
            try:
                mem = peak_memory_gib(live[name], device)
            except Exception:  # only the memory probe failed; the timing stands
                mem = None
            if mem is not None:
                row(name, "peak_mem_gib", mem)
    live.clear()
    _free(device)
    timed = {name: samples[name] for name in names if name not in failed}
    for r in speedups(timed, timing.rounds):
        row(*r)
    return rows


def speedups(samples: Dict[str, List[float]], rounds: int) -> List[tuple]:
    """(provider, metric, value, note) rows: each fastbert provider's speedup over each baseline
    (baseline time / fastbert time), the median of the per-round ratios, and its spread."""
    out = []
    for ours, t_ours in samples.items():
        if not is_fastbert(ours):
            continue
        for base, t_base in samples.items():
            if is_fastbert(base):
                continue
            ratios = [b / a for a, b in zip(t_ours, t_base)]  # rounds where both were timed
            ratio, spread = median_and_spread(ratios)
            note = (f"unstable: spread {spread:.0f}% over {len(ratios)} rounds"
                    if is_unstable(spread) else "")
            out.append((ours, f"speedup_vs:{base}", ratio, note))
            out.append((ours, f"speedup_spread_pct_vs:{base}", spread, ""))
    return out


def unstable_speedups(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The speedup rows marked unstable."""
    return [r for r in rows if r["metric"].startswith("speedup_vs:") and r.get("note")]


def worst_spread(rows: List[Dict[str, Any]]) -> float:
    """The widest ratio spread in one case's rows (0 when it has no ratio)."""
    return max((r["value"] for r in rows if r["metric"].startswith("speedup_spread_pct_vs:")),
               default=0.0)


def add_ceiling_fractions(rows: List[Dict[str, Any]], ceilings: Dict[str, float]) -> None:
    """Append % of the measured GEMM peak (tflops) and copy bandwidth (gbps) to `rows`."""
    extra = []
    for r in rows:
        if r["op"] == "ceiling":
            continue
        if r["metric"] == "tflops" and ceilings.get("gemm_tflops"):
            name = "mfu_pct" if r["op"] == "model" else "pct_gemm_peak"
            extra.append({**r, "metric": name, "value": 100 * r["value"] / ceilings["gemm_tflops"]})
        if r["metric"] == "gbps" and ceilings.get("copy_gbps"):
            extra.append({**r, "metric": "pct_copy_bw",
                          "value": 100 * r["value"] / ceilings["copy_gbps"]})
    rows.extend(extra)


def write_csv(path: str, rows: List[Dict[str, Any]], meta: Dict[str, str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            value = r["value"]
            if isinstance(value, float):
                value = f"{value:.6g}"
            writer.writerow({**meta, "note": "", **r, "value": value})
    os.replace(tmp, path)  # a run killed mid-write never leaves a truncated CSV
