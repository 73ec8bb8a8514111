"""Tier 1: `fastbert embed` and `fastbert search` end to end on BBC news sentences with the real
all-MiniLM-L6-v2, and their one-line errors on bad files."""
import json

import numpy as np
import pytest
import torch

import fastbert
from fastbert import cli, sentence
from fastbert.data import Tokenizer
from tests.test_cli import assert_clean_error, run
from tests.test_sentence import bbc_sentences, minilm_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """60 BBC sentences as .txt (with a blank line) and .jsonl, and a 32-dim BERT checkpoint."""
    root = tmp_path_factory.mktemp("embed")
    texts = bbc_sentences(per_class=2)[:60]
    lines = texts[:10] + [""] + texts[10:]
    (root / "sentences.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(root / "sentences.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"id": len(t), "body": t}) + "\n")
    small = root / "small_bert"
    fastbert.BertModel(fastbert.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64)).save_pretrained(str(small))
    Tokenizer.from_pretrained(minilm_dir()).save(small)
    return root, texts


@pytest.fixture(scope="module")
def minilm():
    return sentence.SentenceEncoder.from_pretrained(minilm_dir())


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_embed_writes_embeddings_in_input_order(files, minilm, capsys, suffix):
    root, texts = files
    out = root / f"emb{suffix}"
    status, printed, err = run(capsys, "embed", "--model", minilm_dir(), "--input", root / "sentences.txt",
                               "--output", out, "--no-progress")
    assert status == 0, err
    assert "61 lines, 1 blank skipped -> 384-dim embeddings" in printed and "texts/s" in printed
    emb, saved_texts, lines = sentence.load_embeddings(out)
    assert saved_texts == texts
    assert lines == list(range(1, 11)) + list(range(12, 62))  # line 11 is blank: skipped
    torch.testing.assert_close(emb, minilm.encode(texts), atol=1e-6, rtol=1e-5)
    if suffix == ".npy":
        assert np.load(out).dtype == np.float32


def test_search_reuses_saved_embeddings_and_matches_a_fresh_encoding(files, capsys):
    root, texts = files
    out = root / "search.npy"
    assert run(capsys, "embed", "--model", minilm_dir(), "--input", root / "sentences.jsonl", "--column",
               "body", "--output", out, "--no-progress")[0] == 0
    query = texts[17]
    results = {}
    for corpus, extra in ((out, []), (root / "sentences.jsonl", ["--column", "body"])):
        status, printed, err = run(capsys, "search", "--model", minilm_dir(), "--corpus", corpus,
                                   "--query", query, "--query", "football", "--top-k", "3", "--json",
                                   "--no-progress", *extra)
        assert status == 0, err
        results[corpus.suffix] = json.loads(printed)
    saved, fresh = results[".npy"], results[".jsonl"]
    assert [[h["row"] for h in q["hits"]] for q in saved] == [[h["row"] for h in q["hits"]] for q in fresh]
    first = saved[0]["hits"][0]
    assert (first["text"], first["line"], first["rank"]) == (query, 18, 1)  # a text finds itself
    assert first["score"] == pytest.approx(1.0, abs=1e-5)
    assert [len(q["hits"]) for q in saved] == [3, 3]
    scores = [h["score"] for h in saved[1]["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_search_prints_a_ranked_list(files, capsys):
    root, texts = files
    status, printed, err = run(capsys, "search", "--model", minilm_dir(), "--corpus", root / "sentences.txt",
                               "--query", texts[0], "--top-k", "2", "--no-progress")
    assert status == 0, err
    head, first, second = printed.strip().splitlines()
    assert head == f"query: {texts[0]}"
    assert first.startswith("    1. 1.0000  line 1: ") and second.startswith("    2. ")


def test_embed_and_search_errors(files, capsys, tmp_path):
    root, _ = files
    model = minilm_dir()
    status, _, err = run(capsys, "embed", "--model", model, "--input", root / "missing.txt", "--output",
                         tmp_path / "e.npy")
    assert_clean_error(status, err, "no such input file", "missing.txt")
    status, _, err = run(capsys, "embed", "--model", model, "--input", root / "sentences.txt", "--output",
                         tmp_path / "e.csv")
    assert_clean_error(status, err, "--output", "expected a .npy or .safetensors file")
    status, _, err = run(capsys, "embed", "--model", tmp_path, "--input", root / "sentences.txt", "--output",
                         tmp_path / "e.npy")
    assert_clean_error(status, err, "is not a checkpoint folder: expected config.json")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 1}\n')
    status, _, err = run(capsys, "embed", "--model", model, "--input", tmp_path / "bad.jsonl", "--output",
                         tmp_path / "e.npy")
    assert_clean_error(status, err, "bad.jsonl:2: expected a string or an object with a string 'text'")
    status, _, err = run(capsys, "embed", "--model", model, "--input", root / "sentences.jsonl", "--output",
                         tmp_path / "e.npy", "--column", "title")
    assert_clean_error(status, err, "sentences.jsonl:1")
    # saved embeddings of another model, and a lost rows file
    saved = tmp_path / "small.npy"
    assert run(capsys, "embed", "--model", root / "small_bert", "--input", root / "sentences.txt",
               "--output", saved, "--no-progress")[0] == 0
    status, _, err = run(capsys, "search", "--model", model, "--corpus", saved, "--query", "x")
    assert_clean_error(status, err, "holds 32-dim embeddings", "makes 384-dim ones")
    sentence.rows_path(saved).unlink()
    status, _, err = run(capsys, "search", "--model", model, "--corpus", saved, "--query", "x")
    assert_clean_error(status, err, "small.npy.rows.jsonl", "is missing")
    status, _, err = run(capsys, "search", "--model", model, "--corpus", root / "sentences.txt",
                         "--query", "x", "--top-k", "0")
    assert_clean_error(status, err, "--top-k expected a positive number, got 0")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    printed = capsys.readouterr().out
    assert "embed" in printed and "search" in printed
