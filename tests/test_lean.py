"""The lean eager path of fastbert's own BertModel (fastbert/lean.py, issue 22 part 1): outputs,
gradients and dropout bitwise those of the public ops' path, the fallbacks, and the Python calls
per forward counted against transformers' BertModel (sys.setprofile, benchmarks/host_overhead.py's
method), so the host path cannot grow back."""
import pytest
import torch

import fastbert
from benchmarks.host_overhead import _python_calls
from fastbert import lean
from fastbert.model import BertConfig, BertModel

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=64)
# measured on the torch backend (issue 22: inference <= 0.6x transformers' calls, training
# forward + backward <= 1.0x)
MAX_RATIO = {"inference": 0.6, "training": 1.0}


def _inputs():
    ids = torch.randint(1, 100, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0  # one padded row
    return ids, mask


@pytest.fixture
def public_ops(monkeypatch):
    """Run BertModel on the public ops (no plan), as before the lean path."""
    def use():
        monkeypatch.setattr(lean, "plan", lambda *args: None)
    return use


def _run(model, ids, mask, train: bool, seed: int = 1, **kw):
    """(outputs..., gradients...) of one forward (+ backward when training) from `seed`."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(train):
        out = model(ids, attention_mask=mask, **kw)
    tensors = [out.last_hidden_state, out.pooler_output]
    if train:
        (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return tensors


@pytest.mark.parametrize("unpad", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_bitwise_equal_to_public_ops(public_ops, unpad, train):
    model = BertModel(BertConfig(**TINY, unpad=unpad))
    ids, mask = _inputs()
    lean_run = _run(model, ids, mask, train)
    assert len(lean_run) == (2 + len(list(model.parameters())) if train else 2)
    if train:  # dropout follows the seed: the same seed, the same run
        assert all(torch.equal(a, b) for a, b in zip(lean_run, _run(model, ids, mask, train)))
        assert not torch.equal(lean_run[0], _run(model, ids, mask, train, seed=2)[0])
    public_ops()
    public_run = _run(model, ids, mask, train)
    for a, b in zip(lean_run, public_run):
        assert torch.equal(a, b)


@pytest.mark.parametrize("unpad", [True, False], ids=["packed", "padded"])
def test_autocast_training_bitwise_equal_to_public_ops(public_ops, unpad):
    """CPU autocast (bf16): the plan casts as the public ops do, per op."""
    model = BertModel(BertConfig(**TINY, unpad=unpad)).train()
    ids, mask = _inputs()

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask)
        (out.last_hidden_state.float().square().sum() + out.pooler_output.float().sum()).backward()
        return [out.last_hidden_state] + [p.grad for p in model.parameters()]

    lean_run = run()
    assert lean_run[0].dtype == torch.float32  # the norms keep the fp32 stream (layer_norm.norm_dtype)
    public_ops()
    assert all(torch.equal(a, b) for a, b in zip(lean_run, run()))


def test_grad_mode_in_eval_records_autograd_as_the_public_ops(public_ops):
    """Grad mode on in eval (no dropout): every op records autograd, gradients as before."""
    model = BertModel(BertConfig(**TINY)).eval()
    ids, mask = _inputs()
    out = model(ids, attention_mask=mask)
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    public_ops()
    expected = model(ids, attention_mask=mask)
    (expected.last_hidden_state.sum() + expected.pooler_output.sum()).backward()
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_plan_falls_back_to_the_public_ops():
    model = BertModel(BertConfig(**TINY)).eval()
    ids, _ = _inputs()
    packed = fastbert.padding.pack_mask(torch.ones_like(ids))
    assert lean.plan(model, ids, packed, None) is not None
    assert lean.plan(model, ids[:0], packed, None) is None  # no tokens
    model.encoder.layer[1].attn_dropout = 0.5
    model.train()
    assert lean.plan(model, ids, packed, None) is None  # layers that differ
    model.eval()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert lean.plan(model, ids, packed, None) is None  # the public ops name the calls


def test_profiler_names_the_ops_of_the_model():
    """While a profiler listens the public ops serve the forward and name each call."""
    model = BertModel(BertConfig(**TINY)).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(ids, attention_mask=mask)
    seen = {e.name for e in prof.events() if e.name.startswith("fastbert::")}
    assert {"fastbert::attention_varlen_fwd", "fastbert::add_layer_norm_fwd",
            "fastbert::linear_bias_gelu_fwd"} <= seen, seen


def test_hooked_and_wrapped_projections_run_as_modules():
    """A forward hook on a projection, or a module replacing it, is honoured."""
    model = BertModel(BertConfig(**TINY)).eval()
    ids, mask = _inputs()
    calls = []
    model.encoder.layer[0].ffn_out.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == [1]


def _counts(model, ids, mask) -> dict:
    def infer():
        with torch.no_grad():
            model(ids, attention_mask=mask)

    def train():
        out = model(ids, attention_mask=mask)[0]
        out.sum().backward()

    counts = {}
    for mode, step, training in (("inference", infer, False), ("training", train, True)):
        model.train(training)
        step(), step()  # caches warm, first-call imports done
        counts[mode] = _python_calls(step)
    return counts


def test_python_calls_per_forward_against_transformers():
    """Python calls of a forward (and backward) of a 4-layer tiny BERT, B4 S16 with one padded
    row, on the torch backend, against transformers' BertModel (sdpa) on the same input."""
    if fastbert.get_backend() != "auto":
        pytest.skip("counted on the default backend choice")
    ids, mask = _inputs()
    ours = _counts(BertModel(BertConfig(**TINY)), ids, mask)
    theirs = _counts(transformers.BertModel(transformers.BertConfig(
        **TINY, attn_implementation="sdpa")), ids, mask)
    for mode, ratio in MAX_RATIO.items():
        assert ours[mode] <= ratio * theirs[mode], (mode, ours, theirs)
