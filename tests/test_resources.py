"""Static resources of every Triton kernel variant the model launches (compile tier, no GPU).

Each variant is compiled ahead of time for sm_80 and sm_90 at BERT-base, BERT-large and MiniLM
shapes, in fp16 and bf16, with the launchers' own tile configs and flags; registers, stack, local
memory and shared memory are read from the cubin (`cuobjdump -res-usage`), spill bytes from
`ptxas -v` where there is a stack. Any spill or stack use fails: a spilling kernel runs far below
its roofline, and nobody sees that without a GPU.

The variant list is built from the launchers' config functions, so a retuned tile is checked as
is. Identical variants (BERT-base and BERT-large share head dim 64 and LayerNorm row tiles) are
compiled once; misses compile in a process pool (one worker per available core,
FASTBERT_COMPILE_WORKERS overrides), and Triton's on-disk cache serves reruns. About 170 variants
by default, ~1.6 CPU-seconds each (sm_80 and sm_90 compiles measured on the dev machine), so
~2.5 minutes on two idle cores and seconds once cached; FASTBERT_RESOURCES=full (~2x the
compiles) adds the variants only decoders (causal) or unusual calls launch, see ATTENTION_LAYOUTS.

    python -m pytest -s -m compile tests/test_resources.py   # prints the table (markdown)
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple, Optional

import pytest
import torch

from tests.helpers import TRITON_TYPE, compile_resources, pointers, ptxas_version

triton = pytest.importorskip("triton")
from fastbert.triton import attention, attention_varlen, layer_norm as ln  # noqa: E402
from fastbert.triton import linear_gelu as lg  # noqa: E402
from tests import test_triton_attention as attn_tests  # noqa: E402  (their launch signatures)
from tests import test_triton_layer_norm as ln_tests  # noqa: E402
from tests import test_triton_linear_gelu as lg_tests  # noqa: E402

pytestmark = pytest.mark.compile

CAPABILITIES = (80, 90)
DTYPES = (torch.float16, torch.bfloat16)


class ModelShape(NamedTuple):
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    gelu: str  # linear_bias_gelu's `approximate` for the checkpoint's hidden_act


MODELS = {
    "base": ModelShape(768, 12, 64, 3072, "none"),
    "large": ModelShape(1024, 16, 64, 4096, "none"),
    "MiniLM": ModelShape(384, 12, 32, 1536, "none"),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: everything that changes the binary. Hashable, so duplicates fold."""
    module: str
    kernel: str
    capability: int
    signature: tuple  # ((name, triton type), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    aligned: tuple

    def compile(self) -> dict:
        return compile_resources(self.module, self.kernel, dict(self.signature),
                                 dict(self.constexprs), self.capability, self.num_warps,
                                 self.num_stages, self.aligned)


@dataclasses.dataclass(frozen=True)
class Row:
    """Where a variant shows in the table: a kernel, what it does, a dtype, a target."""
    kernel: str
    what: str
    dtype: str
    capability: int


def _variant(fn, capability, signature, constexprs, warps, stages, aligned) -> Variant:
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuned kernel wraps it
        fn = fn.fn
    return Variant(fn.__module__, fn.__name__, capability, tuple(signature.items()),
                   tuple(sorted(constexprs.items())), warps, stages, tuple(aligned))


# --------------------------------------------------------------------------------------------
# attention: one line per kernel the launchers run, one per layout they launch it in
# --------------------------------------------------------------------------------------------

class AttentionKernel(NamedTuple):
    name: str  # the kernel in fastbert.triton.attention
    config: Optional[str]  # its (BLOCK_M, BLOCK_N, warps, stages) function there; None: fixed
    phase: str  # "forward", "backward" (atomic dQ, the default) or "deterministic backward"
    constexprs: tuple = ()  # what the launcher passes besides the flags and tiles
    dq_fp32: bool = False  # DQ is an fp32 buffer (atomic adds), else the data dtype


ATTENTION_KERNELS = (
    AttentionKernel("_key_range_kernel", None, "mask", (("BLOCK", attention.KEY_RANGE_BLOCK),)),
    AttentionKernel("_attn_fwd_kernel", "fwd_config", "forward"),
    AttentionKernel("_attn_bwd_preprocess_kernel", None, "backward",
                    (("BLOCK_M", attention.PREPROCESS_BLOCK_M),)),
    AttentionKernel("_attn_bwd_dkdv_kernel", "dkdv_config", "backward", (("DQ_ATOMIC", True),),
                    dq_fp32=True),
    AttentionKernel("_attn_bwd_dkdv_kernel", "dkdv_config", "deterministic backward",
                    (("DQ_ATOMIC", False), ("DQ", None))),
    AttentionKernel("_attn_bwd_dq_kernel", "dq_config", "deterministic backward"),
)


PHASES = ("mask", "forward", "backward", "deterministic backward")


class AttentionLayout(NamedTuple):
    name: str
    constexprs: tuple  # the layout's flags (passed to the kernels that declare them)
    requires: tuple  # constexprs a kernel must declare to run in this layout
    absent: tuple  # pointer arguments the launcher passes as None in this layout
    masks: tuple  # with / without a key-padding mask
    phases: tuple  # which kernels (by AttentionKernel.phase) run in this layout


# What the model launches with these encoder checkpoints (not causal): the packed path (the
# default, config.unpad) with its deterministic backward, and the padded path (unpad=False,
# always given the attention mask). FASTBERT_RESOURCES=full adds the causal variants
# (is_decoder), the padded path without a mask and its deterministic backward: about twice the
# compiles (see the module docstring).
FULL = os.environ.get("FASTBERT_RESOURCES") == "full"
CAUSAL = (False, True) if FULL else (False,)
ATTENTION_LAYOUTS = (
    AttentionLayout("varlen", (("IS_VARLEN", True),), ("IS_VARLEN",), ("Mask", "KvRange"),
                    (False,), PHASES),
    AttentionLayout("padded", (("IS_VARLEN", False),), (), ("CuSeqQ", "CuSeqK"),
                    (True, False) if FULL else (True,),
                    PHASES if FULL else ("mask", "forward", "backward")),
)
_FLAG_NAMES = {"IS_CAUSAL": "causal", "HAS_MASK": "mask", "HAS_DROPOUT": "dropout"}
# ModernBERT-base/large have BERT-base/large's head dim 64; their local layers also launch the
# packed (varlen) kernels with a sliding window of 64 keys each side (issue 20), and the padded
# ones (fastbert's own model with unpad=False, or a mask with holes) with the window beside the
# key mask; with and without attention dropout (0.0 in ModernBERT's configs, set when
# fine-tuning).
MODERNBERT_WINDOW = (64, 64)
# On the Triton backend ModernBERT's forward turns q and k inside the attention kernel
# (ROTARY_HALF = head dim / 2, attention_varlen's rotary=), in its global and local layers.
MODERNBERT_ROTARY_HALF = 32


def _flag_sets(shape: ModelShape, layout: AttentionLayout, phase: str) -> list:
    """(causal, dropout, window, rotary half) per launch: the flag sets above without a window,
    and ModernBERT's local layers (head dim 64, packed or padded) with theirs, with and without
    dropout, both phases; its packed forwards (global and local) with RoPE in the kernel."""
    sets = [(causal, dropout, (-1, -1), 0) for causal, dropout in _attention_flag_sets(phase)]
    if shape.head_dim == 64:
        sets += [(causal, dropout, MODERNBERT_WINDOW, 0)
                 for causal, dropout in itertools.product(CAUSAL, (False, True))]
        if phase == "forward" and layout.name == "varlen":
            sets += [(False, False, window, MODERNBERT_ROTARY_HALF)
                     for window in ((-1, -1), MODERNBERT_WINDOW)]
    return sets


def _constexpr_names(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


def _tiles(kernel: AttentionKernel, bd, dtype, capability, dropout, has_mask, causal, window):
    if kernel.config is None:
        return {}, 4, 3  # the launcher passes no num_warps/num_stages: Triton's defaults
    config = getattr(attention, kernel.config)
    parameters = inspect.signature(config).parameters
    # the forward's depends on dropout, the mask and causal; forward's and dK/dV's on a window
    positional = len(parameters) - ("window" in parameters)
    args = (bd, dtype, capability, dropout, has_mask, causal)[:positional]
    m, n, warps, stages = config(*args, **({"window": attention.banded(window)}
                                           if "window" in parameters else {}))
    return {"BLOCK_M": m, "BLOCK_N": n}, warps, stages


def _attention_flag_sets(phase):
    """(causal, has_dropout) pairs the model launches per phase: forward in eval (no dropout) and
    training; backward only in training, where every checkpoint here has attention dropout 0.1."""
    dropouts = (False, True) if phase in ("forward", "mask") else (True,)
    return list(itertools.product(CAUSAL, dropouts))


def attention_variants():
    for model, shape in MODELS.items():
        bd = attention.block_d(shape.head_dim)
        for kernel, layout, capability, dtype in itertools.product(
                ATTENTION_KERNELS, ATTENTION_LAYOUTS, CAPABILITIES, DTYPES):
            fn = getattr(attention, kernel.name)
            declared = _constexpr_names(fn)
            layout_flags = dict(layout.constexprs)
            if not set(layout.requires) <= declared or kernel.phase not in layout.phases:
                continue
            for has_mask, (causal, dropout, window, rotary) in itertools.product(
                    layout.masks, _flag_sets(shape, layout, kernel.phase)):
                if kernel.phase == "mask" and not has_mask:
                    continue
                tiles, warps, stages = _tiles(kernel, bd, dtype, capability, dropout, has_mask,
                                              causal, window)
                flags = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, HAS_DROPOUT=dropout,
                             EXACT_DOT=attention.exact_dot(dtype), BLOCK_D=bd, **tiles,
                             WINDOW_LEFT=window[0], WINDOW_RIGHT=window[1],
                             **layout_flags, **dict(kernel.constexprs))
                if rotary:  # with the varlen launcher's tiles for it
                    flags["ROTARY_HALF"] = rotary
                    m, n, warps, stages = attention_varlen.rotary_fwd_config(bd, dtype,
                                                                             capability)
                    flags.update(BLOCK_M=m, BLOCK_N=n)
                constexprs = {k: v for k, v in flags.items() if k in declared}
                for name in layout.absent + (() if has_mask else ("Mask", "KvRange")):
                    if name in fn.arg_names:
                        constexprs[name] = None
                for name, value in kernel.constexprs:
                    constexprs[name] = value  # also pointers the launcher passes as None
                sig, aligned = attn_tests._signature(
                    fn, dtype, constexprs, has_mask, dropout,
                    torch.float32 if kernel.dq_fp32 else dtype, varlen=layout.name == "varlen")
                used = [v for k, v in _FLAG_NAMES.items() if constexprs.get(k)]
                if constexprs.get("WINDOW_LEFT", -1) >= 0:
                    used.append(f"window {window[0]}")
                if rotary:
                    used.append("rotary")
                # a kernel without the layout's flags serves every layout: no layout in its name
                where = [layout.name] if set(layout_flags) & declared else []
                what = " ".join([kernel.phase, *where, "+".join(used) or "plain",
                                 _tile_label(constexprs, warps, stages)])
                yield model, Row(kernel.name, what, TRITON_TYPE[dtype], capability), _variant(
                    fn, capability, sig, constexprs, warps, stages, aligned)


def _tile_label(constexprs, warps, stages):
    tile = "x".join(str(constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D",
                                                  "BLOCK") if k in constexprs)
    return f"{tile} w{warps} s{stages}"


# --------------------------------------------------------------------------------------------
# LayerNorm and linear + GELU
# --------------------------------------------------------------------------------------------

def layer_norm_variants():
    # (residual, dropout): embeddings (no residual, dropout after), every layer in training and
    # in eval. Backward runs for the training ones. Weights in the input dtype (a half, bf16 or,
    # under autocast, fp32 model), or fp32 beside bf16 rows (FASTBERT_RESOURCES=full: fp16 too).
    # Rows wider than any model here (up to MAX_HIDDEN, walked in chunks) are listed too: the
    # op serves them, and held whole in registers they spilled (issue 19).
    forward_kinds = [(False, False), (True, True), (True, False)]
    backward_kinds = [(False, False), (True, True), (True, False)]
    widths = {model: shape.hidden for model, shape in MODELS.items()}
    widths.update({f"hidden {h}": h for h in (ln.MAX_BLOCK_N, ln.MAX_HIDDEN)})
    for model, hidden in widths.items():
        block_n, warps, whole_row = ln._row_config(hidden)
        # (x dtype, residual/y dtype where not x's). Model widths only: the norms under CUDA
        # autocast (layer_norm.norm_dtype), fp32 ones and a bf16 x beside the fp32 residual stream
        streams = [(d, None) for d in DTYPES]
        if model in MODELS:
            streams += [(torch.float32, None), (torch.bfloat16, torch.float32)]
        for capability, (dtype, stream) in itertools.product(CAPABILITIES, streams):
            for weight_dtype in (dtype, torch.float32) if FULL or dtype == torch.bfloat16 \
                    else (dtype,):
                if stream is not None and weight_dtype != stream:
                    continue  # autocast's models keep fp32 weights
                for kernel, signature, kinds in (
                        (ln._add_layer_norm_fwd_kernel, ln_tests._fwd_signature, forward_kinds),
                        (ln._add_layer_norm_bwd_kernel, ln_tests._bwd_signature, backward_kinds)):
                    # the pre-norm form (ModernBERT-base/large's widths are BERT's): the forward
                    # stores the sum, the backward takes its gradient
                    pre_norm = ("STORE_SUM" if kernel is ln._add_layer_norm_fwd_kernel
                                else "HAS_DSUM")
                    for (residual, dropout), summed in itertools.product(kinds, (False, True)):
                        if (stream is not None or summed) and not residual \
                                or summed and model not in ("base", "large"):
                            continue
                        sig = signature(dtype, weight_dtype, "i64" if dropout else "i32", stream)
                        constexprs = {"HAS_RESIDUAL": residual, "HAS_DROPOUT": dropout,
                                      "BLOCK_N": block_n, "WHOLE_ROW": whole_row,
                                      pre_norm: summed}
                        used = [k for k, on in (("residual", residual), ("dropout", dropout),
                                                ("pre-norm sum", summed)) if on]
                        weight = "fp32" if weight_dtype != dtype else "as input"
                        tile = f"{block_n}{'' if whole_row else ' chunks'} w{warps}"
                        what = f"{'+'.join(used) or 'plain'}, weight {weight}, {tile}"
                        label = TRITON_TYPE[dtype] + (f"+{TRITON_TYPE[stream]}" if stream else "")
                        yield model, Row(kernel.__name__, what, label, capability), \
                            _variant(kernel, capability, sig, constexprs, warps, 3,
                                     pointers(sig) + ["hidden"])


def linear_gelu_variants():
    for model, shape in MODELS.items():
        for capability, dtype in itertools.product(CAPABILITIES, DTYPES):
            element_size = torch.empty(0, dtype=dtype).element_size()
            # every config the shared-memory pruning keeps may win autotuning on some shape
            for config in lg.configs_that_fit(lg.GPU_CONFIGS, element_size,
                                              lg_tests.SHARED_MEMORY[capability]):
                for store_pre in (True, False):  # training / no gradient
                    sig = lg_tests._fwd_signature(dtype)
                    constexprs = dict(lg.forward_constexprs(dtype, shape.gelu, store_pre),
                                      **config.kwargs)
                    what = (f"{'train' if store_pre else 'no-grad'} gelu={shape.gelu} "
                            f"{_tile_label(constexprs, config.num_warps, config.num_stages)}")
                    yield model, Row("_linear_bias_gelu_fwd_kernel", what, TRITON_TYPE[dtype],
                                     capability), _variant(
                        lg._linear_bias_gelu_fwd_kernel, capability, sig, constexprs,
                        config.num_warps, config.num_stages, pointers(sig) + ["M", "N", "K"])
            sig = lg_tests._bwd_signature(dtype)
            constexprs = {"APPROXIMATE_TANH": shape.gelu == "tanh", "BLOCK_M": lg.BWD_BLOCK_M,
                          "BLOCK_N": lg.BWD_BLOCK_N}
            what = f"gelu={shape.gelu} {_tile_label(constexprs, lg.BWD_NUM_WARPS, 3)}"
            yield model, Row("_gelu_bwd_dbias_kernel", what, TRITON_TYPE[dtype], capability), \
                _variant(lg._gelu_bwd_dbias_kernel, capability, sig, constexprs, lg.BWD_NUM_WARPS,
                         3, pointers(sig) + ["M", "N"])


FAMILIES = {"linear_gelu": linear_gelu_variants, "layer_norm": layer_norm_variants,
            "attention": attention_variants}


def collect(family: str) -> dict:
    """{Row: (Variant, [models])} for one kernel family, duplicates folded."""
    rows: dict = {}
    for model, row, variant in FAMILIES[family]():
        if row in rows:
            assert rows[row][0] == variant, f"{row} names two different variants"
            if model not in rows[row][1]:
                rows[row][1].append(model)
        else:
            rows[row] = (variant, [model])
    return rows


# --------------------------------------------------------------------------------------------
# compiling, once per session and in parallel
# --------------------------------------------------------------------------------------------

_usage: dict = {}  # Variant -> resource_usage


def _workers() -> int:
    return int(os.environ.get("FASTBERT_COMPILE_WORKERS", len(os.sched_getaffinity(0))))


def usage_of(variants) -> dict:
    """Resource usage for each variant, compiling the ones this session has not seen yet."""
    missing = list(dict.fromkeys(v for v in variants if v not in _usage))
    if len(missing) > 1 and _workers() > 1:
        # spawn, not fork: a forked child of a process with torch's threads can deadlock
        import multiprocessing
        with ProcessPoolExecutor(min(_workers(), len(missing)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for variant, usage in zip(missing, pool.map(Variant.compile, missing)):
                _usage[variant] = usage
    else:
        for variant in missing:
            _usage[variant] = variant.compile()
    return {v: _usage[v] for v in variants}


def _problems(usage: dict) -> list:
    found = []
    if usage["spill_stores"] or usage["spill_loads"]:
        found.append(f"spills {usage['spill_stores']} B stored / {usage['spill_loads']} B loaded")
    if usage["stack"]:
        found.append(f"{usage['stack']} B stack")
    if usage["local"]:
        found.append(f"{usage['local']} B local memory")
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_spills_and_no_stack(family):
    rows = collect(family)
    usage = usage_of([variant for variant, _ in rows.values()])
    bad = [f"sm_{row.capability} {row.dtype} {row.kernel} [{row.what}] ({', '.join(models)}): "
           + "; ".join(_problems(usage[variant]))
           for row, (variant, models) in rows.items() if _problems(usage[variant])]
    assert not bad, f"{len(bad)} of {len(rows)} variants spill or use a stack:\n" + "\n".join(bad)


def test_every_attention_kernel_is_listed():
    # a new kernel (a varlen one, say) must get its line in ATTENTION_KERNELS to be checked
    kernels = {name for name, obj in vars(attention).items()
               if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
    assert kernels == {k.name for k in ATTENTION_KERNELS}


def test_variant_list_covers_the_model():
    rows = {family: collect(family) for family in FAMILIES}
    # BERT-base and BERT-large share their attention and LayerNorm variants; MiniLM adds its own
    att = rows["attention"]
    assert all("large" in models for row, (_, models) in att.items() if "base" in models)
    assert any(models == ["MiniLM"] for _, models in att.values())
    for family in FAMILIES:  # and autocast's norms: fp32, and bf16 beside fp32 (layer_norm.norm_dtype)
        extra = ("fp32", "bf16+fp32") if family == "layer_norm" else ()
        assert {(r.capability, r.dtype) for r in rows[family]} == {
            (c, d) for c in CAPABILITIES for d in [TRITON_TYPE[d] for d in DTYPES] + list(extra)}
    fwd = [r for r in att if r.kernel == "_attn_fwd_kernel" and "padded" in r.what]
    flag_sets = {r.what.split()[2] for r in fwd}
    windowed = {s for s in flag_sets if s.endswith("window")}  # ModernBERT's local layers
    assert "mask+window" in windowed
    flag_sets -= windowed
    if FULL:  # every combination of causal, mask, dropout
        assert flag_sets == {"+".join(flags) for n in range(1, 4) for flags in
                             itertools.combinations(_FLAG_NAMES.values(), n)} | {"plain"}
    else:  # the padded path always has its mask, with dropout in training
        assert flag_sets == {"mask", "mask+dropout"}
    gemm = [r for r in rows["linear_gelu"] if r.kernel == "_linear_bias_gelu_fwd_kernel"]
    assert len({r.what for r in gemm}) == 2 * len(lg.GPU_CONFIGS)  # every config, with/without pre


# --------------------------------------------------------------------------------------------
# the static performance model (benchmarks/static_model.py, issue 21) at BERT-base, fp16 and bf16
# --------------------------------------------------------------------------------------------

# (kernel, start of the variant's description, sm, metric, bound, what the bound is): "target"
# is issue 21's target, reached; "today" is the level of the compiled code when the bound was
# set (past the target where it says "reached"; sm_80 and the GEMM epilogue's count have no
# target to reach: benchmarks/README.md), so that a change making it worse fails. Per-iteration metrics are of the kernel's steady-state (full-tile) loop; NEXT is the
# next-shortest MMA loop's, with a key mask the tiles of a mask with holes (they check the mask
# alone). Sliding-window variants (ModernBERT's local layers) are in the model's table, not
# bounded here.
WI = "warp_instructions_per_kflop"
NEXT = "next_loop_warp_instructions_per_kflop"
STATIC_BOUNDS = [
    ("_attn_fwd_kernel", "forward varlen plain", 90, WI, 1.02, "today; target 1.1 reached"),
    ("_attn_fwd_kernel", "forward padded mask 128", 90, WI, 1.02, "today; target 1.3 reached"),
    ("_attn_fwd_kernel", "forward padded mask 128", 90, NEXT, 1.27, "today; target 1.3 reached"),
    ("_attn_fwd_kernel", "forward varlen dropout", 90, WI, 2.04, "today; target 2.5 reached"),
    ("_attn_fwd_kernel", "forward padded mask+dropout", 90, WI, 2.03,
     "today; target 2.5 reached"),
    ("_attn_fwd_kernel", "forward padded mask+dropout", 90, NEXT, 2.47,
     "today; target 2.5 reached"),
    ("_attn_bwd_dkdv_kernel", "", 90, "mma_issued_per_useful", 1.05, "target"),
    ("_attn_bwd_dkdv_kernel", "backward", 90, WI, 1.0, "target"),
    ("_attn_bwd_dkdv_kernel", "deterministic", 90, WI, 1.01, "today; target 1.2 reached"),
    ("_attn_bwd_dq_kernel", "deterministic", 90, "mma_issued_per_useful", 1.0, "target 1.05"),
    ("_attn_bwd_dq_kernel", "deterministic", 90, WI, 1.2, "target"),
    # memory-bound: issue clocks per row <= the DRAM clocks of its bytes (H100)
    ("_add_layer_norm_fwd_kernel", "", 90, "issue_per_dram_clocks", 1.0, "target"),
    ("_add_layer_norm_bwd_kernel", "", 90, "issue_per_dram_clocks", 1.0, "target"),
    # linear+GELU: the target's second form is reached (2 CTAs per SM, each epilogue fits in
    # the issue slots the other CTA's K loop leaves free); its instructions are bounded too
    ("_linear_bias_gelu_fwd_kernel", "train gelu=none 128x128", 90, "epilogue_exposed_clocks",
     0, "target: hidden under the other CTA's K loop"),
    ("_linear_bias_gelu_fwd_kernel", "no-grad gelu=none 128x128", 90, "epilogue_exposed_clocks",
     0, "target: hidden under the other CTA's K loop"),
    ("_linear_bias_gelu_fwd_kernel", "train gelu=none 128x128", 90, "epilogue_clocks", 2650,
     "today; target 2,000 or hidden"),
    ("_linear_bias_gelu_fwd_kernel", "no-grad gelu=none 128x128", 90, "epilogue_clocks", 2486,
     "today; target 2,000 or hidden"),
    # sm_80: no worse than today
    ("_attn_fwd_kernel", "forward varlen plain", 80, WI, 1.25, "today"),
    ("_attn_fwd_kernel", "forward padded mask 128", 80, WI, 1.26, "today"),
    ("_attn_fwd_kernel", "forward padded mask 128", 80, NEXT, 1.85, "today"),
    ("_attn_fwd_kernel", "forward varlen dropout", 80, WI, 2.08, "today"),
    ("_attn_fwd_kernel", "forward padded mask+dropout", 80, WI, 2.09, "today"),
    ("_attn_fwd_kernel", "forward padded mask+dropout", 80, NEXT, 2.73, "today"),
    ("_attn_bwd_dkdv_kernel", "", 80, "mma_issued_per_useful", 1.0, "today"),
    ("_attn_bwd_dkdv_kernel", "backward", 80, WI, 2.11, "today"),
    ("_attn_bwd_dkdv_kernel", "deterministic", 80, WI, 1.6, "today"),
    ("_attn_bwd_dq_kernel", "deterministic", 80, WI, 1.5, "today"),
    ("_add_layer_norm_fwd_kernel", "", 80, "issue_per_dram_clocks", 1.0, "today"),
    ("_add_layer_norm_bwd_kernel", "", 80, "issue_per_dram_clocks", 1.0, "today"),
    ("_linear_bias_gelu_fwd_kernel", "train gelu=none 128x128", 80, "epilogue_clocks", 2622,
     "today"),
]


def test_static_model_bounds():
    if not triton.__version__.startswith("3.9."):  # another compiler emits other code
        pytest.skip(f"the bounds are Triton 3.9's compiled code; this is {triton.__version__}")
    from benchmarks import static_model
    estimates = static_model.estimates()
    over = []
    for kernel, what, capability, metric, bound, kind in STATIC_BOUNDS:
        chosen = [e for e in estimates if e.kernel == kernel and e.what.startswith(what)
                  and e.capability == capability and "window" not in e.what]
        assert chosen, f"no {kernel} variant '{what}' on sm_{capability} in the static model"
        over += [f"sm_{capability} {e.dtype} {kernel} [{e.what}]: {metric} "
                 f"{getattr(e, metric):.3f} > {bound} ({kind})"
                 for e in chosen if getattr(e, metric) > bound]
    assert not over, "\n".join(over)


# --------------------------------------------------------------------------------------------
# the table (pytest -s shows it; benchmarks/README.md keeps a copy)
# --------------------------------------------------------------------------------------------

def _cell(usage: Optional[dict]) -> str:
    if usage is None:
        return ""
    problems = _problems(usage)
    return f"{usage['regs']}" + (" **" + "; ".join(problems) + "**" if problems else "")


def markdown_table() -> str:
    columns = [(c, TRITON_TYPE[d]) for c in CAPABILITIES for d in DTYPES]
    lines = [f"triton {triton.__version__}, ptxas "
             + ", ".join(f"{ptxas_version(c)} (sm_{c})" for c in CAPABILITIES)
             + ". Registers per thread; anything else (spills, stack, local memory) is a failure.",
             "",
             "| kernel | variant | models | " + " | ".join(f"sm_{c} {d}" for c, d in columns)
             + " | shared KB (sm_80 / sm_90) |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for family in FAMILIES:
        rows = collect(family)
        usage = usage_of([v for v, _ in rows.values()])
        grouped: dict = {}
        for row, (variant, models) in rows.items():
            entry = grouped.setdefault((row.kernel, row.what), {"models": [], "cells": {}})
            entry["models"] = sorted(set(entry["models"]) | set(models))
            entry["cells"][(row.capability, row.dtype)] = usage[variant]
        for (kernel, what), entry in grouped.items():
            cells = entry["cells"]
            shared = " / ".join(str(max(on_cap) // 1024) if on_cap else "-" for on_cap in (
                [u["shared"] for (c, _), u in cells.items() if c == cap] for cap in CAPABILITIES))
            lines.append(f"| {kernel.strip('_')} | {what} | {', '.join(entry['models'])} | "
                         + " | ".join(_cell(cells.get(col)) for col in columns)
                         + f" | {shared} |")
    return "\n".join(lines)


def test_print_resource_table(static_table):
    table = markdown_table()
    assert table.count("\n| ") > 20
    static_table("Static resources of the compiled Triton kernels", table)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "README.md")
BEGIN, END = "<!-- resources table: begin -->", "<!-- resources table: end -->"


def write_readme_table(path: str = README) -> None:
    """Replace the table between the BEGIN and END markers of benchmarks/README.md."""
    from benchmarks import static_model
    table = markdown_table()  # minutes when nothing is cached: before the file is touched
    static_model.write_readme_table(table, path, BEGIN, END)


if __name__ == "__main__":  # python -m tests.test_resources: refresh the README's table
    write_readme_table()
