"""Tier 1: patch_hf on transformers' ModernBERT (issue 20) against the unpatched model: tiny
random configs whose local window is shorter than the sequence, padded and packed batches, every
head; outputs at real tokens, losses and every parameter's gradient by the tolerance rule
(patched fp32 vs unpatched fp32, both against unpatched fp64)."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
from transformers import ModernBertConfig  # noqa: E402
from transformers.models.modernbert import modeling_modernbert as mb  # noqa: E402

import fastbert  # noqa: E402
from fastbert import hf_patch_modernbert, padding, varlen  # noqa: E402
from tests.helpers import FLOOR, assert_close_by_rule  # noqa: E402

VOCAB, SEQ = 64, 21


def tiny_config(**overrides):
    """3 layers (global, local, local), window 8 (+-4) < SEQ, head dim 16."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=2, local_attention=8, global_attn_every_n_layers=3,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, cls_token_id=1,
              eos_token_id=2, sep_token_id=2, mask_token_id=3, attn_implementation="sdpa",
              num_labels=3)
    kw.update(overrides)
    return ModernBertConfig(**kw)


def triplet(cls, config):
    """(patched fp32, unpatched fp32, unpatched fp64) copies of one random model, training mode
    (dropout off in the config, so the three compute the same function)."""
    torch.manual_seed(0)
    plain = cls(config).train()
    exact = copy.deepcopy(plain).double()
    patched = fastbert.patch_hf(copy.deepcopy(plain))
    return patched, plain, exact


def padded_batch(batch=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 6:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def masks_of_other_shapes(batch=3):
    """(ids, mask) pairs: left padding, and padding between real tokens (gaps of 3 and 1, longer
    than nothing and shorter than the +-4 window, so packing would bring farther keys into it)."""
    ids, mask = padded_batch(batch)
    left = mask.flip(1)
    holes = torch.ones_like(mask)
    holes[1, 5:8] = 0
    holes[2, [2, 9, 11]] = 0
    holes[2, 17:] = 0
    return [("left padding", ids.flip(1), left), ("holes", ids.masked_fill(holes == 0, 0), holes)]


def packed_batch():
    """DataCollatorWithFlattening's form: (1, T) ids, position ids restarting at 0, no mask; and
    the same sequences as a padded batch (ids, mask), the reference's input: transformers' sdpa
    path lets packed sequences attend to each other (its flash-attention path does not)."""
    g = torch.Generator().manual_seed(2)
    lengths = [SEQ, 9, 1, 14]
    ids = torch.randint(4, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    mask = torch.arange(SEQ).view(1, SEQ) < torch.tensor(lengths).view(-1, 1)
    padded = torch.zeros(len(lengths), SEQ, dtype=torch.long).masked_scatter(mask, ids[0])
    return ids, position_ids, padded, mask


def compare(models, kwargs, outputs, real=None, ref_kwargs=None, ref_real=None):
    """Forward all three, compare `outputs` (attribute names) at real tokens (a (B, S) bool
    mask for per-token outputs) and every parameter gradient of the loss. ref_kwargs / ref_real:
    the unpatched models' input and real tokens, when they differ (packed against padded)."""
    if ref_kwargs is None:
        ref_kwargs, ref_real = kwargs, real
    calls = [(kwargs, real), (ref_kwargs, ref_real), (ref_kwargs, ref_real)]
    results = [m(**kw) for m, (kw, _) in zip(models, calls)]

    def at_real(value, where):
        if where is not None and value.dim() >= 2 and value.shape[:2] == where.shape:
            return value[where]
        return value

    for name in outputs:
        assert_close_by_rule(*(at_real(getattr(r, name), where)
                               for r, (_, where) in zip(results, calls)), name)
    # the base model has no loss: a square of its real tokens' states stands in
    losses = [r.loss if getattr(r, "loss", None) is not None else at_real(r[0], where).pow(2).mean()
              for r, (_, where) in zip(results, calls)]
    for loss in losses:
        loss.backward()
    params = [dict(m.named_parameters()) for m in models]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        grads = [p[name].grad for p in params]
        if grads[1] is None:
            assert grads[0] is None, name
            continue
        assert_close_by_rule(grads[0], grads[1], grads[2], f"grad {name}")


def test_base_model_padded_and_packed():
    models = triplet(mb.ModernBertModel, tiny_config())
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())
    for m in models:
        m.zero_grad()
    ids, position_ids, padded, mask = packed_batch()
    compare(models, dict(input_ids=ids, position_ids=position_ids), ["last_hidden_state"],
            real=torch.ones_like(ids, dtype=torch.bool),
            ref_kwargs=dict(input_ids=padded, attention_mask=mask), ref_real=mask)
    # the same packing given as DataCollatorWithFlattening's flash-attention kwargs
    cu = torch.tensor([0, SEQ, SEQ + 9, SEQ + 10, ids.shape[1]], dtype=torch.int32)
    patched = models[0]
    torch.testing.assert_close(patched(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                       max_length_q=SEQ, max_length_k=SEQ).last_hidden_state,
                               patched(input_ids=ids, position_ids=position_ids).last_hidden_state)


@pytest.mark.parametrize("case", ["left padding", "holes"])
def test_left_padding_and_padding_between_real_tokens(case, monkeypatch):
    """Padding between real tokens would close up in packing, so the +-4 window would reach keys
    farther than 4 positions away; left padding puts a padding token at position 0, which cls
    pooling reads (transformers computes its state, packing leaves zeros): such batches run
    transformers' own forward (the packed layers are not called)."""
    models = triplet(mb.ModernBertModel, tiny_config())
    ids, mask = dict((name, (i, m)) for name, i, m in masks_of_other_shapes())[case]
    packed_calls = []
    real_layers = hf_patch_modernbert._layers
    monkeypatch.setattr(hf_patch_modernbert.hf_lean_modernbert, "plan", lambda *a: None)
    monkeypatch.setattr(hf_patch_modernbert, "_layers",
                        lambda *a: packed_calls.append(1) or real_layers(*a))
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())
    assert not packed_calls


def test_a_replaced_activation_runs_as_the_module_says():
    """The GeGLU's GELU follows each layer's activation module, not config.hidden_activation: a
    ReLU put in one layer after patching ran as GELU (3.7e-3 off)."""
    models = triplet(mb.ModernBertModel, tiny_config())
    for m in models:
        m.layers[1].mlp.act = nn.ReLU()
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())


def test_config_window_changed_after_patching_and_a_batch_without_tokens():
    """transformers' sdpa path reads config.sliding_window at every call: the patched layers
    used the window their modules were built with (1.0e-2 off after local_attention 4 -> 8).
    A batch whose rows are all padding runs transformers' forward (it raised), and a
    mask of another shape than the ids gets transformers' own error."""
    models = triplet(mb.ModernBertModel, tiny_config())
    ids, mask = padded_batch()
    for m in models:
        m.config.local_attention = 16
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())
    patched, plain = models[0], models[1]
    with torch.no_grad():
        empty = [m(input_ids=ids, attention_mask=torch.zeros_like(mask)).last_hidden_state
                 for m in (patched, plain)]
    assert torch.equal(empty[0], empty[1])
    for m in (patched, plain):
        with pytest.raises(RuntimeError, match="must match"):
            m(input_ids=ids, attention_mask=mask[:, :-2])


class HostReads(TorchDispatchMode):
    """Counts what stalls the host on a GPU: .item()/bool() (aten._local_scalar_dense),
    nonzero (its output size), and Tensor.tolist, which CPU tensors do not dispatch."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = torch.Tensor.tolist
        self._tolist = tolist
        torch.Tensor.tolist = lambda t: self.reads.append("tolist") or tolist(t)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_one_host_sync_packs_a_masked_batch(monkeypatch):
    """On a GPU each host read before the layers waits for the queue to drain: a masked batch's
    packing asks its questions (holes beside a short window, any padding, the token count) in
    one read, where it took three (has_holes, mask.all(), nonzero). The device path of the
    indices (nonzero_static, given the count) runs here too; on the meta device it needs no data
    at all, where nonzero cannot run."""
    real_indices = padding._real_indices
    meta = torch.ones(4, 6, dtype=torch.bool, device="meta").flatten()
    assert real_indices(meta, 17).shape == (17,)  # the device path: from the count alone
    with pytest.raises(Exception):
        torch.nonzero(meta)
    monkeypatch.setattr(padding, "_real_indices",
                        lambda flat, total: torch.nonzero_static(flat, size=total).flatten())
    model = mb.ModernBertModel(tiny_config())
    ids, mask = padded_batch()
    cases = [("right padding", ids, mask), *masks_of_other_shapes(),
             ("no padding", ids, torch.ones_like(mask))]
    local = model.config.sliding_window
    for name, ids, mask in cases:
        with HostReads() as host:
            packed = hf_patch_modernbert._pack(model, mask, None, {}, *ids.shape, ids.device,
                                               local)
        assert host.reads == ["tolist"], (name, host.reads)
        if name in ("holes", "left padding"):
            # the window would reach across the closed gaps; cls pooling reads padding
            assert packed is None
            continue
        want = mask.bool().flatten().nonzero().flatten()
        assert packed.indices is None if name == "no padding" else torch.equal(packed.indices,
                                                                                want), name
        assert packed.cu_seqlens.tolist() == [0, *mask.sum(1).cumsum(0).tolist()], name


@pytest.mark.parametrize("hooked", [False, True])
def test_bf16_autocast_keeps_the_fp32_residual_stream(hooked):
    """Under CPU bf16 autocast transformers' residual stream stays fp32 (x + bf16 branch): the
    patched layers keep it so too (they ran it in bf16: 3.7x the unpatched model's error on the
    logits), on the lean path and module-called (hooked) layers; loss, logits at real tokens and
    every gradient by the tolerance rule (bf16's floor: bf16 math) against an fp64 run."""
    cls = mb.ModernBertForSequenceClassification
    patched, plain, exact = triplet(cls, tiny_config(num_hidden_layers=4))
    ids, mask = padded_batch()
    labels = torch.tensor([0, 2, 1])
    finals = []

    def run(m, autocast=True):
        dtypes = []
        handles = [layer.register_forward_hook(lambda mod, args, out: dtypes.append(
            (out[0] if isinstance(out, tuple) else out).dtype))
            for layer in m.model.layers] if hooked else []
        handles.append(m.model.final_norm.register_forward_hook(
            lambda mod, args, out: finals.append(out.dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        for handle in handles:
            handle.remove()
        return dtypes, {"loss": out.loss.detach().float(), "logits": out.logits.detach().float(),
                        **{n: p.grad for n, p in m.named_parameters()}}
    (got_dtypes, got), (plain_dtypes, ref) = run(patched), run(plain)
    assert got_dtypes == plain_dtypes, (got_dtypes, plain_dtypes)
    assert finals == [torch.float32, torch.float32], finals  # the norm's input: the stream
    want = run(exact, autocast=False)[1]
    for name in ref:
        assert_close_by_rule(got[name].float(), ref[name].float(), want[name], name,
                             floor=FLOOR[torch.bfloat16])


@pytest.mark.parametrize("sparse", [False, True])
def test_masked_lm_padded_and_packed(sparse):
    models = triplet(mb.ModernBertForMaskedLM, tiny_config(sparse_prediction=sparse))
    ids, mask = padded_batch()
    labels = torch.where((torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3)
                         & mask.bool(), ids, -100)
    compare(models, dict(input_ids=ids, attention_mask=mask, labels=labels), ["loss", "logits"],
            real=None if sparse else mask.bool())
    for m in models:
        m.zero_grad()
    ids, position_ids, padded, mask = packed_batch()
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.3,
                         ids, -100)
    padded_labels = torch.full_like(padded, -100).masked_scatter(mask, labels[0])
    compare(models, dict(input_ids=ids, position_ids=position_ids, labels=labels),
            ["loss", "logits"], real=None if sparse else torch.ones_like(ids, dtype=torch.bool),
            ref_kwargs=dict(input_ids=padded, attention_mask=mask, labels=padded_labels),
            ref_real=None if sparse else mask)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classification(pooling):
    models = triplet(mb.ModernBertForSequenceClassification,
                     tiny_config(classifier_pooling=pooling))
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1])),
            ["loss", "logits"])


def test_token_classification_and_question_answering():
    ids, mask = padded_batch()
    models = triplet(mb.ModernBertForTokenClassification, tiny_config())
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    compare(models, dict(input_ids=ids, attention_mask=mask, labels=labels), ["loss", "logits"],
            real=mask.bool())
    # transformers' span loss runs over every position, padding included: a full batch here
    models = triplet(mb.ModernBertForQuestionAnswering, tiny_config(num_labels=2))
    compare(models, dict(input_ids=ids, attention_mask=torch.ones_like(mask),
                         start_positions=torch.tensor([1, 3, 2]),
                         end_positions=torch.tensor([4, 9, 5])), ["start_logits", "end_logits"])


def test_token_classification_packed():
    """DataCollatorWithFlattening's (1, T) form with per-token labels, against the padded batch."""
    models = triplet(mb.ModernBertForTokenClassification, tiny_config())
    ids, position_ids, padded, mask = packed_batch()
    labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(6))
    padded_labels = torch.full_like(padded, -100).masked_scatter(mask, labels[0])
    compare(models, dict(input_ids=ids, position_ids=position_ids, labels=labels),
            ["loss", "logits"], real=torch.ones_like(ids, dtype=torch.bool),
            ref_kwargs=dict(input_ids=padded, attention_mask=mask, labels=padded_labels),
            ref_real=mask)


@pytest.mark.parametrize("cls", [mb.ModernBertForMaskedLM, mb.ModernBertForSequenceClassification],
                         ids=["mlm", "classification"])
def test_configs_with_biases(cls):
    """Every bias ModernBERT's config can switch on (norms, attention, MLP, classifier head) and
    the decoder's switched off, padded and packed."""
    config = tiny_config(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
                         decoder_bias=False, classifier_pooling="mean")
    models = triplet(cls, config)
    for m in models:  # biases off zero, so a dropped one shows
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel(), dtype=p.dtype).view(p.shape))
    ids, mask = padded_batch()
    labels = (ids.masked_fill(mask == 0, -100) if cls is mb.ModernBertForMaskedLM
              else torch.tensor([0, 2, 1]))
    compare(models, dict(input_ids=ids, attention_mask=mask, labels=labels), ["loss", "logits"],
            real=mask.bool() if cls is mb.ModernBertForMaskedLM else None)


def test_question_answering_masks_padding_out_of_the_span_loss():
    from fastbert.heads import span_loss
    ids, mask = padded_batch()
    patched, plain, exact = triplet(mb.ModernBertForQuestionAnswering, tiny_config(num_labels=2))
    starts, ends = torch.tensor([1, 3, 2]), torch.tensor([4, 15, 5])  # 15: padding in row 1
    got = patched(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends)

    def masked(model):
        out = model(input_ids=ids, attention_mask=mask)
        return span_loss(out.start_logits, out.end_logits, starts, ends, mask.bool())
    assert_close_by_rule(got.loss, masked(plain), masked(exact), "masked span loss")


def test_multiple_choice():
    models = triplet(mb.ModernBertForMultipleChoice, tiny_config())
    ids, mask = padded_batch(batch=4)
    compare(models, dict(input_ids=ids.view(2, 2, SEQ), attention_mask=mask.view(2, 2, SEQ),
                         labels=torch.tensor([1, 0])), ["loss", "logits"])


def test_inference_on_the_cpu_paths_matches():
    torch.manual_seed(5)
    plain = mb.ModernBertModel(tiny_config()).eval()
    patched = fastbert.patch_hf(copy.deepcopy(plain))
    ids, mask = padded_batch()
    with torch.no_grad():
        want = plain(ids, attention_mask=mask).last_hidden_state
        got = patched(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    assert got[~real].abs().max() == 0  # repadded with zeros


def test_gradient_checkpointing_and_call_time_modules():
    """Checkpointed layers, and a wrapped Wi (as LoRA wraps a Linear) called as a module."""
    class Wrapped(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.base = linear
            self.delta = nn.Linear(linear.in_features, linear.out_features, bias=False)

        def forward(self, x):
            return self.base(x) + self.delta(x)

    models = triplet(mb.ModernBertModel, tiny_config())
    for m in models:
        layer = m.layers[1]
        torch.manual_seed(6)
        layer.mlp.Wi = Wrapped(layer.mlp.Wi).to(layer.mlp.Wo.weight.dtype)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_layers_run_the_models_own_checkpoint_function(reentrant):
    """gradient_checkpointing_enable's function and kwargs (use_reentrant either way), called
    once per layer, and the gradients of the uncheckpointed model."""
    models = triplet(mb.ModernBertForMaskedLM, tiny_config())
    calls = []
    for m in models:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        for layer in m.model.layers:
            function = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = (
                lambda *a, f=function, **kw: calls.append(1) or f(*a, **kw))
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)),
            ["loss", "logits"], real=mask.bool())
    assert len(calls) == 3 * len(models[0].model.layers)


def test_hooks_on_layers_attention_and_mlp_fire_as_unpatched():
    """A forward hook on an encoder layer, its attention and its MLP (FSDP2 shards layers with
    such hooks) fires in the patched model on the real tokens, with what transformers' hooks see
    there; outputs and gradients unchanged; the hook that changes the layer's output is
    honoured."""
    models = triplet(mb.ModernBertModel, tiny_config())
    seen = [{} for _ in models]
    for m, record in zip(models, seen):
        layer = m.layers[1]

        def keep(name, index=None, record=record):
            def hook(module, args, output):
                out = output[0] if index is not None else output
                record[name] = out.reshape(-1, out.shape[-1])
                record[name + " is a view"] = out._is_view()
            return hook
        layer.register_forward_hook(keep("layer"))
        layer.attn.register_forward_hook(keep("attn", 0))
        layer.mlp.register_forward_hook(keep("mlp"))
        m.layers[2].register_forward_hook(lambda module, args, output: output * 0.5)
    ids, mask = padded_batch()
    compare(models, dict(input_ids=ids, attention_mask=mask), ["last_hidden_state"],
            real=mask.bool())
    real = mask.bool().reshape(-1)
    for name in ("layer", "attn", "mlp"):
        got, want = seen[0][name], seen[1][name][real]  # packed (T, C) / padded (B * S, C)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    assert not seen[0]["layer is a view"]  # FSDP2 warns of a wrapped layer's view outputs


def test_unhooked_layers_keep_the_lean_path():
    """transformers' output-capturing hooks, left on the layers after hidden states were asked
    for once, capture nothing later: the patched forward keeps its one-plan path."""
    from fastbert import hf_lean_modernbert
    patched, _, _ = triplet(mb.ModernBertModel, tiny_config())
    ids, mask = padded_batch()
    patched.eval()
    with torch.no_grad():
        patched(ids, attention_mask=mask, output_hidden_states=True)
        assert patched.layers[0]._forward_hooks  # installed by transformers, kept
        assert not any(hf_lean_modernbert.module_called(layer) for layer in patched.layers)
        patched.layers[0].register_forward_pre_hook(lambda module, args: None)
        assert hf_lean_modernbert.module_called(patched.layers[0])


def test_patched_classes_read_as_transformers_own():
    """transformers reads a class's module (is_custom_code): a patched class loading a
    checkpoint with missing weights initialises them as the original class does."""
    config = tiny_config()
    patched = fastbert.patch_hf(mb.ModernBertModel(config))
    assert not type(patched).is_custom_code()
    assert type(patched.layers[0]).__module__ == mb.__name__
    loaded = []
    for cls in (type(patched), mb.ModernBertModel):
        torch.manual_seed(5)
        loaded.append(cls.from_pretrained(None, config=copy.deepcopy(config), state_dict={}))
    want = loaded[1].state_dict()
    for name, value in loaded[0].state_dict().items():
        assert torch.equal(value, want[name]), name


def test_hidden_states_requested_run_transformers_forward():
    patched, plain, _ = triplet(mb.ModernBertModel, tiny_config())
    ids, mask = padded_batch()
    got = patched(ids, attention_mask=mask, output_hidden_states=True)
    want = plain(ids, attention_mask=mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)


def test_local_layers_run_windowed_varlen(monkeypatch):
    seen = []  # at the torch backend's varlen forward: the lean path and the public op call it
    forward = varlen._TorchVarlen.attention_varlen_forward
    monkeypatch.setattr(varlen._TorchVarlen, "attention_varlen_forward", staticmethod(
        lambda *a, **kw: seen.append(kw.get("window")) or forward(*a, **kw)))
    patched = fastbert.patch_hf(mb.ModernBertModel(tiny_config()))
    ids, mask = padded_batch()
    patched(ids, attention_mask=mask)
    assert seen == [None, (4, 4), (4, 4)]  # global (no window), then local layers with +-4


def test_unservable_configs_are_refused_before_patching(monkeypatch):
    big = mb.ModernBertModel(tiny_config(hidden_size=520, num_attention_heads=2,
                                         intermediate_size=8))
    with pytest.raises(ValueError, match="head dim 260 is over fastbert's 256"):
        fastbert.patch_hf(big)
    assert type(big) is mb.ModernBertModel
    model = mb.ModernBertForMaskedLM(tiny_config())
    model.config.rope_parameters["sliding_attention"]["rope_type"] = "spiral"
    with pytest.raises(ValueError, match="unknown rope type 'spiral'"):
        fastbert.patch_hf(model)
    assert type(model.model) is mb.ModernBertModel
    with pytest.raises(ValueError, match="ModernBERT runs unpadded only"):
        fastbert.patch_hf(mb.ModernBertModel(tiny_config()), unpad=False)
    old = mb.ModernBertModel(tiny_config())  # transformers 4.x's config has no rope_parameters
    del old.config.rope_parameters
    monkeypatch.delattr(type(old.config), "rope_parameters")
    with pytest.raises(ValueError, match=r"predates the 5\.0 layout patch_hf serves \(patch_hf "
                                         r"needs transformers >= 5\.0"):
        fastbert.patch_hf(old)
    assert type(old) is mb.ModernBertModel


def test_patching_twice_and_copies_are_harmless():
    model = fastbert.patch_hf(mb.ModernBertModel(tiny_config()))
    cls = type(model)
    assert fastbert.patch_hf(model) is model and type(model) is cls
    assert hf_patch_modernbert.models(model) == [model]
    twin = copy.deepcopy(model)  # pickles as the original class plus the patched forward
    assert type(twin) is cls
    ids, mask = padded_batch()
    torch.testing.assert_close(twin(ids, attention_mask=mask).last_hidden_state,
                               model(ids, attention_mask=mask).last_hidden_state)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_patched_on_gpu_by_tolerance_rule(dtype, packed):
    """The headline use: a transformers ModernBERT MLM cast to a half dtype on a GPU, patched
    (auto backends), training step's loss, logits at real tokens and every gradient against the
    unpatched model (sdpa) in that dtype and in fp64; a window shorter than the sequence."""
    config = tiny_config(vocab_size=512, hidden_size=256, num_attention_heads=4,
                         intermediate_size=384, max_position_embeddings=256, local_attention=32,
                         reference_compile=False)
    torch.manual_seed(0)
    base = mb.ModernBertForMaskedLM(config).train()
    patched = fastbert.patch_hf(copy.deepcopy(base)).to("cuda", dtype)
    plain, exact = copy.deepcopy(base).to("cuda", dtype), base.to("cuda", torch.float64)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(4, 512, (3, 130), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref_inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    if packed:  # DataCollatorWithFlattening's form for the patched model
        position_ids = torch.cat([torch.arange(int(n), device="cuda") for n in mask.sum(1)])
        inputs = dict(input_ids=ids[real][None], position_ids=position_ids[None],
                      labels=labels[real][None])
    else:
        inputs = ref_inputs
    results = []
    for model, kw in ((patched, inputs), (plain, ref_inputs), (exact, ref_inputs)):
        out = model(**kw)
        out.loss.backward()
        logits = out.logits[0] if packed and model is patched else out.logits[real]
        results.append((out.loss.detach(), logits.detach(),
                        {n: p.grad for n, p in model.named_parameters()}))
    (loss, logits, grads), (p_loss, p_logits, p_grads), (e_loss, e_logits, e_grads) = results
    assert_close_by_rule(loss, p_loss, e_loss, "loss", factor=3.0)
    assert_close_by_rule(logits, p_logits, e_logits, "logits", factor=3.0)
    assert grads.keys() == p_grads.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert_close_by_rule(g, p_grads[name], e_grads[name], f"grad {name}", factor=3.0,
                             floor=2e-2 * e_grads[name].abs().max().item())
