"""The family's tokenizers through fastbert.data.Tokenizer: RoBERTa's byte-level BPE (vocab.json +
merges.txt, or tokenizer.json) and XLM-R's SentencePiece unigram (tokenizer.json) build the same
inputs as transformers' fast tokenizers, pairs and truncation included; SQuAD windows follow the
RoBERTa pair layout."""
import pytest

from fastbert import data

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "A résumé of naïve tokenisation.",
          "It jumped over the lazy dog twice, then ran into the forest.",
          "Question answering needs a context and a question about it."] * 20
A, B = "The quick brown fox, résumé!", "It jumped over the lazy dog twice."
MASKED = "the <mask> dog jumped"  # special tokens inside text stay whole


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("roberta_tok")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=ROBERTA_SPECIALS, show_progress=False)
    bpe.save_model(str(path))  # vocab.json + merges.txt
    return path


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("xlmr_tok")
    unigram = tokenizers.SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(CORPUS, vocab_size=120, show_progress=False, unk_token="<unk>",
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    unigram.save(str(path / "tokenizer.json"))
    return path


def _assert_same_inputs(ours, theirs):
    assert ours.encode(MASKED)["input_ids"] == theirs(MASKED)["input_ids"]
    assert ours.mask_id in ours.encode(MASKED)["input_ids"]
    ids = ours.encode(A, B)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    for max_length in (None, 14, 9):
        kw = dict(truncation="longest_first", max_length=max_length) if max_length else {}
        for pair in ((A,), (A, B)):
            got = ours.encode(*pair, max_length=max_length)
            want = theirs(*pair, **kw)
            assert got["input_ids"] == want["input_ids"], (pair, max_length)
            assert got["attention_mask"] == want["attention_mask"]
            assert set(got["token_type_ids"]) == {0}  # one segment id throughout


def test_roberta_bpe_files_match_transformers(roberta_dir):
    ours = data.Tokenizer.from_pretrained(roberta_dir)
    assert ours.style == "roberta" and (ours.cls_id, ours.pad_id, ours.sep_id) == (0, 1, 2)
    theirs = transformers.RobertaTokenizerFast.from_pretrained(str(roberta_dir))
    _assert_same_inputs(ours, theirs)
    theirs.save_pretrained(str(roberta_dir / "saved"))  # tokenizer.json, as checkpoints ship it
    again = data.Tokenizer.from_pretrained(roberta_dir / "saved")
    assert again.encode(A, B) == ours.encode(A, B)


def test_xlmr_unigram_matches_transformers(xlmr_dir):
    theirs = transformers.XLMRobertaTokenizerFast.from_pretrained(str(xlmr_dir))
    theirs.save_pretrained(str(xlmr_dir / "saved"))  # tokenizer.json as XLM-R checkpoints ship it
    ours = data.Tokenizer.from_pretrained(xlmr_dir / "saved")
    assert ours.style == "roberta"
    _assert_same_inputs(ours, theirs)


@pytest.mark.parametrize("files", ["vocab.json", "tokenizer.json"])
def test_squad_windows_in_the_roberta_layout(roberta_dir, files):
    if files == "tokenizer.json":
        transformers.RobertaTokenizerFast.from_pretrained(str(roberta_dir)).save_pretrained(
            str(roberta_dir / "saved"))
    tok = data.Tokenizer.from_pretrained(roberta_dir / ("saved" if files == "tokenizer.json"
                                                        else "vocab.json"))
    context = "It jumped over the lazy dog twice, then ran into the forest."
    answer = "the lazy dog"
    example = data.SquadExample("q1", "what did it jump over?", context, [answer],
                                context.index(answer), answer)
    (feature,) = data.squad_features([example], tok, max_length=64, doc_stride=16)
    ids = feature.inputs["input_ids"]
    q = len(tok.tokenize(example.question))
    assert ids[q + 1:q + 3] == [tok.sep_id, tok.sep_id]  # <s> Q </s></s> C </s>
    start, end = feature.inputs["start_positions"], feature.inputs["end_positions"]
    span = context[feature.offsets[start][0]:feature.offsets[end][1]]
    assert span == answer  # offsets trimmed to the word, as transformers' tokenizer gives them


def test_unknown_special_tokens_are_refused(tmp_path):
    wp = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="special tokens of BERT.*RoBERTa"):
        data.Tokenizer(wp)
    with pytest.raises(FileNotFoundError, match="tokenizer.json, vocab.txt nor vocab.json"):
        data.Tokenizer.from_pretrained(tmp_path)


def test_xlmr_sentence_transformer_matches_sentence_transformers(xlmr_dir, tmp_path):
    """A multilingual-retriever-shaped model (a tiny random XLM-R under sentence-transformers'
    mean pooling and Normalize) embeds as sentence-transformers does, in fastbert's classes."""
    st = pytest.importorskip("sentence_transformers")
    import torch

    from fastbert import SentenceEncoder

    model_dir = tmp_path / "xlmr"
    tok = transformers.XLMRobertaTokenizerFast.from_pretrained(str(xlmr_dir))
    config = transformers.XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64,
                                           max_position_embeddings=66, type_vocab_size=1,
                                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.XLMRobertaModel(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    from sentence_transformers.models import Normalize, Pooling, Transformer

    reference = st.SentenceTransformer(modules=[Transformer(str(model_dir), max_seq_length=64),
                                                Pooling(32, "mean"), Normalize()], device="cpu")
    reference.save(str(tmp_path / "st"))
    texts = CORPUS[:4] + ["jumps", "A much longer question about the lazy dog and the forest " * 3]
    want = reference.encode(texts, convert_to_tensor=True)
    ours = SentenceEncoder.from_pretrained(tmp_path / "st")
    assert ours.model.config.model_type == "xlm-roberta" and ours.normalize
    got = ours.encode(texts)
    cosine = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=1)
    assert cosine.min() >= 0.99999, cosine
