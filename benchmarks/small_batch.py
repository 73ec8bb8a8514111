"""Small-batch inference latency (issue 22 part 4): BERT-base on 1, 8 or 32 texts of 16-128 tokens,
where the host, not the GPU, sets the speed.

    python -m benchmarks.small_batch [--preset quick|full|tiny] [--budget SECONDS] [--csv PATH]

Latency is what a caller waits for one batch: host wall clock from the call to the end of
torch.cuda.synchronize() (inputs already on the device), median over every call of every round;
rounds interleave the providers. (triton.testing.do_bench, the suite's GPU timer, flushes L2
before each call, and the host queues the next call's launches while that flush runs: it hides
up to the flush's length of host time, which is what this benchmark is about.)

Providers, all with the same bf16 weights (fp32 on CPU) and the same texts (real lengths 40-100 %
of S, transformers' inputs padded to S with an attention mask):
  transformers-eager, transformers-sdpa     BertModel as users run it
  transformers-sdpa+compile-ro              torch.compile(mode="reduce-overhead", dynamic=False)
                                            of the sdpa model: one compile and CUDA graph per shape
  fastbert-eager                            fastbert's BertModel through the public ops (lean path
                                            off: lean.plan returns None)
  fastbert-lean                             its default path (fastbert/lean.py)
  fastbert-cuda_graphs                      fastbert.cuda_graphs(model): the texts arrive packed
                                            (ids (1, T), cu_seqlens), as SentenceEncoder packs them
  fastbert-triton-lean[-ordinary-launch]    the lean path on the all-Triton backend, with the
                                            pre-bound launches (fastbert/triton/launch.py) and
                                            without them (Triton's JITFunction.run per launch)
fastbert's providers use the default backend choice ("auto") unless named "triton"; on a CPU
they run the torch backend, and the CUDA-only providers record why they did not run.
The compiled provider goes last, shape by shape, so a time budget cuts compiles first.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks.harness import Unsupported
from benchmarks.suite import MODELS, lengths_to_mask, padded_lengths

# (batch, S) per preset; S is the padded length, texts are 40-100 % of it. "check" is
# scripts/gpu_check.sh's, sized for its ~100 s stage; "tiny" a CPU smoke test.
SHAPES = {"full": [(b, s) for b in (1, 8, 32) for s in (16, 32, 64, 128)],
          "quick": [(b, s) for b in (1, 8, 32) for s in (16, 128)],
          "check": [(1, 16), (8, 64), (32, 128)],
          "tiny": [(1, 16), (4, 32)]}
# torch.compile takes ~0.5-1 min a shape for BERT-base (an estimate): quick runs compile fewer
COMPILE_SHAPES = {"full": SHAPES["full"], "quick": [(1, 16), (32, 128)], "check": [(8, 64)],
                  "tiny": [(1, 16)]}
MODEL = {"full": "bert-base", "quick": "bert-base", "check": "bert-base", "tiny": "bert-tiny"}
# a compile is started only with this long left before the deadline (BERT-base on an H100-class
# GPU: estimate, not measured here)
COMPILE_S = 90.0
CALLS = {"full": 30, "quick": 15, "check": 10, "tiny": 3}  # timed calls per provider per round
ROUNDS = {"full": 5, "quick": 3, "check": 2, "tiny": 2}
COMPILED = "transformers-sdpa+compile-ro"


def shape_label(model: str, batch: int, seqlen: int) -> str:
    return f"{model} B{batch} S{seqlen}"


class Inputs:
    """One batch of texts, padded (ids, mask) for the model forward and packed for the graphs."""

    def __init__(self, model: str, batch: int, seqlen: int, device: torch.device):
        vocab = MODELS[model].get("vocab_size", 30522)
        g = torch.Generator().manual_seed(batch * 1000 + seqlen)
        self.lengths = padded_lengths(batch, seqlen, g)
        mask = lengths_to_mask(self.lengths, seqlen, "cpu")
        ids = torch.randint(1, vocab, (batch, seqlen), generator=g).masked_fill(~mask, 0)
        self.ids, self.mask = ids.to(device), mask.long().to(device)
        self.packed_ids = ids[mask].view(1, -1).to(device)
        offsets = torch.tensor([0] + self.lengths).cumsum(0)
        self.cu_seqlens = offsets.to(device=device, dtype=torch.int32)
        self.max_seqlen = max(self.lengths)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _public_ops():
    """fastbert's forward without the lean path: every op through its public entry point."""
    from fastbert import lean
    plan = lean.plan
    lean.plan = lambda *args: None
    try:
        yield
    finally:
        lean.plan = plan


@contextlib.contextmanager
def _ordinary_launches():
    from fastbert.triton import launch
    enabled = launch.enabled
    launch.enabled = False
    try:
        yield
    finally:
        launch.enabled = enabled


class Models:
    """Each model built once for every shape (weights shared as in benchmarks/models.py)."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self._built: Dict[str, torch.nn.Module] = {}

    def get(self, name: str) -> torch.nn.Module:
        if name not in self._built:
            from benchmarks.models import _fastbert_model, _hf_model
            if name == "fastbert":
                net = _fastbert_model(self.model, self.device, self.dtype)
            else:
                net = _hf_model(self.model, self.device, self.dtype, name)
            self._built[name] = net.eval()
        return self._built[name]


def provider_calls(models: Models, inputs: Inputs) -> Dict[str, Callable[[], Callable[[], object]]]:
    """name -> setup() returning the call to time (raises Unsupported where it cannot run)."""
    device = models.device
    on_gpu = device.type == "cuda"
    default_backend = "auto" if on_gpu else "torch"

    def hf(attn):
        def setup():
            net = models.get(attn)
            return lambda: net(input_ids=inputs.ids, attention_mask=inputs.mask).last_hidden_state
        return setup

    def compiled():
        if not on_gpu:
            raise Unsupported("torch.compile(mode='reduce-overhead') captures CUDA graphs: "
                              "GPU only")
        torch._dynamo.reset()  # one shape at a time: no recompile limit reached
        net = torch.compile(models.get("sdpa"), mode="reduce-overhead", dynamic=False)
        return lambda: net(input_ids=inputs.ids, attention_mask=inputs.mask).last_hidden_state

    def fastbert(backend, context=contextlib.nullcontext):
        def setup():
            import fastbert as fb
            from benchmarks.providers import require_fastbert
            require_fastbert(backend)
            net = models.get("fastbert")

            def call():
                fb.set_backend(backend)  # fixed per call: providers are interleaved
                with context():
                    return net(input_ids=inputs.ids, attention_mask=inputs.mask).last_hidden_state
            return call
        return setup

    def graphed():
        if not on_gpu:
            raise Unsupported("CUDA graphs: GPU only")
        import fastbert as fb
        if "graphs" not in models._built:  # one encoder: its graphs serve every shape's bucket
            models._built["graphs"] = fb.cuda_graphs(models.get("fastbert"), max_batch=32,
                                                     max_tokens=4096)
        encoder = models._built["graphs"]

        def call():
            fb.set_backend(default_backend)
            return encoder(inputs.packed_ids, inputs.cu_seqlens, inputs.max_seqlen)
        return call

    providers = {
        "transformers-eager": hf("eager"),
        "transformers-sdpa": hf("sdpa"),
        "fastbert-eager": fastbert(default_backend, _public_ops),
        "fastbert-lean": fastbert(default_backend),
        "fastbert-cuda_graphs": graphed,
    }
    if on_gpu:
        providers["fastbert-triton-lean"] = fastbert("triton")
        providers["fastbert-triton-lean-ordinary-launch"] = fastbert("triton", _ordinary_launches)
    providers[COMPILED] = compiled
    return providers


def _time_calls(fn: Callable[[], object], device: torch.device, calls: int) -> List[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(device: torch.device, preset: str = "quick", deadline: Optional[float] = None,
            progress: Callable[[str], None] = lambda line: None,
            compile_s: float = COMPILE_S) -> List[dict]:
    """Rows (op "small-batch", mode "infer", metric latency_ms or status) for every shape and
    provider of the preset; shapes not started before `deadline` (time.monotonic()), and
    compiles with less than `compile_s` left before it, are recorded as skipped."""
    model = MODEL[preset]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = Models(model, device, dtype)
    rows: List[dict] = []

    def row(provider, shape, metric, value, note=""):
        rows.append(dict(op="small-batch", provider=provider, mode="infer", shape=shape,
                         metric=metric, value=value, note=note))
        if metric == "latency_ms":
            progress(f"{shape:22s} {provider:38s} {value:8.3f} ms")
        else:
            progress(f"{shape:22s} {provider:38s} {value}: {note}")

    def late(shape, providers, why):
        for name in providers:
            row(name, shape, "status", "skipped", why)

    phases: List[Tuple[List[str], List[Tuple[int, int]]]] = [
        (["*"], SHAPES[preset]), ([COMPILED], COMPILE_SHAPES[preset])]
    for wanted, shapes in phases:
        for batch, seqlen in shapes:
            shape = shape_label(model, batch, seqlen)
            inputs = Inputs(model, batch, seqlen, device)
            providers = {name: setup for name, setup in provider_calls(models, inputs).items()
                         if (name == COMPILED) == (wanted == [COMPILED])}
            needs = compile_s if wanted == [COMPILED] else 0.0
            if deadline is not None and time.monotonic() > deadline - needs:
                late(shape, providers, "not started: time budget used up")
                continue
            live = {}
            for name, setup in providers.items():
                try:
                    with torch.inference_mode() if name != COMPILED else torch.no_grad():
                        fn = setup()
                        for _ in range(3):  # warm-up: compiles, autotuning, graph capture
                            fn()
                    _sync(device)
                    live[name] = fn
                except Unsupported as e:
                    row(name, shape, "status", "unsupported", str(e))
                except Exception as e:  # a provider that breaks is reported, not fatal
                    row(name, shape, "status", "error", f"{type(e).__name__}: {e}"[:240])
            samples: Dict[str, List[float]] = {name: [] for name in live}
            for _ in range(ROUNDS[preset]):
                for name, fn in live.items():
                    with torch.inference_mode() if name != COMPILED else torch.no_grad():
                        samples[name] += _time_calls(fn, device, CALLS[preset])
            for name, times in samples.items():
                row(name, shape, "latency_ms", statistics.median(times),
                    f"median of {len(times)} calls; {len(inputs.lengths)} texts, "
                    f"{sum(inputs.lengths)} tokens")
    return rows


def table(rows: List[dict]) -> str:
    """One line per shape: ms per provider (columns in the providers' order)."""
    latency = [r for r in rows if r["metric"] == "latency_ms"]
    providers = list(dict.fromkeys(r["provider"] for r in latency))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    short = {p: p.replace("transformers", "hf").replace("fastbert", "fb")
             .replace("-ordinary-launch", "-ordinary") for p in providers}
    lines = ["small-batch inference latency, ms (median; host call to synchronize):",
             f"{'shape':22s} " + " ".join(f"{short[p]:>14s}" for p in providers)]
    for shape in shapes:
        got = {r["provider"]: r["value"] for r in latency if r["shape"] == shape}
        lines.append(f"{shape:22s} " + " ".join(
            f"{got[p]:14.3f}" if p in got else f"{'-':>14s}" for p in providers))
    missing = [r for r in rows if r["metric"] == "status"]
    for reason in dict.fromkeys(f"{r['provider']}: {r['value']} ({r['note']})" for r in missing):
        lines.append("  " + reason[:160])
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_batch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(SHAPES), default="quick")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new shape after this long")
    p.add_argument("--compile-seconds", type=float, default=COMPILE_S,
                   help="start a torch.compile only with this long left of the budget")
    p.add_argument("--csv", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    deadline = time.monotonic() + args.budget if args.budget else None
    rows = measure(device, args.preset, deadline, progress=lambda line: print(line, flush=True),
                   compile_s=args.compile_seconds)
    print(table(rows))
    if args.csv:
        from benchmarks import harness
        meta = harness.run_metadata(device, f"small-batch-{args.preset}")
        harness.write_csv(args.csv, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
