"""The lean path of a patched transformers encoder (fastbert/hf_lean.py, issue 22): outputs,
gradients and dropout bitwise those of the patched modules' own calls, the cases that must fall
back to those calls, and the Python calls per forward against unpatched transformers."""
import copy

import pytest
import torch

import fastbert
from fastbert import hf_lean
from tests.test_lean import TINY, _counts, _inputs

transformers = pytest.importorskip("transformers")

# measured on the torch backend (the lean path had 0.94x transformers' calls in inference and
# 1.6x in training, where the torch backend's dropout and unpadding are Python; before it: 2.2x
# and 4.7x)
MAX_RATIO = {"inference": 1.0, "training": 2.0}


def _model(dropout: float = 0.1):
    """The 4-layer tiny BERT of tests/test_lean.py, as transformers' BertModel (sdpa)."""
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        **TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        attn_implementation="sdpa"))


def _patched(unpad: bool = True, dropout: float = 0.1):
    return fastbert.patch_hf(_model(dropout), unpad=unpad)


@pytest.fixture
def planned(monkeypatch):
    """Whether each forward took the lean path: a list, one entry per encoder forward."""
    taken, plan = [], hf_lean.plan

    def recording(*args):
        p = plan(*args)
        taken.append(p is not None)
        return p

    monkeypatch.setattr(hf_lean, "plan", recording)
    return taken


def _run(model, ids, mask, train: bool, seed: int = 1):
    """(last hidden state, gradients...) of one forward (+ backward when training) from seed."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(train):
        out = model(ids, attention_mask=mask).last_hidden_state
    if not train:
        return [out]
    (out.square() * mask[..., None]).sum().backward()
    return [out] + [p.grad for p in model.parameters() if p.grad is not None]


def _modules_path(monkeypatch):
    monkeypatch.setattr(hf_lean, "plan", lambda *args: None)


@pytest.mark.parametrize("mask_kind", ["padded", "full"])
@pytest.mark.parametrize("unpad", [True, False], ids=["unpad", "padded"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_bitwise_equal_to_the_patched_modules(monkeypatch, planned, mask_kind, unpad, train):
    model = _patched(unpad=unpad)
    ids, mask = _inputs()
    if mask_kind == "full":
        mask = torch.ones_like(mask)
    lean_run = _run(model, ids, mask, train)
    assert planned == [True]
    if train:  # the seed decides dropout
        assert not torch.equal(lean_run[0], _run(model, ids, mask, train, seed=2)[0])
    _modules_path(monkeypatch)
    modules_run = _run(model, ids, mask, train)
    assert len(lean_run) == len(modules_run)
    for a, b in zip(lean_run, modules_run):
        assert torch.equal(a, b)


def _family_model(family: str):
    torch.manual_seed(0)
    if family == "DistilBERT":
        return transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=TINY["vocab_size"], dim=TINY["hidden_size"], n_layers=2,
            n_heads=TINY["num_attention_heads"], hidden_dim=TINY["intermediate_size"],
            max_position_embeddings=TINY["max_position_embeddings"]))
    kind = {"RoBERTa": ("RobertaConfig", "RobertaModel"),
            "ELECTRA": ("ElectraConfig", "ElectraModel")}[family]
    return getattr(transformers, kind[1])(getattr(transformers, kind[0])(**TINY, pad_token_id=1))


@pytest.mark.parametrize("unpad", [True, False], ids=["unpad", "padded"])
@pytest.mark.parametrize("family", ["RoBERTa", "ELECTRA", "DistilBERT"])
def test_other_families(monkeypatch, planned, family, unpad):
    model = fastbert.patch_hf(_family_model(family), unpad=unpad)
    ids, mask = _inputs()
    for train in (True, False):
        lean_run = _run(model, ids, mask, train)
        assert planned[-1]
        with monkeypatch.context() as m:
            _modules_path(m)
            modules_run = _run(model, ids, mask, train)
        assert len(lean_run) == len(modules_run)
        assert all(torch.equal(a, b) for a, b in zip(lean_run, modules_run))


def test_packed_input_by_position_ids(monkeypatch, planned):
    model = _patched(dropout=0.0).eval()
    ids = torch.randint(1, 100, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        lean_out = model(ids, position_ids=positions).last_hidden_state
        assert planned == [True]
        _modules_path(monkeypatch)
        assert torch.equal(lean_out, model(ids, position_ids=positions).last_hidden_state)


def test_lora_and_hooked_projections_run_as_modules(monkeypatch, planned):
    """A LoRA adapter changes the output; a hooked Linear's hook runs; both on the lean path."""
    peft = pytest.importorskip("peft")
    model = _patched(dropout=0.0).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
    lora = peft.get_peft_model(model, peft.LoraConfig(
        r=4, target_modules=["query", "value", "intermediate.dense"], init_lora_weights=False))
    seen = []
    lora.base_model.model.encoder.layer[1].output.dense.register_forward_hook(
        lambda *args: seen.append(1))
    with torch.no_grad():
        lean_out = lora(input_ids=ids, attention_mask=mask).last_hidden_state
    assert planned == [True, True] and seen == [1]
    assert not torch.allclose(lean_out, before)
    _modules_path(monkeypatch)
    with torch.no_grad():
        assert torch.equal(lean_out, lora(input_ids=ids, attention_mask=mask).last_hidden_state)


def _hook_layer(model):
    model.encoder.layer[0].attention.register_forward_hook(lambda *args: None)


def _checkpointing(model):
    model.gradient_checkpointing_enable()


def _chunked(model):
    for layer in model.encoder.layer:
        layer.chunk_size_feed_forward = 1  # any token count is a multiple


def _replaced_norm(model):
    model.encoder.layer[1].output.LayerNorm = torch.nn.Identity()


@pytest.mark.parametrize("change, lean", [(_hook_layer, False), (_checkpointing, False),
                                          (_chunked, False), (_replaced_norm, True)])
def test_changed_layers(monkeypatch, planned, change, lean):
    """What the lean path cannot honour (a hooked layer, gradient checkpointing, a chunked
    feed-forward) runs through the modules; a replaced norm is called as a module on the lean
    path. Either way the result is the modules' path's on a copy given the same change."""
    model = _patched(dropout=0.0)
    reference = copy.deepcopy(model)
    change(model)
    ids, mask = _inputs()
    got = _run(model, ids, mask, train=True)
    assert planned == [lean]
    _modules_path(monkeypatch)
    change(reference)
    for a, b in zip(got, _run(reference, ids, mask, train=True)):
        assert torch.equal(a, b)


def test_hidden_states_asked_once_keep_the_lean_path(planned):
    """transformers leaves its output-capturing hooks on the layers after a call asks for hidden
    states; later calls that ask for nothing still take the lean path."""
    model = _patched(dropout=0.0).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(hidden) == TINY["num_hidden_layers"] + 1
        assert any(layer._forward_hooks for layer in model.encoder.layer)  # left installed
        assert not any(planned)  # hidden states asked: the modules' path
        again = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert not any(planned)
        model(ids, attention_mask=mask)
    assert planned[-1]
    for a, b in zip(hidden, again):
        assert torch.equal(a, b)


def test_output_attentions_run_through_the_modules(planned):
    model = _patched(dropout=0.0).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == TINY["num_hidden_layers"]
    assert not any(planned)


def test_python_calls_per_forward_against_transformers():
    """Python calls of a patched 4-layer tiny BERT's forward (and backward), B4 S16 with one
    padded row, on the torch backend, against the same model unpatched (sdpa)."""
    if fastbert.get_backend() != "auto":
        pytest.skip("counted on the default backend choice")
    ids, mask = _inputs()
    theirs = _counts(_model(), ids, mask)
    ours = _counts(fastbert.patch_hf(_model()), ids, mask)
    for mode, ratio in MAX_RATIO.items():
        assert ours[mode] <= ratio * theirs[mode], (mode, ours, theirs)


@pytest.mark.interpreter
@pytest.mark.parametrize("unpad", [True, False], ids=["unpad", "padded"])
def test_triton_backend_bitwise_equal_to_the_patched_modules(monkeypatch, planned, unpad):
    """On the Triton kernels (TRITON_INTERPRET=1): the lean path launches what the modules'
    path launches, dropout masks included."""
    previous = fastbert.get_backend()
    fastbert.set_backend("triton")
    try:
        torch.manual_seed(0)
        model = fastbert.patch_hf(transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            attn_implementation="sdpa")), unpad=unpad)
        ids = torch.randint(1, 50, (2, 8))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        runs = []
        for lean_path in (True, False):
            if not lean_path:
                _modules_path(monkeypatch)
            runs.append([_run(model, ids, mask, train) for train in (False, True)])
        assert planned == [True, True]
        for lean_run, modules_run in zip(*runs):
            assert len(lean_run) == len(modules_run)
            assert all(torch.equal(a, b) for a, b in zip(lean_run, modules_run))
    finally:
        fastbert.set_backend(previous)


def test_cross_attention_runs_through_the_modules(planned):
    """A decoder with cross-attention handed encoder states takes transformers' own loop."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY, is_decoder=True, add_cross_attention=True,
                                     attn_implementation="sdpa")
    reference = transformers.BertModel(config).eval()
    model = fastbert.patch_hf(copy.deepcopy(reference))
    ids, mask = _inputs()
    memory = torch.randn(4, 5, TINY["hidden_size"])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, encoder_hidden_states=memory).last_hidden_state
        want = reference(ids, attention_mask=mask, encoder_hidden_states=memory).last_hidden_state
    assert not any(planned)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
