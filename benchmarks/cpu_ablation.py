"""CPU inference ablation (issue 11): fastbert's BertModel as shipped against the same model with
one CPU-path choice undone, timed interleaved in one run at the model case's shape (BERT-base
layer sizes, 2 layers, B=8, S=128, the suite's padding, fp32, inference_mode).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.cpu_ablation --threads 2

Prints each variant's speedup over "shipped" (the median of the per-round ratios and its spread;
below 1: the shipped choice is the faster one). The variants flip the module switches that the
choices live behind, so this measures exactly what the switches select.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from benchmarks import harness
from benchmarks.harness import Case
from benchmarks.models import _fastbert_model
from benchmarks.suite import MODELS, lengths_to_mask, padded_lengths

SHIPPED = "shipped"  # not a "fastbert*" name: the harness takes it as the baseline


def _variants():
    from fastbert import cpu, varlen
    return {
        SHIPPED: {},
        # the padded (B, max_seqlen) grid with an additive mask instead of per-sequence calls
        "fastbert-padded-attention": {(varlen, "MIN_TOKENS_PER_CALL"): 10 ** 9},
        "fastbert-gelu-post-op": {(cpu, "GELU_POST_OP"): True},
        "fastbert-prepacked-weights": {(cpu, "PREPACK_FP32"): True},
        "fastbert-mkl": {(cpu, "_enabled"): False},  # F.linear for every GEMM
    }


def ablation_case(model: str = "bert-base-2l", batch: int = 8, seqlen: int = 128,
                  rotations: int = 2) -> Case:
    variants = _variants()
    shipped = {key: getattr(*key) for flags in variants.values() for key in flags}
    g = torch.Generator().manual_seed(batch * 1000 + seqlen)  # the model case's inputs
    lengths = padded_lengths(batch, seqlen, g)
    mask = lengths_to_mask(lengths, seqlen, "cpu").long()
    vocab = MODELS[model].get("vocab_size", 30522)
    inputs = [torch.randint(1, vocab, (batch, seqlen), generator=g) * mask
              for _ in range(rotations)]

    def call(net, flags, ids):
        for (module, name), value in {**shipped, **flags}.items():
            setattr(module, name, value)
        try:
            with torch.inference_mode():
                return net(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            for (module, name), value in shipped.items():
                setattr(module, name, value)

    def provider(flags):
        def setup():
            net = _fastbert_model(model, torch.device("cpu"), torch.float32).eval()
            return harness.rotate([functools.partial(call, net, flags, ids) for ids in inputs])
        return setup

    padding = 1.0 - sum(lengths) / (batch * seqlen)
    return Case("model", "infer", f"{model} B{batch} S{seqlen} ablation",
                {name: provider(flags) for name, flags in variants.items()},
                work={"tokens": float(sum(lengths))},
                params=dict(model=model, seqlen=seqlen, padding=round(padding, 3)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = harness.run_case(ablation_case(), torch.device("cpu"),
                            harness.Timing(rounds=args.rounds, cpu_min_s=0.5))
    times = {r["provider"]: r["value"] for r in rows if r["metric"] == "time_ms"}
    print(f"{torch.get_num_threads()} threads; {SHIPPED}: {times.get(SHIPPED, float('nan')):.1f} ms")
    for r in rows:
        if r["metric"] == f"speedup_vs:{SHIPPED}":
            spread = next(s["value"] for s in rows if s["provider"] == r["provider"]
                          and s["metric"] == f"speedup_spread_pct_vs:{SHIPPED}")
            print(f"{r['provider']:28s} {times[r['provider']]:7.1f} ms  {r['value']:.2f}x shipped "
                  f"(spread {spread:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
