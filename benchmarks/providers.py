"""The alternatives a user would pick, as functions of the same inputs, and how to time them.

Each op benchmark gives every provider the same input sets. `timed(forward, input_sets, mode)`
turns a provider's forward into the function the harness times:
  fwd      forward only, under no_grad (the inference path)
  bwd      backward only: forwards are run once at setup, each call differentiates one graph again
  fwd+bwd  forward, then the gradients of every input that requires grad
Gradients come from torch.autograd.grad, so nothing accumulates into .grad between calls.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.harness import Skipped, Unsupported, rotate

InputSet = Tuple[tuple, Tensor]  # (forward arguments, output gradient)


def _leaves(args) -> List[Tensor]:
    return [a for a in args if isinstance(a, Tensor) and a.requires_grad]


def _forward_no_grad(forward, args):
    with torch.no_grad():
        return forward(*args)


def _forward_backward(forward, args, dout):
    # allow_unused: the GEMM-only floor ignores the bias it is handed
    return torch.autograd.grad(forward(*args), _leaves(args), dout, allow_unused=True)


def timed(forward: Callable[..., Tensor], input_sets: Sequence[InputSet], mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        return rotate([functools.partial(_forward_no_grad, forward, args) for args, _ in input_sets])
    if mode == "fwd+bwd":
        return rotate([functools.partial(_forward_backward, forward, args, dout)
                       for args, dout in input_sets])
    if mode == "bwd":
        calls = [functools.partial(torch.autograd.grad, forward(*args), _leaves(args), dout,
                                   retain_graph=True, allow_unused=True)
                 for args, dout in input_sets]
        return rotate(calls)
    raise ValueError(f"timed: argument 'mode' expected fwd, bwd or fwd+bwd, got {mode!r}")


# --------------------------------------------------------------------------------------------
# fastbert
# --------------------------------------------------------------------------------------------

def fastbert_backend_reason(backend: str) -> str | None:
    """Why a fastbert backend cannot load at all here (the per-input check happens in the op)."""
    if backend == "cuda":
        try:
            from fastbert import cuda
        except ImportError as e:
            return f"fastbert.cuda cannot be imported: {e}"
        return cuda.unavailable_reason()
    if backend == "triton":
        try:
            import fastbert.triton  # noqa: F401
        except ImportError as e:
            return f"fastbert.triton cannot be imported: {e}"
    return None


def require_fastbert(backend: str) -> None:
    reason = fastbert_backend_reason(backend)
    if reason is not None:
        raise Unsupported(reason)


# --------------------------------------------------------------------------------------------
# attention: q, k, v (B, S, H, D), mask (B, S) bool True = real token, or None
# --------------------------------------------------------------------------------------------

def attention_fastbert(backend: str, causal: bool):
    import fastbert
    require_fastbert(backend)
    return lambda q, k, v, mask: fastbert.attention(q, k, v, mask, causal=causal, backend=backend)


def attention_varlen_fastbert(backend: str, causal: bool):
    import fastbert
    require_fastbert(backend)
    return lambda q, k, v, cu, max_s: fastbert.attention_varlen(q, k, v, cu, cu, max_s, max_s,
                                                                causal=causal, backend=backend)


def attention_varlen_flash_attn(causal: bool):
    """FlashAttention's own varlen kernel, where the flash_attn package is installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise Unsupported(f"flash_attn is not installed ({e})")
    return lambda q, k, v, cu, max_s: flash_attn_varlen_func(q, k, v, cu, cu, max_s, max_s,
                                                             causal=causal)


def attention_sdpa(backend, causal: bool):
    """torch SDPA pinned to one backend; gets (B, H, S, D) transposed views, as transformers does."""
    from torch.nn.attention import sdpa_kernel

    def forward(q, k, v, mask):
        attn_mask = mask[:, None, None, :] if mask is not None else None
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=attn_mask,
                                                 is_causal=causal)
        return out.transpose(1, 2)
    return forward


@functools.lru_cache(maxsize=4)
def _causal_hidden(sq: int, sk: int, device: torch.device) -> Tensor:
    """(Sq, Sk) True where a key is in a query's future (bottom-right aligned), built once."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)


def attention_eager(causal: bool):
    """Plain torch ops, as transformers' eager BERT attention: masked scores, softmax, PV."""
    def forward(q, k, v, mask):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        if causal:
            hidden = _causal_hidden(scores.shape[-2], scores.shape[-1], q.device)
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        return (scores.softmax(-1) @ v).transpose(1, 2)
    return forward


def guard_score_memory(batch: int, heads: int, seqlen: int, elem_size: int, mode: str,
                       rotations: int, device: torch.device) -> None:
    """Skip S×S-materialising providers whose score matrices would not fit comfortably (the
    other providers of the case hold memory at the same time)."""
    # fwd: one matrix at a time; fwd+bwd: scores, probs and their gradients; bwd: every rotated
    # input set keeps its graph (scores and probs) alive, plus the gradients of one
    copies = {"fwd": 1, "fwd+bwd": 4, "bwd": 2 * rotations + 2}[mode]
    need = copies * batch * heads * seqlen * seqlen * elem_size
    if device.type == "cuda":
        budget = 0.25 * torch.cuda.get_device_properties(device).total_memory
    else:
        budget = 2 * 2 ** 30
    if need > budget:
        raise Skipped(f"would need ~{need / 2 ** 30:.0f} GiB for the SxS attention matrices")


# --------------------------------------------------------------------------------------------
# add + LayerNorm: x, residual (N, C); weight, bias (C,)
# --------------------------------------------------------------------------------------------

def add_layer_norm_fastbert(backend: str, eps: float):
    import fastbert
    require_fastbert(backend)
    return lambda x, r, w, b: fastbert.add_layer_norm(x, r, w, b, eps, backend=backend)


def add_layer_norm_eager(eps: float):
    return lambda x, r, w, b: F.layer_norm(x + r, (x.shape[-1],), w, b, eps)


# --------------------------------------------------------------------------------------------
# linear + bias + GELU: x (N, K), weight (M, K), bias (M,)
# --------------------------------------------------------------------------------------------

def linear_bias_gelu_fastbert(backend: str):
    import fastbert
    require_fastbert(backend)
    return lambda x, w, b: fastbert.linear_bias_gelu(x, w, b, backend=backend)


def linear_bias_gelu_eager():
    return lambda x, w, b: F.gelu(F.linear(x, w, b))


def gemm_only():
    """The floor: the GEMM alone, no bias, no activation."""
    return lambda x, w, b: x @ w.t()


def _require_onednn() -> None:
    from fastbert import cpu
    reason = cpu._private_ops_reason()
    if reason is not None:
        raise Unsupported(reason)


def linear_onednn(gelu: str):
    """oneDNN's inner product through fastbert.cpu (weights prepacked once, inference only):
    gelu "post-op" fuses GELU into the GEMM, "separate" applies F.gelu after it, "none" is the
    GEMM + bias alone (the oneDNN floor)."""
    from fastbert import cpu
    _require_onednn()

    def forward(x, w, b):
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            raise Unsupported("oneDNN prepacked linear is an inference path (fwd only)")
        if gelu == "post-op":
            return cpu._run(x, w, b, "gelu", "none", None)
        y = cpu._run(x, w, b, "none", "", None)
        return F.gelu(y) if gelu == "separate" else y
    return forward


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

_compile_configured = False


def compiled(fn: Callable, enabled: bool, why_not: str) -> Callable:
    """torch.compile(fn), with recompiles allowed for every shape the suite uses."""
    global _compile_configured
    if not enabled:
        raise Skipped(why_not)
    if not _compile_configured:
        import torch._dynamo as dynamo
        # Past the limit dynamo silently falls back to eager, which would mislabel the timing.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, 1024)
        _compile_configured = True
    return torch.compile(fn, dynamic=False)


def cpu_gemm_cases(device: torch.device, rows: int = 1024) -> list:
    """The CPU inference GEMM choices of fastbert/cpu.py, timed side by side at BERT-base's four
    projections (rows tokens): MKL's F.linear against oneDNN on the prepacked and on the plain
    weight, and GELU / residual add as oneDNN post-ops against a separate pass after the GEMM.
    `python -m benchmarks --only cpu-gemm`."""
    from benchmarks.harness import Case
    from fastbert import cpu

    if device.type != "cpu":
        return []
    run = cpu._run

    def gemm(x, w, b, r):
        return run(x, w, b, "none", "", None)

    def variants(k, n):
        prepacked = functools.partial(_with_prepack, True)
        plain = functools.partial(_with_prepack, False)
        linear = {"F.linear": lambda x, w, b, r: F.linear(x, w, b),
                  "fastbert-onednn-prepacked": prepacked(gemm),
                  "fastbert-onednn-plain": plain(gemm)}
        if n > k:  # FFN in: GELU epilogue
            return linear, "gelu", {
                "F.gelu(F.linear)": lambda x, w, b, r: F.gelu(F.linear(x, w, b)),
                "fastbert-onednn+gelu-post-op":
                    plain(lambda x, w, b, r: run(x, w, b, "gelu", "none", None)),
                "fastbert-onednn,F.gelu": plain(lambda *a: F.gelu(gemm(*a)))}
        return linear, "residual", {
            "F.linear+r": lambda x, w, b, r: F.linear(x, w, b) + r,
            "fastbert-onednn+add-post-op": plain(lambda x, w, b, r: run(x, w, b, "add", "", r)),
            "fastbert-onednn,add_": plain(lambda x, w, b, r: gemm(x, w, b, r).add_(r))}

    cases = []
    for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768)):
        g = torch.Generator().manual_seed(k + n)
        w = torch.randn(n, k, generator=g) * k ** -0.5
        b = torch.randn(n, generator=g)
        sets = [(torch.randn(rows, k, generator=g), w, b, torch.randn(rows, n, generator=g))
                for _ in range(2)]
        linear, epilogue, fused = variants(k, n)
        for label, forwards in (("linear", linear), (f"linear+{epilogue}", fused)):
            providers = {name: functools.partial(_gemm_setup, f, sets)
                         for name, f in forwards.items()}
            cases.append(Case(label, "fwd", f"{rows}x{k}->{n}", providers,
                              work={"flops": 2.0 * rows * k * n}))
    return cases


def _with_prepack(prepack: bool, forward):
    from fastbert import cpu

    def call(*args):
        saved, cpu.PREPACK_FP32 = cpu.PREPACK_FP32, prepack
        try:
            return forward(*args)
        finally:
            cpu.PREPACK_FP32 = saved
    return call


def _gemm_setup(forward, sets):
    _require_onednn()

    def call(args):
        with torch.no_grad():
            return forward(*args)
    return rotate([functools.partial(call, s) for s in sets])


# --------------------------------------------------------------------------------------------
# ONNX Runtime: the engine CPU users deploy BERT on
# --------------------------------------------------------------------------------------------

class _Output:
    def __init__(self, last_hidden_state: Tensor):
        self.last_hidden_state = last_hidden_state


class OnnxRuntimeBert(torch.nn.Module):
    """A transformers BertModel exported once to ONNX (torch.onnx.export, at the first call's
    inputs, batch and sequence axes dynamic) and run by ONNX Runtime's CPU execution provider with
    every graph optimisation on (ORT_ENABLE_ALL), on torch's thread count. Called like the
    transformers model: (input_ids=, attention_mask=) -> .last_hidden_state. Inference only."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        try:
            import onnxruntime  # noqa: F401
            import onnx  # noqa: F401  (torch.onnx.export needs it)
        except ImportError as e:
            raise Unsupported(f"onnxruntime is not installed ({e}); pip install -e \".[bench]\"")
        first = next(hf_model.parameters())
        if first.device.type != "cpu" or first.dtype != torch.float32:
            raise Unsupported("the ONNX Runtime baseline runs fp32 on CPU only")
        self.hf_model = hf_model.eval()
        self.session = None

    def train(self, mode: bool = True):
        if mode:
            raise Unsupported("ONNX Runtime is an inference engine (no training step)")
        return super().train(False)

    def _export(self, ids: Tensor, mask: Tensor) -> None:
        import os
        import tempfile
        import warnings

        import onnxruntime as ort

        class Wrapped(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        # the exporter restores the wrapper's train flag afterwards: it must be eval already
        wrapped = Wrapped(self.hf_model).eval()
        axes = {0: "batch", 1: "seqlen"}
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation and tracer warnings
            path = os.path.join(tmp, "bert.onnx")
            kwargs = dict(input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "last_hidden_state": axes})
            try:  # the TorchScript exporter: quick, and its graph is what ORT's fusions expect
                torch.onnx.export(wrapped, (ids, mask), path, dynamo=False, **kwargs)
            except TypeError:  # a torch without the dynamo argument
                torch.onnx.export(wrapped, (ids, mask), path, **kwargs)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            # the same wait policy as torch's OpenMP workers (python -m benchmarks sets PASSIVE):
            # spinning idle workers would steal the cores from the provider timed next
            spin = os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        got = self._run(ids, mask)
        with torch.inference_mode():
            want = self.hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        err = (got - want)[real].abs().max().item() if real.any() else 0.0
        if not err <= 1e-3:
            raise RuntimeError(f"ONNX Runtime output differs from the torch model by {err:.2e}")

    def _run(self, ids: Tensor, mask: Tensor) -> Tensor:
        out = self.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return torch.from_numpy(out)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> _Output:
        ids = input_ids.to(torch.int64).contiguous()
        mask = attention_mask.to(torch.int64).contiguous()
        if self.session is None:
            self._export(ids, mask)
        return _Output(self._run(ids, mask))


def onnxruntime_bert(hf_model: torch.nn.Module) -> OnnxRuntimeBert:
    """The ONNX Runtime provider for a model case: build it from the transformers model the
    other providers start from (same weights); raises Unsupported when it cannot run here."""
    return OnnxRuntimeBert(hf_model)
