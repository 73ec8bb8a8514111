"""Tier 1: the training loops on a tiny model (hidden 32, 2 layers) on CPU."""
import json
import math
import os
import random
import socket

import pytest
import torch

import fastbert
from fastbert import data, train

WORDS = ("the cat sat on a mat dog ran far away bird flew over tree house big small red blue green "
         "river stone cloud sun moon").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of random words, one sentence per line, a blank line between documents."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + " ."
                      for _ in range(rng.randint(2, 6))) for _ in range(60)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data.Tokenizer.train([corpus], vocab_size=100, min_frequency=1)


def tiny_config(tokenizer, dropout=0.1, **kw):
    fields = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout)
    return fastbert.BertConfig(**{**fields, **kw})


def nsp_examples(corpus, tokenizer, max_length=48):
    docs = [[tokenizer.tokenize(s) for s in doc] for doc in data.read_documents([corpus])]
    return data.build_nsp_examples(docs, tokenizer, max_length, random.Random(0))


def classification_examples(tokenizer, n=64):
    """Label 1 iff the text mentions an animal: learnable in a few steps."""
    rng = random.Random(1)
    animals, others = ["cat", "dog", "bird"], [w for w in WORDS if w not in ("cat", "dog", "bird")]
    examples = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(others) for _ in range(6)] + ([rng.choice(animals)] if label else [])
        rng.shuffle(words)
        examples.append({**tokenizer.encode(" ".join(words), max_length=16), "labels": label})
    return examples


def losses(metrics):
    return [h["loss"] for h in metrics["history"]]


@pytest.mark.parametrize("positions", ["absolute", "sinusoidal"])
def test_pretraining_lowers_the_loss(tmp_path, corpus, tokenizer, positions):
    examples = nsp_examples(corpus, tokenizer)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(tiny_config(tokenizer, position_embedding_type=positions))
    task = train.pretraining_task(examples, tokenizer, eval_examples=examples[:32])
    config = train.TrainConfig(output_dir=str(tmp_path), max_steps=24, batch_size=8, lr=5e-3,
                               warmup_ratio=0.1, log_every=5, progress=False)
    metrics = train.Trainer(model, task, config, tokenizer).train()
    history = losses(metrics)
    assert history[-1] < history[0] - 0.5, history
    final = metrics["final"]
    # better than a uniform guess over the vocabulary, which is where training started
    assert final["eval_mlm_loss"] < math.log(tokenizer.vocab_size) - 0.5
    assert 0 < final["eval_mlm_accuracy"] <= 1 and 0 <= final["eval_nsp_accuracy"] <= 1
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["final"] == metrics["final"] and written["history"][0]["tokens_per_s"] > 0
    # the final model and tokenizer are a loadable checkpoint
    reloaded = fastbert.BertForPreTraining.from_pretrained(str(tmp_path))
    assert data.Tokenizer.from_pretrained(tmp_path).vocab_size == tokenizer.vocab_size
    assert torch.equal(reloaded.state_dict()["cls.predictions.bias"], model.state_dict()["cls.predictions.bias"])


def test_classification_finetuning_reports_accuracy_and_f1(tmp_path, tokenizer):
    examples = classification_examples(tokenizer)
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(tiny_config(tokenizer, num_labels=2))
    task = train.classification_task(examples[:48], tokenizer, ["no", "yes"], eval_examples=examples[48:])
    config = train.TrainConfig(output_dir=str(tmp_path), epochs=4, batch_size=8, lr=3e-3, log_every=6,
                               progress=False)
    metrics = train.Trainer(model, task, config, tokenizer).train()
    assert metrics["total_steps"] == 4 * 48 // 8
    final = metrics["final"]
    assert set(final) >= {"eval_accuracy", "eval_macro_f1", "eval_loss"}
    assert 0 <= final["eval_macro_f1"] <= 1 and 0 <= final["eval_accuracy"] <= 1
    assert losses(metrics)[-1] < losses(metrics)[0]


def test_classification_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=gen)
    predictions = torch.where(torch.rand(200, generator=gen) < 0.6, labels, torch.randint(0, 4, (200,), generator=gen))
    predictions[predictions == 3] = 2  # class 3 never predicted: its F1 is 0
    ours = train.classification_metrics(predictions, labels, 4)
    assert ours["eval_accuracy"] == pytest.approx(metrics.accuracy_score(labels, predictions))
    assert ours["eval_macro_f1"] == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))


def test_qa_finetuning_reports_em_f1(tmp_path, tokenizer):
    rng = random.Random(2)
    examples = []
    for i in range(24):
        name, place = rng.choice(["cat", "dog", "bird"]), rng.choice(["river", "tree", "house"])
        context = " ".join(rng.choice(WORDS) for _ in range(6)) + f" the {name} sat on the {place} ."
        examples.append(data.SquadExample(f"q{i}", f"where sat the {name} ?", context, [place],
                                          context.rindex(place), place))
    features = data.squad_features(examples, tokenizer, max_length=32, doc_stride=8)
    torch.manual_seed(0)
    model = fastbert.BertForQuestionAnswering(tiny_config(tokenizer))
    task = train.qa_task(features, tokenizer, examples, features)
    config = train.TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=8, lr=3e-3, progress=False)
    final = train.Trainer(model, task, config, tokenizer).train()["final"]
    assert 0 <= final["eval_exact_match"] <= final["eval_f1"] <= 100


def test_checkpoint_loads_in_transformers_with_same_logits(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    examples = classification_examples(tokenizer, n=16)
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(tiny_config(tokenizer, num_labels=2))
    task = train.classification_task(examples, tokenizer, ["no", "yes"])
    config = train.TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=8, progress=False)
    train.Trainer(model, task, config, tokenizer).train()
    theirs = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    batch = data.collate(examples, tokenizer.pad_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = model.eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    assert hf_tok("the cat sat", "on a mat")["input_ids"] == tokenizer.encode("the cat sat", "on a mat")["input_ids"]


def _pretrain_run(output_dir, corpus, tokenizer, dropout=0.1, **overrides):
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(tiny_config(tokenizer, dropout=dropout))
    if overrides.get("resume_from"):
        model = fastbert.BertForPreTraining.from_pretrained(
            str(train.resolve_checkpoint(output_dir, overrides["resume_from"])))
    task = train.pretraining_task(nsp_examples(corpus, tokenizer), tokenizer)
    settings = dict(output_dir=str(output_dir), max_steps=6, batch_size=8, grad_accum=2, lr=2e-3,
                    log_every=1, progress=False, save_total_limit=None)
    settings.update(overrides)
    trainer = train.Trainer(model, task, train.TrainConfig(**settings), tokenizer)
    return trainer.train(), model


def test_resume_continues_exactly(tmp_path, corpus, tokenizer):
    """Interrupt after step 3 (the checkpoint it left), resume: steps 4-6 repeat the uninterrupted
    run bit for bit, dropout, masking and data order included."""
    full, full_model = _pretrain_run(tmp_path / "full", corpus, tokenizer, save_every=3)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    os.rename(tmp_path / "full" / "checkpoint-3", interrupted / "checkpoint-3")
    resumed, resumed_model = _pretrain_run(interrupted, corpus, tokenizer, resume_from="latest")
    assert resumed["resumed_from"].endswith("checkpoint-3")
    after = {h["step"]: h["loss"] for h in resumed["history"]}
    assert sorted(after) == [4, 5, 6]
    assert [after[s] for s in (4, 5, 6)] == losses(full)[3:]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, output_dir, corpus, vocab_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tokenizer = data.Tokenizer.from_pretrained(vocab_dir)
    metrics, _ = _pretrain_run(output_dir, corpus, tokenizer, dropout=0.0, max_steps=4)
    if rank == 0:
        queue.put((metrics["world_size"], losses(metrics)))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path, corpus, tokenizer):
    """2 gloo processes, each half of the global batch, give the losses of 1 process."""
    import torch.multiprocessing as mp

    tokenizer.save(tmp_path / "tok")
    single, _ = _pretrain_run(tmp_path / "one", corpus, tokenizer, dropout=0.0, max_steps=4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two"), corpus, tmp_path / "tok", queue),
                       nprocs=2, start_method="spawn")
    world, two = queue.get(timeout=10)
    assert world == 2 and single["world_size"] == 1
    assert two == pytest.approx(losses(single), rel=1e-5)


def test_generate_with_kv_cache_runs_one_query_per_step(monkeypatch, tokenizer):
    """Greedy and sampled generation with the cache equal full recomputation, and after the
    prompt every attention call has a single query against all cached keys."""
    torch.manual_seed(0)
    model = fastbert.BertLMHeadModel(tiny_config(tokenizer, dropout=0.0, max_position_embeddings=24)).eval()
    prompt = torch.tensor([tokenizer.encode("the cat sat on", max_length=None)["input_ids"][:-1]] * 2)
    shapes, attention = [], fastbert.attention

    def recording_attention(q, k, v, *args, **kwargs):
        shapes.append((q.shape[1], k.shape[1]))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(fastbert, "attention", recording_attention)
    cached = model.generate(prompt, max_new_tokens=8)
    n_layers, s = model.config.num_hidden_layers, prompt.shape[1]
    assert shapes == [(s, s)] * n_layers + [(1, s + i) for i in range(1, 8) for _ in range(n_layers)]
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, use_cache=False))
    for seed in (1, 2):
        torch.manual_seed(seed)
        sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5, temperature=0.8)
        torch.manual_seed(seed)
        assert torch.equal(sampled, model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=5,
                                                   temperature=0.8, use_cache=False))
    # past max_position_embeddings (24) the window slides, with or without the cache
    long = model.generate(prompt, max_new_tokens=24 - s + 4)
    assert long.shape[1] == 28
    assert torch.equal(long, model.generate(prompt, max_new_tokens=24 - s + 4, use_cache=False))
