"""Data for BERT: the family's tokenizers, MLM masking, NSP pairs, classification files, SQuAD.

Everything here works on plain Python lists of token ids; `collate` turns a list of examples
into padded tensors. Randomness always comes from an explicit `random.Random` / `torch.Generator`
so that a run (and a resumed run, and every DDP rank) sees exactly the same data.
"""
from __future__ import annotations

import collections
import csv
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100  # label value that cross-entropy skips


class DataError(ValueError):
    """A problem with a user's data file, with the file and line that caused it."""

    def __init__(self, path, message, line: Optional[int] = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """A BERT-family tokenizer (the `tokenizers` library) with the special ids at hand: WordPiece
    (BERT, DistilBERT, ELECTRA), byte-level BPE (RoBERTa; ModernBERT's, with BERT's [CLS]-style
    specials) or SentencePiece unigram (XLM-R).

    Load one from a checkpoint directory (tokenizer.json, vocab.txt, or RoBERTa's vocab.json +
    merges.txt), from one of those files, or train a new WordPiece vocabulary with `train`.
    `encode` builds the family's inputs: `[CLS] A [SEP] B [SEP]` with segment ids 0/1 (BERT), or
    `<s> A </s></s> B </s>` all in segment 0 (RoBERTa, XLM-R), chosen by the special tokens the
    vocabulary has.
    """

    # special tokens, in the order pad, unk, cls, sep, mask, of each input style
    STYLES = {"bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
              "roberta": ("<pad>", "<unk>", "<s>", "</s>", "<mask>")}
    SPECIALS = STYLES["bert"]  # what `train` reserves

    def __init__(self, backend):
        self.backend = backend  # a tokenizers.Tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self.style = next((style for style, tokens in self.STYLES.items()
                           if all(backend.token_to_id(t) is not None for t in tokens)), None)
        if self.style is None:
            missing = {style: [t for t in tokens if backend.token_to_id(t) is None]
                       for style, tokens in self.STYLES.items()}
            raise ValueError(f"tokenizer: vocabulary lacks the special tokens of BERT "
                             f"{missing['bert']} and of RoBERTa {missing['roberta']}")
        ids = [backend.token_to_id(t) for t in self.STYLES[self.style]]
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        self.special_ids = frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend
        from tokenizers.implementations import BertWordPieceTokenizer

        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "vocab.txt", "vocab.json"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                sentencepiece = sorted(p.name for p in path.glob("*.model"))
                hint = (f" (a SentencePiece-only folder, {sentencepiece[0]}: save it once with "
                        f"transformers' AutoTokenizer to get tokenizer.json)" if sentencepiece else "")
                raise FileNotFoundError(
                    f"tokenizer: {path} has neither tokenizer.json, vocab.txt nor vocab.json + "
                    f"merges.txt{hint}")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no such file {path}")
        if path.name == "vocab.json":  # RoBERTa's byte-level BPE as two files
            merges = path.parent / "merges.txt"
            if not merges.is_file():
                raise FileNotFoundError(f"tokenizer: {path} needs merges.txt beside it")
            return cls(_roberta_bpe(path, merges))
        if path.suffix == ".json":
            return cls(Backend.from_file(str(path)))
        lowercase = True  # BERT uncased, unless tokenizer_config.json says otherwise
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            lowercase = json.loads(config.read_text()).get("do_lower_case", True)
        return cls(BertWordPieceTokenizer(str(path), lowercase=lowercase)._tokenizer)

    @classmethod
    def train(cls, files: Sequence, vocab_size: int = 30522, lowercase: bool = True,
              min_frequency: int = 2) -> "Tokenizer":
        from tokenizers.implementations import BertWordPieceTokenizer

        trainer = BertWordPieceTokenizer(lowercase=lowercase)
        trainer.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=min_frequency,
                      special_tokens=list(cls.SPECIALS), show_progress=False)
        return cls(trainer._tokenizer)

    def save(self, directory) -> None:
        """Write tokenizer.json, and for WordPiece vocab.txt (what BertTokenizer reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        if type(self.backend.model).__name__ != "WordPiece":
            return
        vocab = sorted(self.backend.get_vocab().items(), key=lambda kv: kv[1])
        (directory / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab), encoding="utf-8")

    def tokenize(self, text: str) -> List[int]:
        """Token ids of `text` without special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def num_special_tokens(self, pair: bool) -> int:
        """How many special tokens build_inputs adds: 2 for one segment, 3 (BERT) or 4 (RoBERTa)
        for a pair."""
        return 2 if not pair else (3 if self.style == "bert" else 4)

    def second_segment_start(self, len_a: int) -> int:
        """The position of segment B's first token in build_inputs(A, B)."""
        return len_a + self.num_special_tokens(True) - 1

    def build_inputs(self, ids_a: List[int], ids_b: Optional[List[int]] = None,
                     max_length: Optional[int] = None) -> Dict[str, List[int]]:
        """`[CLS] A [SEP] (B [SEP])` (RoBERTa: `<s> A </s> (</s> B </s>)`), truncating the longer
        segment first to fit `max_length`."""
        ids_a, ids_b = list(ids_a), (list(ids_b) if ids_b is not None else None)
        if max_length is not None:
            budget = max_length - self.num_special_tokens(ids_b is not None)
            if budget < 0:
                raise ValueError(f"tokenizer: max_length {max_length} leaves no room for tokens")
            truncate_pair(ids_a, ids_b or [], budget)
        input_ids = [self.cls_id] + ids_a + [self.sep_id]
        token_type_ids = [0] * len(input_ids)
        if ids_b is not None:
            b = ([] if self.style == "bert" else [self.sep_id]) + ids_b + [self.sep_id]
            input_ids += b
            token_type_ids += [1 if self.style == "bert" else 0] * len(b)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids,
                "attention_mask": [1] * len(input_ids)}

    def encode(self, text_a: str, text_b: Optional[str] = None,
               max_length: Optional[int] = 512) -> Dict[str, List[int]]:
        return self.build_inputs(self.tokenize(text_a),
                                 self.tokenize(text_b) if text_b is not None else None, max_length)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


WordPieceTokenizer = Tokenizer  # the name before the family's tokenizers were served


def _roberta_bpe(vocab: Path, merges: Path):
    """RoBERTa's tokenizer from vocab.json + merges.txt as transformers builds it: byte-level BPE
    with offsets trimmed to the word (no leading space) and the special tokens kept whole."""
    from tokenizers import AddedToken
    from tokenizers.implementations import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(str(vocab), str(merges), trim_offsets=True)._tokenizer
    bpe.add_special_tokens([AddedToken(t, normalized=False)
                            for t in Tokenizer.STYLES["roberta"]])
    return bpe


def truncate_pair(ids_a: List[int], ids_b: List[int], budget: int) -> None:
    """Cut both lists (in place) to fit `budget` tokens as transformers' fast tokenizers do
    ("longest_first"): the shorter keeps all its tokens if they fit in half the budget, else
    each gets half and the longer one (B on a tie) the odd token."""
    if len(ids_a) + len(ids_b) <= budget:
        return
    short = min(len(ids_a), len(ids_b))
    if 2 * short > budget:
        keep_short, keep_long = budget // 2, budget - budget // 2
    else:
        keep_short, keep_long = short, budget - short
    a_is_longer = len(ids_a) > len(ids_b)
    del ids_a[keep_long if a_is_longer else keep_short:]
    del ids_b[keep_short if a_is_longer else keep_long:]


def collate(examples: Sequence[dict], pad_id: int = 0, pad_to_multiple_of: int = 8) -> Dict[str, torch.Tensor]:
    """Pad a list of examples to the batch's longest sequence (rounded up to a multiple of 8,
    which tensor cores like). Sequence fields are padded (labels with -100); scalars are stacked."""
    length = max(len(ex["input_ids"]) for ex in examples)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    pad_value = {"input_ids": pad_id, "token_type_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], list):
            fill = pad_value[key]
            batch[key] = torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
    return batch


# --------------------------------------------------------------------------------------------
# masked language modelling
# --------------------------------------------------------------------------------------------

def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids, mask_id: int,
                vocab_size: int, generator: torch.Generator, mlm_probability: float = 0.15):
    """BERT's masking: choose `mlm_probability` of the real, non-special tokens; of those 80 % become
    [MASK], 10 % a random token, 10 % stay. Returns (masked input_ids, labels) with labels -100 for
    tokens not chosen. Special tokens and padding are never chosen."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in special_ids:
        special |= input_ids == i
    eligible = attention_mask.bool() & ~special
    chosen = (torch.rand(input_ids.shape, generator=generator) < mlm_probability) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


# --------------------------------------------------------------------------------------------
# next sentence prediction
# --------------------------------------------------------------------------------------------

def read_documents(paths: Sequence) -> List[List[str]]:
    """Raw pre-training text: one sentence per line, a blank line between documents."""
    documents, current = [], []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    current.append(line)
                elif current:
                    documents.append(current)
                    current = []
        if current:
            documents.append(current)
            current = []
    if not documents:
        raise DataError(paths[0] if len(paths) == 1 else list(map(str, paths)), "no text found")
    return documents


def build_nsp_examples(documents: List[List[List[int]]], tokenizer: Tokenizer,
                       max_length: int, rng: random.Random) -> List[dict]:
    """Sentence pairs for MLM+NSP from tokenized documents (lists of sentences of ids).

    Segment A is a run of consecutive sentences filling about half the length, always leaving at
    least one sentence of its document after it; B is, with probability 1/2, the sentences that
    follow A (IsNext, label 0), otherwise sentences from a random other document (NotNext,
    label 1). A document's lone last sentence starts no pair (it has no true next sentence).
    """
    if len(documents) < 2:
        raise ValueError("NSP needs at least two documents (separate them by a blank line)")
    half = max(1, (max_length - 3) // 2)
    examples = []
    for doc_index, doc in enumerate(documents):
        start = 0
        while start < len(doc) - 1:
            end, a = start, []
            while end < len(doc) - 1 and (not a or len(a) + len(doc[end]) <= half):
                a += doc[end]
                end += 1
            is_next = rng.random() < 0.5
            if is_next:
                b_doc, b_start = doc, end
            else:
                other = rng.randrange(len(documents) - 1)
                other += other >= doc_index  # any document but this one
                b_doc = documents[other]
                b_start = rng.randrange(len(b_doc))
            b, b_end = [], b_start
            while b_end < len(b_doc) and (not b or len(a) + len(b) + len(b_doc[b_end]) <= max_length - 3):
                b += b_doc[b_end]
                b_end += 1
            example = tokenizer.build_inputs(a, b, max_length)
            example["next_sentence_label"] = 0 if is_next else 1
            examples.append(example)
            # IsNext consumed B too; NotNext only A (B came from elsewhere)
            start = b_end if is_next else end
    return examples


def build_lm_examples(documents: List[List[List[int]]], tokenizer: Tokenizer,
                      max_length: int) -> List[dict]:
    """Causal LM training sequences: each document as `[CLS] sentences... [SEP]`, the whole
    stream cut into pieces of `max_length` tokens (the last one shorter)."""
    stream = []
    for doc in documents:
        stream += [tokenizer.cls_id] + [t for sentence in doc for t in sentence] + [tokenizer.sep_id]
    examples = []
    for i in range(0, len(stream), max_length):
        ids = stream[i:i + max_length]
        if len(ids) > 1:  # one token predicts nothing
            examples.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "attention_mask": [1] * len(ids)})
    return examples


# --------------------------------------------------------------------------------------------
# sequence classification
# --------------------------------------------------------------------------------------------

def read_classification(path) -> List[Tuple[str, str]]:
    """(text, label) pairs from a CSV with `text,label` columns (header row required), a JSONL
    file of {"text": ..., "label": ...} objects, or a directory with one sub-folder of .txt files
    per class. Malformed lines raise a DataError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        rows = []
        for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
            for file in sorted(class_dir.glob("*.txt")):
                rows.append((file.read_text(encoding="utf-8", errors="replace").strip(), class_dir.name))
        if not rows:
            raise DataError(path, "expected one sub-folder of .txt files per class, found none")
        return rows
    if not path.is_file():
        raise FileNotFoundError(f"no such data file or directory: {path}")
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if path.suffix == ".tsv" else ",")
    raise DataError(path, "unknown format: expected .csv, .tsv, .jsonl or a directory of class folders")


def iter_jsonl(path: Path):
    """(line number, parsed object) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON ({e.msg})", line_no) from None


def _read_jsonl(path: Path) -> List[Tuple[str, str]]:
    rows = []
    for line_no, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(path, 'expected an object with "text" and "label"', line_no)
        if obj.get("label") is None:
            raise DataError(path, 'missing "label"', line_no)
        rows.append((str(obj["text"]), str(obj["label"])))
    if not rows:
        raise DataError(path, "no examples")
    return rows


def _read_csv(path: Path, delimiter: str) -> List[Tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None or "text" not in header or "label" not in header:
            raise DataError(path, f"expected a header row with 'text' and 'label' columns, got {header}", 1)
        text_col, label_col = header.index("text"), header.index("label")
        for row in reader:
            line_no = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(path, f"expected {len(header)} fields, got {len(row)}", line_no)
            if not row[label_col].strip():
                raise DataError(path, "missing label", line_no)
            rows.append((row[text_col], row[label_col].strip()))
    if not rows:
        raise DataError(path, "no examples")
    return rows


def split_holdout(rows: list, fraction: float, seed: int) -> Tuple[list, list]:
    """Shuffle with `seed` and hold out `fraction` of the rows: (train, held_out)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = int(round(len(rows) * fraction))
    return rows[n_eval:], rows[:n_eval]


# --------------------------------------------------------------------------------------------
# SQuAD (v1.1 and v2.0)
# --------------------------------------------------------------------------------------------

@dataclass
class SquadExample:
    id: str
    question: str
    context: str
    answers: List[str]                 # every gold answer text ([] if unanswerable)
    answer_start: Optional[int] = None  # char offset of the first answer (training target)
    answer_text: Optional[str] = None


@dataclass
class QAFeature:
    """One window of one example; `offsets[i]` is the context char span of token i (None
    outside the context)."""
    example_index: int
    inputs: dict
    offsets: List[Optional[Tuple[int, int]]] = field(repr=False)


def read_squad(path) -> List[SquadExample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such SQuAD file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON ({e.msg})", e.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(path, 'expected SQuAD format: {"data": [{"paragraphs": [...]}]}')
    examples = []
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = qa.get("answers", [])
                if not answers and not qa.get("is_impossible", False):
                    raise DataError(path, f"question {qa.get('id')!r} has no answers and is not marked is_impossible")
                first = answers[0] if answers else None
                if first is not None and context[first["answer_start"]:].find(first["text"]) != 0:
                    raise DataError(path, f"question {qa['id']!r}: answer_start does not point at the answer text")
                examples.append(SquadExample(
                    id=qa["id"], question=qa["question"], context=context,
                    answers=[a["text"] for a in answers],
                    answer_start=first["answer_start"] if first else None,
                    answer_text=first["text"] if first else None))
    if not examples:
        raise DataError(path, "no questions")
    return examples


def squad_features(examples: Sequence[SquadExample], tokenizer: Tokenizer, max_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64) -> List[QAFeature]:
    """Split each context into windows of `max_length` tokens (`[CLS] question [SEP] window [SEP]`),
    consecutive windows starting `doc_stride` context tokens apart (BERT's run_squad meaning).
    Training targets: the token span of the answer, or 0 (the [CLS] position) when the answer is
    not wholly inside the window or the question is unanswerable."""
    features = []
    for index, ex in enumerate(examples):
        question = tokenizer.tokenize(ex.question)[:max_query_length]
        context_ids, context_offsets = tokenizer.encode_with_offsets(ex.context)
        window = max_length - len(question) - tokenizer.num_special_tokens(True)
        if window <= 0:
            raise ValueError(f"squad_features: max_length {max_length} too small for the question")
        if not 0 < doc_stride <= window:
            raise ValueError(f"squad_features: doc_stride must be in [1, {window}], got {doc_stride}")
        starts = [0]  # BERT's run_squad: step by doc_stride until a window reaches the end
        while starts[-1] + window < len(context_ids):
            starts.append(starts[-1] + doc_stride)
        for start in starts:
            chunk = context_ids[start:start + window]
            inputs = tokenizer.build_inputs(question, chunk)
            first_context = tokenizer.second_segment_start(len(question))
            offsets = [None] * first_context + list(context_offsets[start:start + len(chunk)]) + [None]
            start_pos = end_pos = 0
            if ex.answer_start is not None:
                a_start, a_end = ex.answer_start, ex.answer_start + len(ex.answer_text)
                inside = [i for i, o in enumerate(offsets) if o is not None and o[0] < a_end and o[1] > a_start]
                if inside and offsets[inside[0]][0] <= a_start and offsets[inside[-1]][1] >= a_end:
                    start_pos, end_pos = inside[0], inside[-1]
            inputs["start_positions"], inputs["end_positions"] = start_pos, end_pos
            features.append(QAFeature(index, inputs, offsets))
    return features


def decode_answer(start_logits: Sequence[float], end_logits: Sequence[float],
                  offsets: List[Optional[Tuple[int, int]]], context: str, n_best: int = 20,
                  max_answer_length: int = 30) -> Tuple[str, float]:
    """Best context span of one window: (text, score = start + end logit); ("", -inf) if none.
    Only spans with end >= start, at most `max_answer_length` tokens, wholly inside the context."""
    start_logits, end_logits = list(map(float, start_logits)), list(map(float, end_logits))
    n = len(offsets)
    top_starts = sorted(range(n), key=lambda i: -start_logits[i])[:n_best]
    top_ends = sorted(range(n), key=lambda i: -end_logits[i])[:n_best]
    best, best_score = "", float("-inf")
    for s in top_starts:
        for e in top_ends:
            if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = start_logits[s] + end_logits[e]
            if score > best_score:
                best, best_score = context[offsets[s][0]:offsets[e][1]], score
    return best, best_score


def squad_predictions(examples: Sequence[SquadExample], features: Sequence[QAFeature], start_logits,
                      end_logits, max_answer_length: int = 30, version_2: bool = False) -> Dict[str, str]:
    """id -> predicted text, taking the best span over all windows of an example. With SQuAD v2,
    predict "" when the null score ([CLS] start + end) beats the best span in every window."""
    best = {}
    for feature, s_logits, e_logits in zip(features, start_logits, end_logits):
        ex = examples[feature.example_index]
        text, score = decode_answer(s_logits, e_logits, feature.offsets, ex.context,
                                    max_answer_length=max_answer_length)
        null_score = float(s_logits[0]) + float(e_logits[0])
        text_prev, score_prev, null_prev = best.get(ex.id, ("", float("-inf"), float("inf")))
        if score > score_prev:
            text_prev, score_prev = text, score
        best[ex.id] = (text_prev, score_prev, min(null_prev, null_score))
    return {qid: ("" if version_2 and null > score else text) for qid, (text, score, null) in best.items()}


# The official SQuAD v1.1/v2.0 evaluation (normalise, then exact match and token F1, max over
# the gold answers; an unanswerable question's only gold answer is "").

def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred_tokens or not truth_tokens:  # v2: both empty is a match, one empty is not
        return float(pred_tokens == truth_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_evaluate(examples: Sequence[SquadExample], predictions: Dict[str, str]) -> Dict[str, float]:
    """{"exact_match", "f1"} in percent, as the official script reports them."""
    em = f1 = 0.0
    for ex in examples:
        golds = ex.answers or [""]
        pred = predictions.get(ex.id, "")
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples)}
