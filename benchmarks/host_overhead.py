"""Host overhead of the Triton path: one BERT-base layer's fastbert ops with the device work stubbed.

    python -m benchmarks.host_overhead [--json]

Times, on the CPU, what Python does per layer before any GPU work is queued: argument checks,
backend choice, custom-op and autograd dispatch, output allocation, mask metadata, launcher
arithmetic. Every Triton kernel launch (`kernel[grid](...)`, on JITFunction and Autotuner alike)
and the backward's two torch.matmul GEMMs are replaced by no-ops, so the time is host work only
and does not depend on the token count. Left out: Triton's own launcher (argument binding,
specialisation key, driver call; needs a GPU), the cuBLAS launches those GEMMs would make, and the
model's three nn.Linear projections (plain torch, not fastbert's path).

The layer's fastbert ops, as fastbert/model.py calls them: attention (padded with a key mask, or
varlen), add_layer_norm after attention, linear_bias_gelu, add_layer_norm after the FFN.
Inference runs under no_grad without dropout; training is forward + backward with dropout 0.1.
Also counted: the torch ops dispatched per layer (TorchDispatchMode sees each top-level aten op
and each fastbert custom op once) and, among them, the host synchronisations (.item() and the
like, which stall the host until the GPU catches up and break CUDA-graph capture).

Also measured, whole models (`model_rows`): Python calls and host µs per forward and per layer of
a tiny BERT through fastbert's BertModel (its lean path, fastbert/lean.py, on the Triton backend
with launches stubbed) and through transformers' BertModel (sdpa), inference and training.

On a machine without a GPU the Triton backend takes CPU tensors only under TRITON_INTERPRET=1,
which must be set before triton is imported, so `run_in_subprocess` runs this module in its own
process; the stubs mean the interpreter never runs a kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

# µs per BERT-base layer. At S=128 a layer's GPU work in bf16 on an H100-class GPU is
# ~0.3 ms forward + backward for a 32 x 128 token batch (~26 GFLOP forward at ~40 % of peak) and
# much less for small batches, so the host must stay well below that to keep the GPU fed
# without CUDA graphs.
TARGET_US = {"infer fwd": 60.0, "train fwd+bwd": 150.0}
HIDDEN, HEADS, HEAD_DIM, FFN = 768, 12, 64, 3072
BATCH, SEQ = 2, 8  # tiny: with the device work stubbed, sizes only change allocation sizes


def _no_launch(*args, **kwargs):
    return None


@contextlib.contextmanager
def stubbed_device_work():
    """No Triton kernel runs and torch.matmul only allocates its result."""
    from triton.runtime.jit import KernelInterface

    launch, matmul = KernelInterface.__getitem__, torch.matmul
    KernelInterface.__getitem__ = lambda self, grid: _no_launch
    torch.matmul = lambda a, b: a.new_empty(a.shape[:-1] + b.shape[-1:])
    try:
        yield
    finally:
        KernelInterface.__getitem__, torch.matmul = launch, matmul


def layer_inputs(device, dtype, varlen: bool) -> dict:
    def leaf(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    tokens = BATCH * SEQ
    lead = (tokens,) if varlen else (BATCH, SEQ)
    t = dict(
        qkv=leaf(*lead, 3, HEADS, HEAD_DIM),  # stands for the qkv projection's output
        x=leaf(*lead, HIDDEN),  # the layer input (the first residual)
        attn_out=leaf(*lead, HIDDEN),  # stands for attn_out(y): not fastbert's op
        ffn_out=leaf(*lead, HIDDEN),  # stands for ffn_out(f)
        ln1_w=leaf(HIDDEN), ln1_b=leaf(HIDDEN), ln2_w=leaf(HIDDEN), ln2_b=leaf(HIDDEN),
        w1=leaf(FFN, HIDDEN), b1=leaf(FFN),
    )
    if varlen:
        lengths = torch.full((BATCH,), SEQ, dtype=torch.int32)
        t["cu_seqlens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(
            device=device, dtype=torch.int32)
    else:
        t["mask"] = torch.ones(BATCH, SEQ, dtype=torch.bool, device=device)
        t["mask"][0, SEQ // 2:] = False
    return t


def layer_ops(t: dict, varlen: bool, dropout_p: float):
    """The fastbert calls of one BertLayer.forward; returns the outputs to differentiate."""
    import fastbert

    q, k, v = t["qkv"].unbind(-3)
    if varlen:
        y = fastbert.attention_varlen(q, k, v, t["cu_seqlens"], t["cu_seqlens"], SEQ, SEQ,
                                      dropout_p=dropout_p, backend="triton")
    else:
        y = fastbert.attention(q, k, v, t["mask"], dropout_p=dropout_p, backend="triton")
    h = fastbert.add_layer_norm(t["attn_out"], t["x"], t["ln1_w"], t["ln1_b"], 1e-12,
                                dropout_p=dropout_p, backend="triton")
    f = fastbert.linear_bias_gelu(h, t["w1"], t["b1"], backend="triton")
    out = fastbert.add_layer_norm(t["ffn_out"], h, t["ln2_w"], t["ln2_b"], 1e-12,
                                  dropout_p=dropout_p, backend="triton")
    return [y, f, out]


def _step(t, varlen, mode) -> Callable[[], None]:
    if mode == "infer fwd":
        def run():
            with torch.no_grad():
                layer_ops(t, varlen, 0.0)
        return run

    def run():
        outputs = layer_ops(t, varlen, 0.1)
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        for value in t.values():
            value.grad = None
    return run


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _python_calls(step) -> int:
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


# The whole model through fastbert's lean path (fastbert/lean.py) against transformers' BertModel
# (sdpa) on the same input: a tiny BERT, so the GEMMs nn.Linear runs for real are microseconds.
MODEL_CONFIG = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                    max_position_embeddings=64)
MODEL_LAYERS = (2, 4)  # the per-layer numbers are the difference between these depths
MODEL_SHAPE = "tiny BERT hidden 64, B4 S16 (1 padded row)"


def _model_step(model, ids, mask, mode) -> Callable[[], None]:
    if mode == "infer fwd":
        def run():
            with torch.no_grad():
                model(ids, attention_mask=mask)
        return run

    def run():  # gradients accumulate: resetting them would count the parameters() walk
        model(ids, attention_mask=mask)[0].sum().backward()
    return run


def _fastest_us(step, rounds: int, iters: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(iters):
            step()
        best = min(best, (time.process_time() - start) / iters * 1e6)
    return best


def model_rows(device: torch.device, rounds: int = 10, iters: int = 10) -> List[dict]:
    """Python calls and host µs per forward and per layer of whole models: fastbert's BertModel
    on the Triton backend (launches stubbed as above), transformers' BertModel (sdpa, its own
    kernels) and that model under patch_hf (Triton backend, stubbed), inference and training
    (dropout 0.1)."""
    import transformers

    import fastbert
    from fastbert.model import BertConfig, BertModel

    torch.manual_seed(0)
    ids = torch.randint(1, 100, (4, 16), device=device)
    mask = torch.ones(4, 16, dtype=torch.long, device=device)
    mask[1, 10:] = 0
    makers = {
        "fastbert-triton": lambda n: BertModel(BertConfig(**MODEL_CONFIG, num_hidden_layers=n)),
        "transformers-sdpa": lambda n: transformers.BertModel(transformers.BertConfig(
            **MODEL_CONFIG, num_hidden_layers=n, attn_implementation="sdpa")),
        # the drop-in: the same transformers model, patched (its lean path, fastbert/hf_lean.py)
        "patch_hf-triton": lambda n: fastbert.patch_hf(transformers.BertModel(
            transformers.BertConfig(**MODEL_CONFIG, num_hidden_layers=n,
                                    attn_implementation="sdpa"))),
    }
    rows = []
    previous = fastbert.get_backend()
    fastbert.set_backend("triton")  # fastbert's GPU path, on CPU tensors under TRITON_INTERPRET
    try:
        for provider, make in makers.items():
            for mode in TARGET_US:
                def row(metric, value, note=""):
                    rows.append(dict(op="host_overhead", provider=provider, mode=mode,
                                     shape=MODEL_SHAPE, metric=metric, value=value, note=note))
                calls, us = {}, {}
                for n in MODEL_LAYERS:
                    model = make(n).to(device).train(mode != "infer fwd")
                    step = _model_step(model, ids, mask, mode)
                    with stubbed_device_work():
                        try:
                            step(), step()
                        except (ValueError, TypeError, NotImplementedError) as e:
                            row("status", "unsupported",
                                f"{type(e).__name__}: {str(e).splitlines()[0]}")
                            break
                        calls[n] = _python_calls(step)
                        us[n] = _fastest_us(step, rounds, iters)
                else:
                    few, many = MODEL_LAYERS
                    row("python_calls", calls[many], f"per forward{'+backward' * (mode != 'infer fwd')}, "
                                                     f"{many} layers")
                    row("python_calls_per_layer", (calls[many] - calls[few]) / (many - few),
                        f"({many} layers - {few} layers) / {many - few}")
                    row("host_us_per_layer", round((us[many] - us[few]) / (many - few), 1),
                        f"process CPU time, fastest of {rounds} rounds x {iters} calls, "
                        f"({many} - {few} layers) / {many - few}")
    finally:
        fastbert.set_backend(previous)
    return rows


def calibration_us(repeat: int = 30, number: int = 1000) -> float:
    """µs per `tensor.view` call on this host, fastest of `repeat` rounds: a yardstick for the
    host numbers (a few hundred ns on an idle modern x86 core)."""
    x = torch.empty(16, 768)
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            x.view(2, 8, 768)
        best = min(best, (time.process_time() - start) / number * 1e6)
    return best


def measure(device: torch.device, rounds: int = 30, iters: int = 20) -> List[dict]:
    """Rows in the benchmark CSV's format (op, provider, mode, shape, metric, value, note)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # One thread: the host path is serial, and on CPU tensors a parallel fill_ of the tiny
    # gradient buffers would wait for busy cores (measured: 50 ms for 16 x 3072 on a loaded box)
    torch.set_num_threads(1)
    rows = []
    for varlen in (False, True):
        shape = f"bert-base layer {'varlen' if varlen else 'padded mask'} H{HEADS} D{HEAD_DIM}"
        for mode in TARGET_US:
            def row(metric, value, note=""):
                rows.append(dict(op="host_overhead", provider="fastbert-triton", mode=mode,
                                 shape=shape, metric=metric, value=value, note=note))
            t = layer_inputs(device, dtype, varlen)
            step = _step(t, varlen, mode)
            with stubbed_device_work():
                try:
                    step()
                except (ValueError, TypeError, NotImplementedError) as e:
                    row("status", "unsupported", f"{type(e).__name__}: {str(e).splitlines()[0]}")
                    continue
                for _ in range(20):
                    step()
                per_call = []
                for _ in range(rounds):
                    # CPU time of this process: on a shared machine, time spent descheduled
                    # would otherwise count as overhead
                    start = time.process_time()
                    for _ in range(iters):
                        step()
                    per_call.append((time.process_time() - start) / iters * 1e6)
                counter = _CountOps()
                with counter:
                    step()
                python_calls = _python_calls(step)
            # the fastest round: on a shared (virtual) machine, preemption and stolen cycles only
            # ever add time, and they add plenty; the median says how much
            us, median = min(per_call), statistics.median(per_call)
            row("status", "ok")
            row("host_us", round(us, 2), f"process CPU time, fastest of {rounds} rounds x "
                                         f"{iters} calls (median {median:.0f} us)")
            row("target_us", TARGET_US[mode],
                "within target" if us <= TARGET_US[mode] else
                f"{us / TARGET_US[mode]:.1f}x the target")
            row("python_calls", python_calls,
                "Python and C function calls per layer (sys.setprofile): machine-independent")
            syncs = counter.ops.get("aten._local_scalar_dense", 0)
            row("host_syncs", syncs, "aten._local_scalar_dense: a device-to-host copy (.item())")
            row("dispatched_ops", sum(counter.ops.values()),
                " ".join(f"{k}:{v}" for k, v in sorted(counter.ops.items(), key=lambda kv: -kv[1])))
    rows += model_rows(device)
    rows.append(dict(op="host_overhead", provider="tensor.view", mode="calibration",
                     shape="16x768 -> 2x8x768", metric="host_us", value=round(calibration_us(), 3),
                     note="one view call: scales the host numbers above to another host"))
    return rows


def run_in_subprocess(device: torch.device, timeout: float = 300) -> List[dict]:
    """measure() in a fresh process (TRITON_INTERPRET=1 on CPU, set before triton loads)."""
    env = dict(os.environ)
    if device.type != "cuda":
        env["TRITON_INTERPRET"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--json",
                               "--device", device.type], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        return _failed((proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _failed(note: str) -> List[dict]:
    return [dict(op="host_overhead", provider="fastbert-triton", mode=mode,
                 shape="bert-base layer", metric="status", value="failed", note=note)
            for mode in TARGET_US]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return subprocess.call([sys.executable, "-m", "benchmarks.host_overhead",
                                *(argv if argv is not None else sys.argv[1:])],
                               env=dict(os.environ, TRITON_INTERPRET="1"))
    rows = measure(device)
    print(json.dumps(rows) if args.json else summary(rows))
    return 0


def summary(rows: List[dict]) -> str:
    """One line per layer path and mode: µs against the target, syncs, ops dispatched."""
    by_case: Dict[tuple, dict] = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["mode"]), {})[r["metric"]] = r
    lines = ["host overhead per layer (Triton path, device work stubbed; process CPU time):",
             "  target: the host time per BERT-base layer under which an H100-class GPU stays busy "
             "without CUDA graphs; it matters on a GPU (on a CPU-only machine it is a forecast, "
             "not a failure)"]
    for (shape, mode), m in by_case.items():
        if shape == MODEL_SHAPE:
            continue  # per provider, below
        if "host_us" not in m:
            status = m.get("status", {})
            lines.append(f"  {shape} {mode}: {status.get('value')} {status.get('note', '')}")
        elif "target_us" not in m:  # the calibration
            lines.append(f"  {m['host_us']['provider']} {shape}: {m['host_us']['value']} us")
        else:
            lines.append(f"  {shape:36s} {mode:14s} {m['host_us']['value']:9.1f} us "
                         f"(target {m['target_us']['value']:g}: {m['target_us']['note']}), "
                         f"{m['dispatched_ops']['value']} torch ops, "
                         f"{m['host_syncs']['value']} host syncs, "
                         f"{m['python_calls']['value']} Python calls")
    models = [r for r in rows if r["shape"] == MODEL_SHAPE]
    if models:
        lines.append(f"whole models, {MODEL_SHAPE} (fastbert: lean path, Triton launches stubbed):")
    by_model: Dict[tuple, dict] = {}
    for r in models:
        by_model.setdefault((r["provider"], r["mode"]), {})[r["metric"]] = r
    for (provider, mode), m in by_model.items():
        if "python_calls" not in m:
            status = m.get("status", {})
            lines.append(f"  {provider:18s} {mode:14s} {status.get('value')} "
                         f"{status.get('note', '')}")
            continue
        lines.append(f"  {provider:18s} {mode:14s} {m['python_calls']['value']:6d} Python calls "
                     f"per forward{'+backward' * (mode != 'infer fwd')} "
                     f"({m['python_calls_per_layer']['value']:g} per layer), "
                     f"{m['host_us_per_layer']['value']:g} us per layer")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
