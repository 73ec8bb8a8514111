"""Sentence embeddings: encode texts with a BERT checkpoint, compare them, search a corpus.

    encoder = fastbert.SentenceEncoder.from_pretrained("path/to/all-MiniLM-L6-v2")
    emb = encoder.encode(["A man is eating food.", "Someone has a meal."])   # (2, 384)
    encoder.similarity(emb, emb)                                           # (2, 2) cosine
    encoder.search(["what did he eat?"], emb, top_k=1)                     # [[(1, 0.61)]]

A checkpoint folder is either a sentence-transformers folder (modules.json: Transformer, Pooling,
optionally Normalize; max length from sentence_bert_config.json) or a plain checkpoint (mean
pooling, no normalization) of BERT or its family (RoBERTa, XLM-R, ELECTRA, DistilBERT: multilingual
retrievers are XLM-R; ModernBERT: gte-modernbert, modernbert-embed). The tokenizer comes from the
same folder.

Also here, for `fastbert embed` / `fastbert search`: reading texts from .txt/.csv/.tsv/.jsonl
files and saving/loading embeddings (.npy or .safetensors) with the input line of every row.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastbert.family import FAMILIES

POOLING_MODES = ("mean", "cls", "max")
# sentence-transformers' Pooling config key -> our mode name
_ST_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                    "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# modules.json names a module by its class path: sentence_transformers.models.Pooling before
# version 6, sentence_transformers.sentence_transformer.modules.pooling.Pooling (and the like) since
_ST_PACKAGE = "sentence_transformers."


def _module_kind(type_name: str) -> str:
    """"Pooling" for any sentence-transformers path of the Pooling class; else the name as is."""
    return type_name.rsplit(".", 1)[-1] if type_name.startswith(_ST_PACKAGE) else type_name


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_AUTO_PROGRESS_TEXTS = 1024  # show_progress=None: a bar from this many texts on (on a terminal)

Texts = Union[str, Sequence[str]]


def _check_texts(texts, what: str, allow_empty: bool = False) -> List[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{what}: expected a string or a list of strings, got {type(texts).__name__}")
    if not texts and not allow_empty:
        raise ValueError(f"{what}: expected at least one text, got an empty {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}: expected every item to be a str, got {type(text).__name__} "
                            f"at index {i}")
    return list(texts)


def _as_matrix(x, what: str) -> torch.Tensor:
    """Embeddings given as a tensor or numpy array, as a 2-D float tensor."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what}: expected embeddings (a tensor or numpy array) or texts, "
                            f"got {type(x).__name__}") from None
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating (N, C) matrix of embeddings, got "
                         f"{x.dtype} of shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: expected at least one embedding, got shape {tuple(x.shape)}")
    return x


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path}:{e.lineno}: malformed JSON ({e.msg})") from None


def _pooling_from_config(path: Path) -> str:
    config = _read_json(path, "SentenceEncoder.from_pretrained")
    if "pooling_mode" in config:  # sentence-transformers >= 6: a mode name or a list of them
        named = config["pooling_mode"]
        modes = [named] if isinstance(named, str) else list(named)
    else:  # one boolean key per mode
        modes = [mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"SentenceEncoder.from_pretrained: {path} asks for pooling {modes}; "
                         f"expected exactly one of {list(POOLING_MODES)}")
    return modes[0]


def pool(rows: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """(T, C) packed token vectors of B sequences laid end to end, `lengths` (B,) int64 (each >= 1)
    -> (B, C) in fp32. Only real tokens exist in the packed rows, so padding never contributes."""
    rows = rows.float()
    batch, dim = lengths.numel(), rows.shape[1]
    if mode == "cls":
        starts = torch.cumsum(lengths, 0) - lengths
        return rows.index_select(0, starts)
    sequence = torch.repeat_interleave(torch.arange(batch, device=rows.device), lengths)  # (T,)
    if mode == "mean":
        return rows.new_zeros(batch, dim).index_add_(0, sequence, rows) / lengths[:, None]
    if mode == "max":
        return rows.new_full((batch, dim), float("-inf")).scatter_reduce_(
            0, sequence[:, None].expand(-1, dim), rows, "amax")
    raise ValueError(f"pool: mode expected one of {list(POOLING_MODES)}, got {mode!r}")


def batches_by_budget(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> List[List[int]]:
    """Indices of `lengths`, longest first, cut into batches of at most `batch_size` texts whose
    padded size (texts x longest length) stays within `max_batch_tokens` (a text longer than the
    budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, current = [], []
    for i in order:
        # sorted longest first: the batch's padded length is its first text's
        if current and (len(current) == batch_size or
                        (len(current) + 1) * lengths[current[0]] > max_batch_tokens):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def _alias(what: str, name: str, value, alias: str, alias_value):
    """The value of an argument that has an older alias; both given must agree."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{what}: {name}={value!r} and its alias {alias}={alias_value!r} disagree; "
                         f"pass one of them")
    return value if value is not None else alias_value


def _tokenizer_max_length(folder: Path, what: str) -> Optional[int]:
    """tokenizer_config.json's model_max_length, unless absent or transformers' "no limit"
    placeholder (1e30): sentence-transformers caps a Transformer module without max_seq_length at
    min(max_position_embeddings, model_max_length), and so does SentenceEncoder."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return None
    limit = _read_json(file, what).get("model_max_length")
    return int(limit) if isinstance(limit, (int, float)) and 2 <= limit < 1e9 else None


class SentenceEncoder:
    """A BERT encoder with pooling (mean, cls or max) and optional L2 normalization."""

    def __init__(self, model, tokenizer, pooling: str = "mean", normalize: bool = False,
                 max_length: Optional[int] = None):
        if pooling not in POOLING_MODES:
            raise ValueError(f"SentenceEncoder: pooling expected one of {list(POOLING_MODES)}, "
                             f"got {pooling!r}")
        self.model = model.eval()
        # on a GPU, small batches replay CUDA graphs (fastbert/graphs.py); False: always eager
        self.use_cuda_graphs = True
        self.graphs = None  # the GraphedEncoder, made on the first GPU batch
        self.tokenizer = tokenizer  # a fastbert.data.Tokenizer
        self.pooling = pooling
        self.normalize = normalize
        limit = model.config.max_sequence_length
        self.max_length = min(max_length or limit, limit)
        if self.max_length < 2:
            raise ValueError(f"SentenceEncoder: max_length expected >= 2 ([CLS] and [SEP]), "
                             f"got {self.max_length}")

    # ----------------------------------------------------------------------------------------
    # loading
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                        max_length: Optional[int] = None, device=None, dtype=None) -> "SentenceEncoder":
        """Load a sentence-transformers folder or a plain BERT-family checkpoint folder. pooling,
        normalize and max_length override what the folder says; dtype (fp16/bf16) is for GPUs."""
        import fastbert
        from fastbert.data import Tokenizer

        what = "SentenceEncoder.from_pretrained"
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{what}: expected a checkpoint folder, got {str(path)!r} "
                                    f"(no such directory)")
        bert_dir, st_pooling, st_normalize, st_max_length = root, None, False, None
        if (root / "modules.json").is_file():
            modules = _read_json(root / "modules.json", what)
            for module in modules:
                kind = _module_kind(str(module.get("type", "")))
                folder = root / module.get("path", "")
                if kind == "Transformer":
                    bert_dir = folder
                    if (folder / "sentence_bert_config.json").is_file():
                        st_max_length = _read_json(folder / "sentence_bert_config.json",
                                                   what).get("max_seq_length")
                elif kind == "Pooling":
                    st_pooling = _pooling_from_config(folder / "config.json")
                elif kind == "Normalize":
                    st_normalize = True
                else:
                    raise ValueError(f"{what}: {root / 'modules.json'} has a {module.get('type')!r} "
                                     f"module; expected only Transformer, Pooling and Normalize")
        config_file = bert_dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{what}: {str(path)!r} is not a checkpoint folder: expected "
                                    f"config.json (a BERT or sentence-transformers checkpoint), "
                                    f"found no {config_file}")
        model_type = _read_json(config_file, what).get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{what}: {config_file} describes a {model_type!r} model; expected "
                             f"one of the BERT family (model_type {', '.join(sorted(FAMILIES))})")
        if not any((bert_dir / f).is_file() for f in _WEIGHT_FILES):
            raise FileNotFoundError(f"{what}: {bert_dir} has no weights; expected one of "
                                    f"{', '.join(_WEIGHT_FILES)}")
        if st_max_length is None:  # as sentence-transformers: the tokenizer's limit applies too
            st_max_length = _tokenizer_max_length(bert_dir, what)
        tokenizer = Tokenizer.from_pretrained(bert_dir)
        model = fastbert.BertModel.from_pretrained(str(bert_dir))
        model.pooler = None  # sentence embeddings pool the token vectors, not BERT's [CLS] pooler
        encoder = cls(model, tokenizer, pooling=pooling or st_pooling or "mean",
                      normalize=st_normalize if normalize is None else normalize,
                      max_length=max_length or st_max_length)
        return encoder.to(device, dtype)

    def to(self, device=None, dtype=None) -> "SentenceEncoder":
        """Move the model; dtype "bf16"/"fp16" (or torch dtypes) run half precision: both on a
        GPU, bf16 also on a CPU with native bf16 dot products (AVX512-BF16 or AMX, as
        `python -m fastbert.info` reports), where its GEMMs run on oneDNN in bf16. Embeddings
        come back in fp32 either way."""
        from fastbert import cpu

        device = torch.device(device) if device is not None else self.device
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"SentenceEncoder.to: dtype expected one of {sorted(_DTYPES)}, "
                                 f"got {dtype!r}")
            dtype = _DTYPES[dtype]
        if device.type != "cuda":
            if dtype == torch.float16:
                raise ValueError(f"SentenceEncoder.to: dtype {dtype} is for GPUs; on {device} "
                                 f"expected float32 (or bfloat16 on a CPU with native bf16)")
            native, why = cpu.bf16_support()
            if dtype == torch.bfloat16 and not native:  # emulated bf16 runs slower than fp32
                raise ValueError(f"SentenceEncoder.to: dtype {dtype} on {device} needs native bf16 "
                                 f"dot products, but {why}; expected float32")
        self.model.to(device=device, dtype=dtype)
        self.graphs = None  # captured on the old device or dtype
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def __repr__(self):
        c = self.model.config
        return (f"SentenceEncoder(BERT {c.num_hidden_layers} x {c.hidden_size}, pooling={self.pooling}, "
                f"normalize={self.normalize}, max_length={self.max_length}, device={self.device})")

    # ----------------------------------------------------------------------------------------
    # encoding
    # ----------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        """[CLS] tokens [SEP] for every text, truncated to max_length."""
        tok = self.tokenizer
        keep = self.max_length - 2
        encodings = tok.backend.encode_batch(list(texts), add_special_tokens=False)
        return [[tok.cls_id, *e.ids[:keep], tok.sep_id] for e in encodings]

    def encode(self, texts: Texts, batch_size: int = 128, max_batch_tokens: int = 16384,
               normalize_embeddings: bool = False, show_progress_bar: Optional[bool] = None,
               convert_to_numpy: Optional[bool] = None, convert_to_tensor: Optional[bool] = None,
               device=None, output_value: str = "sentence_embedding", *,
               normalize: Optional[bool] = None, show_progress: Optional[bool] = None):
        """Embeddings of `texts` in their order, with sentence-transformers' `encode` arguments.

        Returns an (N, C) fp32 tensor on the CPU (numpy with convert_to_numpy=True;
        convert_to_tensor=True wins over it, as in sentence-transformers); a single string gives
        one (C,) vector, an empty list an empty (0, C) result. output_value="token_embeddings"
        gives a list of (tokens_i, C) fp32 tensors instead, [CLS] and [SEP] included.

        Texts are sorted by length and batched by at most `batch_size` texts and
        `max_batch_tokens` tokens (counted as texts x the longest: the attention of a batch costs
        that much on backends that run it on a padded grid). normalize_embeddings=True
        L2-normalizes; False (the default) does as the checkpoint says, as in
        sentence-transformers, where a Normalize module still applies. normalize (fastbert's
        name) overrides the checkpoint both ways: True or False. show_progress_bar (alias
        show_progress): a tqdm bar (default: from 1024 texts, on a terminal). device: move the
        encoder there first (it stays there)."""
        what = "SentenceEncoder.encode"
        single = isinstance(texts, str)
        texts = _check_texts(texts, f"{what}: texts", allow_empty=True)
        if normalize_embeddings and normalize is False:
            raise ValueError(f"{what}: normalize_embeddings=True and normalize=False disagree; pass "
                             f"one of them")
        normalize = True if normalize_embeddings else normalize
        show_progress = _alias(what, "show_progress_bar", show_progress_bar, "show_progress", show_progress)
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what}: {name} expected a positive int, got {value!r}")
        if output_value not in ("sentence_embedding", "token_embeddings"):
            raise ValueError(f"{what}: output_value expected 'sentence_embedding' or "
                             f"'token_embeddings', got {output_value!r}")
        if device is not None:
            self.to(device)
        normalize = self.normalize if normalize is None else normalize
        tokens = output_value == "token_embeddings"
        ids = self.tokenize(texts)
        batches = batches_by_budget([len(x) for x in ids], batch_size, max_batch_tokens)
        out = [None] * len(texts) if tokens else torch.empty(len(texts), self.dim, dtype=torch.float32,
                                                             device=self.device)
        bar = None
        if show_progress or (show_progress is None and len(texts) >= _AUTO_PROGRESS_TEXTS):
            from tqdm import tqdm
            bar = tqdm(total=len(texts), unit="text", desc="encode", dynamic_ncols=True,
                       disable=None if show_progress is None else False)
        try:
            with torch.inference_mode():
                for batch in batches:
                    rows = [ids[i] for i in batch]
                    if tokens:
                        per_text = self._token_rows(rows).float().cpu().split([len(r) for r in rows])
                        for i, vectors in zip(batch, per_text):
                            out[i] = vectors
                    else:
                        out[torch.tensor(batch, device=self.device)] = self._embed_batch(rows)
                    if bar is not None:
                        bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        if tokens:  # never normalized: sentence-transformers normalizes sentence embeddings only
            return out[0] if single else out
        if normalize:
            out = F.normalize(out, dim=-1)
        out = out.cpu()
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy and not convert_to_tensor else out

    def _token_rows(self, rows: List[List[int]]) -> torch.Tensor:
        """(T, C) packed token vectors of B token-id lists laid end to end (no padding)."""
        device = self.device
        lengths = torch.tensor([len(r) for r in rows])
        input_ids = torch.tensor([[t for r in rows for t in r]], device=device)  # (1, T)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(device, torch.int32)
        if device.type == "cuda" and self.use_cuda_graphs:
            if self.graphs is None:
                from fastbert.graphs import cuda_graphs
                self.graphs = cuda_graphs(self.model)
            return self.graphs(input_ids, cu_seqlens, int(lengths.max()))
        return self.model(input_ids, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()),
                          return_packed=True).last_hidden_state

    def _embed_batch(self, rows: List[List[int]]) -> torch.Tensor:
        """(B, C) pooled fp32 vectors of B token-id lists. The model gets them packed end to end
        (input_ids (1, T) with cu_seqlens), so no work is spent on padding."""
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        return pool(self._token_rows(rows), lengths, self.pooling)

    # ----------------------------------------------------------------------------------------
    # comparing
    # ----------------------------------------------------------------------------------------

    def _embeddings(self, x, what: str) -> torch.Tensor:
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and (not x or isinstance(x[0], str))):
            return self.encode(_check_texts(x, f"{what}: texts"), normalize=True)
        return _as_matrix(x, what)

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity matrix (N, M) of two sets of embeddings (or texts, encoded first)."""
        a = _as_matrix(self._embeddings(a, "SentenceEncoder.similarity: a"), "SentenceEncoder.similarity: a")
        b = _as_matrix(self._embeddings(b, "SentenceEncoder.similarity: b"), "SentenceEncoder.similarity: b")
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"SentenceEncoder.similarity: a and b expected the same embedding size, "
                             f"got {a.shape[1]} and {b.shape[1]}")
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    def search(self, queries, corpus_embeddings, top_k: int = 10, query_chunk_size: int = 256,
               corpus_chunk_size: int = 65536) -> List[List[Tuple[int, float]]]:
        """Exact cosine search: for every query (a text, texts or embeddings), the `top_k` corpus
        rows as (index, score), best first. Scores are computed `query_chunk_size` x
        `corpus_chunk_size` at a time, so a large corpus never needs an N x M matrix."""
        return search(self._embeddings(queries, "SentenceEncoder.search: queries"), corpus_embeddings,
                      top_k, query_chunk_size, corpus_chunk_size)


def search(query_embeddings, corpus_embeddings, top_k: int = 10, query_chunk_size: int = 256,
           corpus_chunk_size: int = 65536) -> List[List[Tuple[int, float]]]:
    """Exact top-k cosine search, chunked; see SentenceEncoder.search."""
    what = "search"
    queries = _as_matrix(query_embeddings, f"{what}: queries")
    corpus = _as_matrix(corpus_embeddings, f"{what}: corpus_embeddings")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"{what}: queries and corpus_embeddings expected the same embedding size, "
                         f"got {queries.shape[1]} and {corpus.shape[1]}")
    for name, value in (("top_k", top_k), ("query_chunk_size", query_chunk_size),
                        ("corpus_chunk_size", corpus_chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{what}: {name} expected a positive int, got {value!r}")
    k = min(top_k, corpus.shape[0])
    results = []
    for q0 in range(0, queries.shape[0], query_chunk_size):
        q = F.normalize(queries[q0:q0 + query_chunk_size].float(), dim=-1)
        best_scores = torch.full((q.shape[0], 0), -math.inf, device=q.device)
        best_index = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for c0 in range(0, corpus.shape[0], corpus_chunk_size):
            c = F.normalize(corpus[c0:c0 + corpus_chunk_size].to(q.device, torch.float32), dim=-1)
            scores = q @ c.T  # (chunk of queries, chunk of corpus)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            # merge this chunk's best with the best so far
            best_scores = torch.cat([best_scores, top.values], 1)
            best_index = torch.cat([best_index, top.indices + c0], 1)
            keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
            best_scores, best_index = keep.values, best_index.gather(1, keep.indices)
        results += [list(zip(idx, score)) for idx, score in zip(best_index.tolist(), best_scores.tolist())]
    return results


# --------------------------------------------------------------------------------------------
# files: texts in, embeddings out (fastbert embed / fastbert search)
# --------------------------------------------------------------------------------------------

EMBEDDING_SUFFIXES = (".npy", ".safetensors")
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


def read_texts(path, column: Optional[str] = None) -> Tuple[List[str], List[int]]:
    """(texts, line numbers) from a .txt file (one text per line, blank lines skipped), a
    .csv/.tsv with a header (the `column`, default "text" or the only column) or a .jsonl file
    (the `column` key of each object, default "text"; a line may also be a JSON string)."""
    from fastbert.data import DataError, iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such input file: {path}")
    texts, lines = [], []
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    texts.append(line.rstrip("\r\n"))
                    lines.append(line_no)
    elif path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            header = reader.fieldnames or []
            if column is None:
                column = "text" if "text" in header or len(header) != 1 else header[0]
            if column not in header:
                raise DataError(path, f"no column {column!r} in the header {header} (pass --column)", 1)
            for row in reader:
                text = row.get(column)
                if text is None:
                    raise DataError(path, f"row has no value in column {column!r}", reader.line_num)
                texts.append(text)
                lines.append(reader.line_num)
    elif path.suffix == ".jsonl":
        column = column or "text"
        for line_no, obj in iter_jsonl(path):
            text = obj.get(column) if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise DataError(path, f"expected a string or an object with a string {column!r}, "
                                      f"got {json.dumps(obj)[:80]}", line_no)
            texts.append(text)
            lines.append(line_no)
    else:
        raise DataError(path, f"unknown format: expected one of {', '.join(TEXT_SUFFIXES)}")
    if not texts:
        raise DataError(path, "no texts")
    return texts, lines


def rows_path(output) -> Path:
    """The JSONL file written next to saved embeddings: row i's input line and text."""
    output = Path(output)
    return output.with_name(output.name + ".rows.jsonl")


def save_embeddings(output, embeddings: torch.Tensor, texts: Sequence[str], lines: Sequence[int],
                    meta: dict) -> Path:
    """Write (N, C) fp32 embeddings as .npy or .safetensors (with `lines` and `meta`), and the
    rows file (see rows_path). Returns the rows file's path."""
    output = Path(output)
    if output.suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(f"embeddings output {output}: expected a {' or '.join(EMBEDDING_SUFFIXES)} "
                         f"file, got {output.suffix or 'no suffix'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    embeddings = embeddings.float().contiguous().cpu()
    if output.suffix == ".npy":
        import numpy as np
        np.save(output, embeddings.numpy())
    else:
        from safetensors.torch import save_file
        save_file({"embeddings": embeddings, "lines": torch.tensor(list(lines), dtype=torch.long)},
                  str(output), metadata={k: str(v) for k, v in meta.items()})
    rows = rows_path(output)
    with open(rows, "w", encoding="utf-8") as f:
        for line, text in zip(lines, texts):
            f.write(json.dumps({"line": line, "text": text}, ensure_ascii=False) + "\n")
    return rows


def load_embeddings(path) -> Tuple[torch.Tensor, List[str], List[int]]:
    """(embeddings, texts, lines) written by save_embeddings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such embeddings file: {path}")
    rows = rows_path(path)
    if not rows.is_file():
        raise FileNotFoundError(f"embeddings {path}: the rows file {rows} written with it is missing")
    if path.suffix == ".npy":
        import numpy as np
        embeddings = torch.from_numpy(np.load(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file
        embeddings = load_file(str(path)).get("embeddings")
        if embeddings is None:
            raise ValueError(f"embeddings {path}: no 'embeddings' tensor (not written by fastbert embed)")
    else:
        raise ValueError(f"embeddings {path}: expected a {' or '.join(EMBEDDING_SUFFIXES)} file")
    with open(rows, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if len(records) != embeddings.shape[0]:
        raise ValueError(f"embeddings {path}: {embeddings.shape[0]} rows, but {rows} lists "
                         f"{len(records)} texts")
    return embeddings, [r["text"] for r in records], [r["line"] for r in records]


# a sentence ends after . ! or ? (and closing quotes/brackets) where an upper-case letter, a digit
# or an opening quote follows
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> List[str]:
    """A plain rule-based splitter for news-like text: paragraphs at line breaks, then sentences
    at _SENTENCE_END. Not a linguistic tokenizer (abbreviations such as "Dr. No" split)."""
    out = []
    for paragraph in text.splitlines():
        out += [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]
    return out
