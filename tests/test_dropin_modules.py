"""The drop-in rule for the small modules patch_hf fuses: the dropout a *Output (or DistilBERT's
FFN) applies before its add+LayerNorm, ModernBERT's Identity norms and dropouts, modules seen by
hooks registered for every module, and BERT's chunked feed-forward. Each patched model gives the
unpatched one's outputs and gradients by the tolerance rule, and every hook fires as often.
(A user audit found each of these silently different or failing.)"""
import collections
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastbert
from tests.helpers import assert_close_by_rule
from tests.test_dropin import NO_DROPOUT
from tests.test_dropin import _bert_in_archs  # noqa: F401 (autouse fixture: "bert" in ARCHS)
from tests.test_family import make_inputs, make_model

transformers = pytest.importorskip("transformers")
from transformers.models.modernbert import modeling_modernbert as mb  # noqa: E402

from tests.test_hf_modernbert import compare, padded_batch, tiny_config, triplet  # noqa: E402

# hidden dropout on, attention dropout off: what these tests switch is the output dropout
HIDDEN_DROPOUT = {"bert": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0),
                  "distilbert": dict(dropout=0.1, attention_dropout=0.0)}


def _output_dropouts(model):
    """The dropout modules whose p patch_hf fuses into add_layer_norm."""
    for name, module in model.named_modules():
        if name.endswith(("output.dropout", "ffn.dropout")):
            yield name, module


def _agree_on_real_tokens(model, reference, inputs, what):
    real = inputs["attention_mask"].bool()
    exact = copy.deepcopy(reference).double()
    got, plain, want = (m(**inputs).last_hidden_state for m in (model, reference, exact))
    assert_close_by_rule(got[real], plain[real], want[real], what)
    for out in (got, plain, want):
        out[real].pow(2).mean().backward()
    for (name, p), q, e in zip(model.named_parameters(), reference.parameters(),
                               exact.parameters()):
        if q.grad is None:  # the pooler: not in this loss
            assert p.grad is None, name
            continue
        assert_close_by_rule(p.grad, q.grad, e.grad, f"{what}: grad {name}")


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
@pytest.mark.parametrize("change", ["dropout modules in eval", "replaced by Identity", "hooked"])
def test_output_dropout_follows_its_own_module(arch, change):
    """A training model whose output dropouts are switched to eval (training without dropout),
    replaced by nn.Identity, or carry a forward hook: the patched model follows the module (the
    fused dropout used the parent's training flag and p, skipped the hook, and an Identity had
    no p to read)."""
    reference = make_model(arch, "Model", **HIDDEN_DROPOUT[arch]).train()
    for module in reference.modules():  # the embeddings' dropout: the models draw apart
        if type(module) is nn.Dropout:
            module.eval()
    model = fastbert.patch_hf(copy.deepcopy(reference))
    calls = {id(model): 0, id(reference): 0}
    for m in (model, reference):
        for module in m.modules():
            if type(module) is nn.Dropout:
                module.train()  # the output dropouts, switched below, as the model is
        for module in m.modules():
            if "Embeddings" in type(module).__name__:
                module.dropout.eval()
        for name, drop in list(_output_dropouts(m)):
            if change == "dropout modules in eval":
                drop.eval()
            elif change == "replaced by Identity":
                parent, _, leaf = name.rpartition(".")
                setattr(m.get_submodule(parent), leaf, nn.Identity())
            else:  # an identity dropout (eval) whose hook scales what it returns
                drop.eval()

                def scale(module, args, output, key=id(m)):
                    if output.dtype == torch.float32:  # not the fp64 copy's calls
                        calls[key] += 1
                    return output * 1.5
                drop.register_forward_hook(scale)
    inputs = make_inputs(model, "Model")
    _agree_on_real_tokens(model, reference, inputs, change)
    assert calls[id(model)] == calls[id(reference)]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "modernbert"])
def test_hooks_for_every_module_see_the_modules_unpatched_calls(arch):
    """nn.modules.module.register_module_forward_hook: the patched model calls every module the
    unpatched one calls (ModernBERT's attention, MLP and out_drop were run inline; BERT's output
    dropouts were fused), and a hook that changes an MLP's output is honoured."""
    if arch == "modernbert":
        models = triplet(mb.ModernBertModel, tiny_config())
    else:
        plain = make_model(arch, "Model", **NO_DROPOUT[arch]).train()
        models = (fastbert.patch_hf(copy.deepcopy(plain)), plain, copy.deepcopy(plain).double())
    names = [{id(m): n for n, m in model.named_modules()} for model in models]
    called = [[] for _ in models]

    def hook(module, args, output):
        for record, by_id in zip(called, names):
            if id(module) in by_id:
                record.append(by_id[id(module)])
        # patch_hf's classes are named Fastbert<name> (they read as transformers' own)
        if type(module).__name__.removeprefix("Fastbert") in ("ModernBertMLP", "BertIntermediate",
                                                              "FFN"):
            return output * 2.0
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        ids, mask = padded_batch() if arch == "modernbert" else (None, None)
        if arch == "modernbert":
            compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
                    real=mask.bool())
        else:
            _agree_on_real_tokens(models[0], models[1], make_inputs(models[0], "Model"),
                                  "global hook")
    finally:
        handle.remove()
    assert collections.Counter(called[0]) == collections.Counter(called[1])


@pytest.mark.parametrize("hook", ["forward", "backward"])
@pytest.mark.parametrize("where", ["layers.0.attn_norm", "layers.1.attn.out_drop",
                                   "layers.1.mlp.drop"])
def test_modernbert_hooked_identity_modules_are_called(where, hook):
    """ModernBERT's Identity attn_norm (layer 0) and out_drop (attention dropout 0), and the
    MLP's dropout, with a forward hook that changes their output or a backward hook: called and
    honoured (the Identity ones were skipped as no-ops; the lean plan skipped backward hooks)."""
    models = triplet(mb.ModernBertModel, tiny_config())
    calls = []
    for m in models:
        module = m.get_submodule(where)
        if hook == "forward":
            module.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 1.5)
        else:
            module.register_full_backward_hook(lambda mod, g_in, g_out: calls.append(1))
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())
    assert len(calls) == 3  # once per model


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_chunked_feed_forward_on_a_padded_batch(arch):
    """chunk_size_feed_forward: transformers splits the sequence dim into chunks and needs a
    multiple; the unpadded tokens of a padded batch rarely are (13 here, chunks of 4). It
    raised; now the patched model gives the unpatched one's answer (DistilBERT's FFN, chunked
    inside, runs as its module when hooked)."""
    reference = make_model(arch, "Model", **NO_DROPOUT[arch], chunk_size_feed_forward=4).train()
    model = fastbert.patch_hf(copy.deepcopy(reference))
    calls = []
    if arch == "distilbert":
        for m in (model, reference):
            for layer in m.transformer.layer:
                layer.ffn.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # 13 real tokens
    _agree_on_real_tokens(model, reference, dict(input_ids=ids, attention_mask=mask),
                          "chunked feed-forward")
    if arch == "distilbert":  # patched, unpatched and its fp64 copy: each layer's FFN
        assert len(calls) == 3 * model.config.n_layers


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "modernbert"])
@pytest.mark.parametrize("padding", ["left", "a row of padding only", "every row padding"])
def test_batches_whose_rows_start_with_padding_run_padded(arch, padding, unpad, attention):
    """A row whose first token is padding: heads read position 0 (the pooler, [CLS] pooling),
    where transformers computes a padding token's state; the packed path left zeros there
    (logits off by 100 %), and a batch of padding only crashed. Such a batch runs padded; a row
    of padding only under eager attention (which lets it attend to all its keys alike; sdpa
    gives zeros, as fastbert) runs transformers' attention, padded mode too."""
    if arch == "modernbert":
        if not unpad or attention == "eager":
            pytest.skip("ModernBERT: patched unpadded only, on sdpa here")
        models = triplet(mb.ModernBertForSequenceClassification,
                         tiny_config(classifier_pooling="cls"))
        ids, mask = padded_batch()
    else:
        plain = make_model(arch, "ForSequenceClassification", attention,
                           **NO_DROPOUT[arch]).train()
        for module in plain.modules():  # the classifier's dropout too
            if type(module) is nn.Dropout:
                module.p = 0.0
        models = (fastbert.patch_hf(copy.deepcopy(plain), unpad=unpad), plain,
                  copy.deepcopy(plain).double())
        inputs = make_inputs(models[0], "ForSequenceClassification")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if padding == "left":
        ids, mask = ids.flip(1), mask.flip(1)
    elif padding == "a row of padding only":
        mask = mask.clone()
        mask[1] = 0
    else:
        mask = torch.zeros_like(mask)
    labels = torch.tensor([0, 2, 1])[:ids.shape[0]]
    compare(models, dict(input_ids=ids, attention_mask=mask, labels=labels), ["loss", "logits"])


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_jit_trace_is_refused_with_the_reason(arch):
    """torch.jit.trace recorded fastbert's CPU kernels as constants (wrong numbers on other
    inputs, or an internal assert): a patched model refuses it, saying what works instead."""
    if arch == "modernbert":
        model = triplet(mb.ModernBertModel, tiny_config())[0].eval()
        ids, mask = padded_batch()
    else:
        model = fastbert.patch_hf(make_model("bert", "Model")).eval()
        inputs = make_inputs(model, "Model")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with pytest.raises(RuntimeError, match="torch.jit.trace .* cannot record a patched model"):
        torch.jit.trace(model, (ids, mask), strict=False)


def test_padded_span_loss_warns_once_at_the_callers_line(monkeypatch):
    from fastbert import hf_patch
    monkeypatch.setattr(hf_patch, "_span_loss_warned", False)
    model = fastbert.patch_hf(make_model("bert", "ForQuestionAnswering"))
    inputs = make_inputs(model, "Model")
    spans = dict(start_positions=torch.tensor([1, 2, 0]), end_positions=torch.tensor([3, 4, 2]))
    full = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(**full, **spans)  # no padding: transformers' loss, nothing to say
        model(**inputs, **spans)
        model(**inputs, **spans)
    said = [w for w in record if "question-answering loss" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in record]
    assert said[0].filename == __file__
