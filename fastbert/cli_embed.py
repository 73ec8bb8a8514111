"""The `fastbert embed` and `fastbert search` commands: sentence embeddings of a text file, and
exact semantic search over a corpus (fastbert/sentence.py does the work)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fastbert.cli import CLIError


def _sentence_encoder(args):
    import torch
    from fastbert.sentence import SentenceEncoder

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return SentenceEncoder.from_pretrained(args.model, device=device,
                                           dtype=None if args.dtype == "fp32" else args.dtype)


def cmd_embed(args) -> int:
    from fastbert import sentence

    output = Path(args.output)
    if output.suffix not in sentence.EMBEDDING_SUFFIXES:
        raise CLIError(f"--output {output}: expected a .npy or .safetensors file")
    rows_file = sentence.rows_path(output)
    if rows_file.resolve() == Path(args.input).resolve():
        raise CLIError(f"--output {output}: its rows file {rows_file} would overwrite --input")
    texts, lines = sentence.read_texts(args.input, args.column)
    encoder = _sentence_encoder(args)
    start = time.perf_counter()
    embeddings = encoder.encode(texts, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                                normalize=args.normalize, show_progress=not args.no_progress)
    seconds = time.perf_counter() - start
    normalized = encoder.normalize if args.normalize is None else args.normalize
    sentence.save_embeddings(output, embeddings, texts, lines,
                             meta={"model": args.model, "input": args.input, "pooling": encoder.pooling,
                                   "normalized": normalized})
    print(f"{_input_summary(args.input, texts)} -> {embeddings.shape[1]}-dim embeddings in {seconds:.2f} s "
          f"({len(texts) / seconds:.1f} texts/s on {encoder.device}, pooling {encoder.pooling}, "
          f"normalized {normalized})")
    print(f"wrote {output} and {rows_file} (row i: input line and text)")
    return 0


def _input_summary(path, texts) -> str:
    """"5 texts", or for one-text-per-line files "5 lines, 2 blank skipped": blank lines get no row,
    so row i is line i only when none were skipped (the rows file maps them)."""
    if Path(path).suffix not in (".txt", ".jsonl"):
        return f"{len(texts)} texts"
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    blank = lines - len(texts)
    return f"{lines} lines, {blank} blank skipped" if blank else f"{len(texts)} texts"


def cmd_search(args) -> int:
    from fastbert import sentence

    corpus = Path(args.corpus)
    if args.top_k < 1:
        raise CLIError(f"--top-k expected a positive number, got {args.top_k}")
    saved = corpus.suffix in sentence.EMBEDDING_SUFFIXES
    if saved:  # embeddings from `fastbert embed`: read before the model loads, fail fast
        embeddings, texts, lines = sentence.load_embeddings(corpus)
    else:
        texts, lines = sentence.read_texts(corpus, args.column)
    encoder = _sentence_encoder(args)
    if saved and embeddings.shape[1] != encoder.dim:
        raise CLIError(f"--corpus {corpus} holds {embeddings.shape[1]}-dim embeddings, but --model "
                       f"{args.model} makes {encoder.dim}-dim ones: embed the corpus with this model")
    if not saved:
        embeddings = encoder.encode(texts, show_progress=not args.no_progress)
    results = encoder.search(args.query, embeddings, top_k=args.top_k)
    hits = [{"query": q, "hits": [{"rank": r + 1, "score": round(score, 6), "row": i, "line": lines[i],
                                   "text": texts[i]} for r, (i, score) in enumerate(ranked)]}
            for q, ranked in zip(args.query, results)]
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
        return 0
    for entry in hits:
        print(f"query: {entry['query']}")
        for hit in entry["hits"]:
            print(f"  {hit['rank']:>3}. {hit['score']:.4f}  line {hit['line']}: {hit['text']}")
    return 0
