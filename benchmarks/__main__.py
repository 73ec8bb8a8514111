"""python -m benchmarks [--quick] [--only ops|model|embeddings] [--out DIR]

Times fastbert against what users run today, on this machine's device, side by side in one run,
and writes <out>/<device>.csv, PNG plots and a table of ratios with their spread. See
benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

if __name__ == "__main__":
    # Before torch loads OpenMP: its workers otherwise spin-wait after every parallel region, and
    # on a CPU shared with other jobs a spinning worker waits out its time slice for a partner
    # that was descheduled. Measured on the 2-core dev machine under load, BERT inference at 2
    # threads ran 1.6-2.4x faster with passive waiting; ONNX Runtime's workers are set to the same
    # policy (benchmarks/providers.py). An OMP_WAIT_POLICY already set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from benchmarks import harness, host_overhead, report, small_batch
from benchmarks.embeddings import embedding_cases, sentence_count
from benchmarks.models import model_cases
from benchmarks.modernbert import modernbert_cases
from benchmarks.providers import cpu_gemm_cases
from benchmarks.suite import ceiling_cases, op_cases, sizes

# Outside the package source, so a run never overwrites the committed results in
# benchmarks/results (written there only with an explicit --out benchmarks/results).
DEFAULT_OUT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "fastbert", "benchmarks")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true",
                   help="headline shapes only (how long it takes: benchmarks/README.md)")
    p.add_argument("--sweeps", action="store_true",
                   help="CPU --quick: also the sequence-length sweeps (attention S=128-512, "
                        "bert-mini S=64-256); the full run always has them")
    p.add_argument("--tiny", action="store_true", help="toy shapes, seconds (a smoke test)")
    p.add_argument("--only", choices=["ops", "model", "embeddings", "cpu-gemm"],
                   help="run only the op, the model or the sentence-embedding benchmarks, or the "
                        "CPU inference GEMM variants of fastbert/cpu.py")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder (default: {DEFAULT_OUT}; the committed results are "
                        f"written only with --out benchmarks/results)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include the torch.compile baselines (default: on GPU yes, on CPU no)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is the steadier "
                        "measurement on a machine shared with other jobs")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new cases after this long; the rest are recorded as skipped")
    p.add_argument("--repeats", type=int, default=2, metavar="N",
                   help=f"time a case whose ratio spread is wider than {harness.UNSTABLE_PCT:g} %% "
                        f"up to N more times while the budget lasts, keeping its steadiest run "
                        f"(default 2)")
    return p.parse_args(argv)


def plan(device: torch.device, cfg: dict, only: Optional[str]) -> List[harness.Case]:
    """Ceilings first (every fraction needs them), the headline shapes next, the long sweep last."""
    cases = ceiling_cases(device, cfg)
    ops = op_cases(device, cfg) if only in (None, "ops") else {}
    cases += ops.get("attention", []) + ops.get("add_layer_norm", []) + ops.get("linear_bias_gelu", [])
    if only in (None, "model"):
        cases += model_cases(device, cfg) + modernbert_cases(device, cfg)
    if only == "cpu-gemm":  # the CPU inference GEMM choices of fastbert/cpu.py, on request only
        cases += cpu_gemm_cases(device)
    if only in (None, "embeddings"):
        cases += embedding_cases(device, cfg)
    cases += ops.get("attention_sweep", [])
    return cases


def finalize(rows, ceilings):
    out = list(rows)
    harness.add_ceiling_fractions(out, ceilings)
    return out


def repeat_unstable(cases, case_rows, device, timing, repeats, deadline, on_update) -> int:
    """Time again the cases with an unstable ratio, up to `repeats` more times each while the
    deadline allows; a case keeps its run with the narrowest worst ratio spread. Prints a line
    per case re-timed. Returns how many extra runs were made."""
    extra = 0
    for attempt in range(1, repeats + 1):
        todo = [i for i, rows in enumerate(case_rows) if rows and harness.unstable_speedups(rows)]
        for n, i in enumerate(todo, 1):
            case, rows = cases[i], case_rows[i]
            if deadline is not None and time.monotonic() > deadline:
                return extra
            print(f"  re-timing {n}/{len(todo)} (run {attempt + 1}): {case.op} {case.mode} {case.shape}, "
                  f"widest ratio spread {harness.worst_spread(rows):.0f} %", flush=True)
            start = time.monotonic()
            again = harness.run_case(case, device, timing)
            again.append(_case_time(case, time.monotonic() - start))
            extra += 1
            if harness.worst_spread(again) < harness.worst_spread(rows):
                rows = again
            for r in rows:
                if r["metric"] == "status" and r["value"] == "ok":
                    r["note"] = f"steadiest of {attempt + 1} runs"
            case_rows[i] = rows
            on_update()
    return extra


def _case_time(case, seconds: float) -> dict:
    """The row recording how long a case took (the run's duration is the sum, plus startup)."""
    return dict(op=case.op, provider="*", mode=case.mode, shape=case.shape, metric="case_wall_s",
                value=round(seconds, 1), note="wall time of the case, every provider")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> int:
    from tqdm import tqdm

    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = sizes(device, preset, args.sweeps)
    cfg["embedding_sentences"] = sentence_count(device, preset)
    if args.compile is not None:
        cfg["compile"] = args.compile
    if device.type == "cuda":
        # fair GEMMs: bf16 everywhere; TF32 would only matter for fp32 inputs
        torch.backends.cuda.matmul.allow_tf32 = False

    meta = harness.run_metadata(device, preset)
    stem = harness.slug(meta["device"])
    csv_path = os.path.join(args.out, f"{stem}.csv")
    cases = plan(device, cfg, args.only)
    print(f"fastbert benchmarks ({preset}) on {meta['device']}: {len(cases)} cases, "
          f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; writing to {args.out}")
    # enough rounds for a spread (IQR over rounds); about the same time per provider as before
    timing = {"full": harness.Timing(rounds=7, warmup_ms=25, rep_ms=50, cpu_min_s=0.4),
              "quick": harness.Timing(rounds=5, warmup_ms=10, rep_ms=20, cpu_min_s=0.15),
              "tiny": harness.Timing(rounds=3, warmup_ms=5, rep_ms=10, cpu_min_s=0.02)}[preset]

    ceilings, params = {}, {}
    case_rows: List[Optional[list]] = [None] * len(cases)
    skipped: List[dict] = []

    def all_rows():
        return [r for rows in case_rows if rows for r in rows] + skipped

    def save():  # partial results survive a kill
        harness.write_csv(csv_path, finalize(all_rows(), ceilings), meta)

    deadline = time.monotonic() + args.budget if args.budget else None
    bar = tqdm(cases, unit="case", dynamic_ncols=True, mininterval=1.0)
    for i, case in enumerate(bar):
        bar.set_postfix_str(f"{case.op} {case.mode} {case.shape}")
        params[(case.op, case.mode, case.shape)] = case.params
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(dict(op=case.op, provider="*", mode=case.mode, shape=case.shape,
                                metric="status", value="skipped",
                                note=f"not started: time budget of {args.budget:.0f} s used up"))
            continue
        start = time.monotonic()
        case_rows[i] = harness.run_case(case, device, timing)
        case_rows[i].append(_case_time(case, time.monotonic() - start))
        if case.op == "ceiling":
            for r in case_rows[i]:
                if r["metric"] in ("tflops", "gbps"):
                    ceilings["gemm_tflops" if r["metric"] == "tflops" else "copy_gbps"] = r["value"]
        save()
    bar.close()
    unstable = sum(1 for rows in case_rows if rows and harness.unstable_speedups(rows))
    if unstable and args.repeats > 0:
        print(f"{unstable} case(s) with a ratio spread over {harness.UNSTABLE_PCT:g} %: timing "
              f"them again (up to {args.repeats} more runs each)")
        repeat_unstable(cases, case_rows, device, timing, args.repeats, deadline, save)
    rows = all_rows()
    if preset != "tiny" and args.only in (None, "ops") and (deadline is None
                                                            or time.monotonic() < deadline):
        host = host_overhead.run_in_subprocess(device)  # its own process: see its docstring
        print(host_overhead.summary(host))
        rows += host
    if device.type == "cuda" and preset != "tiny" and args.only in (None, "model") and (
            deadline is None or time.monotonic() < deadline):
        small = small_batch.measure(device, preset, deadline)  # its own timer: see its docstring
        print(small_batch.table(small))
        rows += small

    final = finalize(rows, ceilings)
    harness.write_csv(csv_path, final, meta)
    print(report.ratio_table(final))
    try:
        plots = report.plot_all(final, params, args.out, stem)
    except ImportError as e:  # matplotlib is an optional (bench) dependency
        plots = []
        print(f"no plots: {e}")
    print("\nwrote " + ", ".join([csv_path] + plots))
    print(f"took {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
