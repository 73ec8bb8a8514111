"""The drop-in rule (issue 19): every Hugging Face workflow on a patched model gives the unpatched
model's answer or a clear error. LoRA adapters attached before or after patch_hf, attention
probabilities, packed batches (DataCollatorWithFlattening), pickling, the span-QA loss when
unpadded, the fused QKV weight's refresh, and transformers' gradient checkpointing function, each
against the unpatched transformers model by the tolerance rule."""
import copy
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import fastbert
from fastbert import hf_layers
from fastbert.heads import span_loss
from tests.helpers import FLOOR, assert_close_by_rule
from tests.test_family import ARCHS, NO_DROPOUT, make_inputs, make_model
from tests.test_hf import assert_agree

transformers = pytest.importorskip("transformers")

FAMILIES = {**ARCHS, "bert": ("Bert", "BertConfig", dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=40, type_vocab_size=2))}
NO_DROPOUT = {**NO_DROPOUT, "bert": NO_DROPOUT["roberta"]}
# every Linear patch_hf fuses: q/k/v, the attention output, FFN in and out
LORA_TARGETS = {"bert": ["query", "key", "value", "dense"],
                "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]}


@pytest.fixture(autouse=True)
def _bert_in_archs(monkeypatch):
    monkeypatch.setitem(ARCHS, "bert", FAMILIES["bert"])


def _exact_and_plain(model, fn):
    """fn(model) on the model and on an fp64 copy: (plain fp32, exact fp64)."""
    return fn(model), fn(copy.deepcopy(model).double())


# --------------------------------------------------------------------------------------------
# 1. LoRA before and after patching
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_lora_before_or_after_patching_trains_as_unpatched(arch, when):
    peft = pytest.importorskip("peft")
    head = "ForSequenceClassification"
    base = make_model(arch, head, **NO_DROPOUT[arch]).train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=LORA_TARGETS[arch])
    reference = peft.get_peft_model(copy.deepcopy(base), lora)
    if when == "before":
        model = fastbert.patch_hf(peft.get_peft_model(copy.deepcopy(base), lora))
    else:
        model = peft.get_peft_model(fastbert.patch_hf(copy.deepcopy(base)), lora)
    model.load_state_dict(reference.state_dict())  # the same adapter weights
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"
               and hasattr(m, "lora_A")]
    # six projections in each of the two layers, and BERT's pooler dense
    assert len(wrapped) == 6 * 2 + (1 if arch == "bert" else 0), wrapped
    inputs = make_inputs(base, head)

    def loss_and_adapter_grads(m):
        m.zero_grad()
        loss = m(**inputs).loss
        loss.backward()
        return {"loss": loss.detach(), **{n: p.grad for n, p in m.named_parameters()
                                          if p.requires_grad}}
    got = loss_and_adapter_grads(model)
    plain, exact = _exact_and_plain(reference, loss_and_adapter_grads)
    assert got.keys() == plain.keys() and any("lora_A" in n for n in got)
    for name in plain:
        assert_close_by_rule(got[name], plain[name], exact[name], name=f"{arch} LoRA {when} {name}")
    ffn_in = "intermediate.dense" if arch == "bert" else "ffn.lin1"
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n and ffn_in in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads
    # merged back into plain Linears: the fused paths serve them again, with the merged weights
    merged, merged_reference = model.merge_and_unload(), reference.merge_and_unload()
    merged.eval(), merged_reference.eval()
    with torch.no_grad():
        plain, exact = _exact_and_plain(merged_reference, lambda m: m(**inputs).logits)
        assert_close_by_rule(merged(**inputs).logits, plain, exact, name=f"{arch} merged")
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules()
               if n.endswith(tuple(LORA_TARGETS[arch])))


def test_a_hooked_linear_is_called_as_a_module():
    model = fastbert.patch_hf(make_model("bert", "Model"))
    inputs = make_inputs(model, "Model")
    seen = []
    handle = model.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: seen.append(out.shape) or out * 0)
    with torch.no_grad():
        hooked = model(**inputs).last_hidden_state
    handle.remove()
    reference = make_model("bert", "Model")
    reference.load_state_dict(model.state_dict())
    reference.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: out * 0)
    with torch.no_grad():
        plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
    real = inputs["attention_mask"].bool()
    assert seen, "the hook never ran"
    assert_close_by_rule(hooked[real], plain[real], exact[real], name="hooked intermediate")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_layer_outputs_are_tensors_of_their_own_and_inplace_ops_on_them_train(arch):
    """A layer returns no view (FSDP2 warns of a wrapped module's views: an in-place op on one
    skips the pre-backward all-gather), and an in-place op on its output, here in a forward
    hook, gives the unpatched model's loss and gradients."""
    head = "ForSequenceClassification"
    base = make_model(arch, head, **NO_DROPOUT[arch]).train()
    model = fastbert.patch_hf(copy.deepcopy(base))
    inputs = make_inputs(base, head)
    views = []

    def double_in_place(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        views.append(out._is_view())
        out.mul_(2.0)

    def loss_and_grads(m):
        layers = next(mod.layer for mod in m.modules()
                      if isinstance(getattr(mod, "layer", None), torch.nn.ModuleList))
        handles = [layer.register_forward_hook(double_in_place) for layer in layers]
        m.zero_grad()
        loss = m(**inputs).loss
        loss.backward()
        for handle in handles:
            handle.remove()
        return {"loss": loss.detach(), **{n: p.grad for n, p in m.named_parameters()}}
    got = loss_and_grads(model)
    assert views and not any(views), views
    plain, exact = _exact_and_plain(base, loss_and_grads)
    for name in plain:
        assert_close_by_rule(got[name], plain[name], exact[name], name=f"{arch} {name}")
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_bf16_autocast_keeps_the_fp32_residual_stream_and_trains_as_unpatched(arch):
    """Under bf16 autocast (transformers Trainer's bf16=True) a layer's LayerNorm(dense(h) +
    residual) takes the sum's dtype on CPU (fp32 over an fp32 residual stream; CUDA autocast
    runs every layer_norm in fp32): the patched layers pass the dtypes the unpatched ones do
    (they passed bf16, up to 2.2x the unpatched model's error on the logits), and the loss,
    logits and every gradient meet the tolerance rule against an fp64 run."""
    head = "ForMaskedLM"
    base = make_model(arch, head, **NO_DROPOUT[arch]).train()
    model = fastbert.patch_hf(copy.deepcopy(base))
    inputs = make_inputs(base, head)
    real = inputs["attention_mask"].bool()

    def run(m, autocast=True):
        layers = next(mod.layer for mod in m.modules()
                      if isinstance(getattr(mod, "layer", None), torch.nn.ModuleList))
        dtypes = []
        handles = [layer.register_forward_hook(lambda mod, args, out: dtypes.append(
            (out[0] if isinstance(out, tuple) else out).dtype)) for layer in layers]
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(**inputs)
        out.loss.backward()
        for handle in handles:
            handle.remove()
        return dtypes, {"loss": out.loss.detach().float(), "logits": out.logits.detach()[real],
                        **{n: p.grad for n, p in m.named_parameters()}}
    (got_dtypes, got), (plain_dtypes, plain) = run(model), run(base)
    exact = run(copy.deepcopy(base).double(), autocast=False)[1]
    assert got_dtypes == plain_dtypes, (got_dtypes, plain_dtypes)
    for name in plain:  # bf16 math: bf16's floor (key.bias's exact gradient is 0: noise only)
        assert_close_by_rule(got[name].float(), plain[name].float(), exact[name],
                             name=f"{arch} {name}", floor=FLOOR[torch.bfloat16])


# --------------------------------------------------------------------------------------------
# 2. output_attentions
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_output_attentions_are_the_eager_probabilities(arch, attn_implementation, unpad):
    reference = make_model(arch, "Model")  # transformers' eager attention forms them
    model = fastbert.patch_hf(make_model(arch, "Model", attn_implementation), unpad=unpad)
    model.load_state_dict(reference.state_dict())
    inputs = make_inputs(model, "Model")
    hf_layers._probabilities_warned = False
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(**inputs, output_attentions=True)
        model(**inputs, output_attentions=True)
        plain, exact = _exact_and_plain(reference,
                                        lambda m: m(**inputs, output_attentions=True).attentions)
    assert sum("output_attentions" in str(w.message) for w in caught) == 1  # warned once
    assert len(got.attentions) == len(plain) == reference.config.num_hidden_layers
    for i, (a, p, e) in enumerate(zip(got.attentions, plain, exact)):
        assert_close_by_rule(a, p, e, name=f"{arch} attentions[{i}]")


# --------------------------------------------------------------------------------------------
# 3. packed batches run each sequence on its own
# --------------------------------------------------------------------------------------------

def _sentences(model, lengths):
    config = model.config
    return [torch.randint(3, config.vocab_size, (n,)) for n in lengths]


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_packed_batch_equals_each_sentence_alone(arch, unpad):
    model = make_model(arch, "Model")
    patched = fastbert.patch_hf(copy.deepcopy(model), unpad=unpad)
    sentences = _sentences(model, [5, 3, 7])
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": s.tolist()} for s in sentences])
    cu = batch.pop("cu_seq_lens_q")
    flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=batch.pop("cu_seq_lens_k"),
                 max_length_q=batch.pop("max_length_q"), max_length_k=batch.pop("max_length_k"))
    ids, positions = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        by_positions = patched(input_ids=ids, position_ids=positions).last_hidden_state[0]
        by_cu = patched(input_ids=ids, position_ids=positions, **flash).last_hidden_state[0]
        for s, start, end in zip(sentences, cu[:-1].tolist(), cu[1:].tolist()):
            alone = dict(input_ids=s[None], position_ids=torch.arange(len(s))[None])
            plain, exact = _exact_and_plain(model, lambda m: m(**alone).last_hidden_state[0])
            for name, got in (("position_ids", by_positions), ("cu_seq_lens", by_cu)):
                assert_close_by_rule(got[start:end], plain, exact,
                                     name=f"{arch} packed by {name}, sentence at {start}")


def test_packed_batch_trains_as_its_sentences_and_gives_block_attentions():
    model = make_model("bert", "ForTokenClassification", **NO_DROPOUT["bert"]).train()
    patched = fastbert.patch_hf(copy.deepcopy(model))
    sentences = _sentences(model, [4, 6])
    labels = [torch.randint(0, 3, (len(s),)) for s in sentences]
    ids = torch.cat(sentences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sentences])[None]
    out = patched(input_ids=ids, position_ids=positions, labels=torch.cat(labels)[None],
                  output_attentions=True)
    out.loss.backward()
    # the token-averaged loss of the pack is the token-weighted mean of the sentences' losses
    alone = [model(input_ids=s[None], labels=l[None], output_attentions=True)
             for s, l in zip(sentences, labels)]
    total = sum(a.loss * len(s) for a, s in zip(alone, sentences)) / ids.shape[1]
    total.backward()
    torch.testing.assert_close(out.loss, total)
    for (name, p), q in zip(patched.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    probs = out.attentions[0][0]  # (nh, T, T): block diagonal, each block the sentence's own
    n = len(sentences[0])
    torch.testing.assert_close(probs[:, :n, :n], alone[0].attentions[0][0])
    torch.testing.assert_close(probs[:, n:, n:], alone[1].attentions[0][0])
    assert probs[:, :n, n:].abs().max() == 0 and probs[:, n:, :n].abs().max() == 0


def test_packed_cu_seq_lens_of_another_batch_size_is_refused():
    patched = fastbert.patch_hf(make_model("bert", "Model"))
    ids = torch.randint(3, 100, (2, 6))
    with pytest.raises(ValueError, match="cu_seq_lens_q expects hidden states of batch 1"):
        patched(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 6, 12], dtype=torch.int32),
                cu_seq_lens_k=torch.tensor([0, 6, 12], dtype=torch.int32), max_length_q=6,
                max_length_k=6)


# --------------------------------------------------------------------------------------------
# 4. pickling
# --------------------------------------------------------------------------------------------

def test_patched_model_pickles_deepcopies_and_loads_in_a_fresh_process(tmp_path):
    model = fastbert.patch_hf(make_model("distilbert", "ForSequenceClassification"))
    inputs = make_inputs(model, "ForSequenceClassification")
    with torch.no_grad():
        expected = model(**inputs).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(clone.distilbert.transformer) is type(model.distilbert.transformer)
            torch.testing.assert_close(clone(**inputs).logits, expected, rtol=0, atol=0)
    torch.save(model, tmp_path / "model.pt")
    torch.save((inputs, expected), tmp_path / "io.pt")
    script = (
        "import torch\n"
        f"model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        f"inputs, expected = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "kinds = {type(m).__name__ for m in model.modules()}\n"
        "assert 'FastbertTransformer' in kinds and 'FastbertLayerNorm' in kinds, kinds\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# 5. span-QA loss on padded batches
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_unpadded_span_loss_masks_padding_and_padded_mode_is_transformers(arch):
    head = "ForQuestionAnswering"
    reference = make_model(arch, head)
    inputs = make_inputs(reference, head)
    inputs["end_positions"] = torch.tensor([4, 2, 10])
    real = inputs["attention_mask"].bool()
    inputs["attention_mask"][2, 9:] = 0  # label 10 now sits at padding: ignored when unpadded
    real = inputs["attention_mask"].bool()
    unpadded = fastbert.patch_hf(copy.deepcopy(reference))
    padded = fastbert.patch_hf(copy.deepcopy(reference), unpad=False)

    def masked(model):
        out = model(**{k: v for k, v in inputs.items() if not k.endswith("_positions")})
        return span_loss(out.start_logits, out.end_logits, inputs["start_positions"],
                         inputs["end_positions"], real)
    plain, exact = _exact_and_plain(reference, masked)
    got = unpadded(**inputs)
    assert_close_by_rule(got.loss, plain, exact, name=f"{arch} masked span loss")
    got.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in unpadded.parameters() if p.grad is not None)
    plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).loss)
    assert_close_by_rule(padded(**inputs).loss, plain, exact, name=f"{arch} padded span loss")
    assert unpadded(**inputs, return_dict=False)[0] == got.loss  # tuple outputs keep the loss


def test_own_qa_head_masks_padding_when_unpadded():
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128,
                                 max_position_embeddings=32)
    model = fastbert.BertForQuestionAnswering(config).eval()
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    starts, ends = torch.tensor([2, 1]), torch.tensor([3, 7])  # 7 is padding in row 1
    out = model(ids, mask, start_positions=starts, end_positions=ends)
    expected = span_loss(out.start_logits, out.end_logits, starts, ends, mask.bool())
    torch.testing.assert_close(out.loss, expected)
    # the padded path normalises over padding as transformers does
    padded = model(ids, mask, start_positions=starts, end_positions=ends, unpad=False)
    assert not torch.allclose(padded.loss, expected)


# --------------------------------------------------------------------------------------------
# the fused QKV weight, gradient checkpointing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["in place", "through .data", "fused AdamW step",
                                    "replaced", ".data reassigned", "to float64"])
def test_inference_projections_follow_every_weight_change(change):
    """Between two inference forwards the weights change in the ways training and serving code
    changes them: fused optimizers (the Trainer's default AdamW) and writes through .data (EMA,
    peft's merge_and_unload) do not bump version counters, so a fused QKV copy kept between
    calls went stale (the Trainer's eval after a step was 3.9e-2 off). The patched model must
    compute what the unpatched one does after the same change."""
    reference = make_model("bert", "Model")
    model = fastbert.patch_hf(copy.deepcopy(reference))
    inputs = make_inputs(model, "Model")
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        model(**inputs)  # a first inference forward (one that filled a cache)
    if change == "fused AdamW step":  # the same gradients on both, so the same new weights
        reference(**inputs).last_hidden_state.square().mean().backward()
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            mine.grad = None if theirs.grad is None else theirs.grad.clone()
        for m in (model, reference):
            torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True).step()
    for m in (model, reference):
        sa = m.encoder.layer[1].attention.self
        with torch.no_grad():
            if change == "fused AdamW step":
                continue
            if change == "in place":
                sa.value.weight.mul_(-1.5)
            elif change == "through .data":
                sa.query.weight.data.mul_(2.0)
                sa.key.bias.data.add_(0.5)
            elif change == "replaced":
                sa.key.weight = torch.nn.Parameter(sa.key.weight * -0.5)
            elif change == ".data reassigned":
                sa.value.weight.data = sa.value.weight.data * 3.0
            else:
                m.double()
    if change == "to float64":
        with torch.no_grad():
            got = model(**inputs).last_hidden_state
            want = reference(**inputs).last_hidden_state
        torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
        return
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
    assert_close_by_rule(got[real], plain[real], exact[real], name=f"after {change}")


def _hot_attention(module, q, k, v, attention_mask, scaling=None, **kwargs):
    """sdpa at 4x the softmax temperature: a custom attention function, as a user registers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, q, k, v, attention_mask,
                                  scaling=4.0 * q.shape[-1] ** -0.5, **kwargs)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "modernbert"])
@pytest.mark.parametrize("when", ["before patching", "after patching"])
def test_a_custom_attention_function_runs_as_transformers_calls_it(arch, when):
    """A function registered with transformers' AttentionInterface and chosen with
    set_attn_implementation was never called by the patched layers (2.4e-3 off): such a model
    runs transformers' own forward, and the served implementations come back when reselected."""
    from transformers import AttentionInterface
    AttentionInterface.register("fastbert_test_hot", _hot_attention)
    if arch == "modernbert":
        from tests.test_hf_modernbert import mb, padded_batch, tiny_config
        reference = mb.ModernBertModel(tiny_config()).eval()
        ids, mask = padded_batch()
        inputs = dict(input_ids=ids, attention_mask=mask)
    else:
        reference = make_model(arch, "Model", **NO_DROPOUT[arch])
        inputs = make_inputs(reference, "Model")
    real = inputs["attention_mask"].bool()
    model = copy.deepcopy(reference)
    if when == "after patching":
        fastbert.patch_hf(model)
    for m in (model, reference):
        m.set_attn_implementation("fastbert_test_hot")
    if when == "before patching":
        fastbert.patch_hf(model)
    for implementation in ("fastbert_test_hot", "sdpa"):
        for m in (model, reference):
            m.set_attn_implementation(implementation)
        got = model(**inputs).last_hidden_state
        plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
        assert_close_by_rule(got[real], plain[real], exact[real], name=implementation)


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_pruned_linears_run_as_their_modules(arch):
    """torch.nn.utils.prune turns a Linear's weight into an attribute its pre-hook sets (the old
    hook-based weight_norm too): the patched model raised KeyError: 'weight'."""
    import torch.nn.utils.prune as prune
    if arch == "modernbert":
        from tests.test_hf_modernbert import mb, padded_batch, tiny_config
        reference = mb.ModernBertModel(tiny_config()).eval()
        ids, mask = padded_batch()
        inputs = dict(input_ids=ids, attention_mask=mask)
        pick = lambda m: (m.layers[0].mlp.Wo, m.layers[1].attn.Wqkv)  # noqa: E731
    else:
        reference = make_model(arch, "Model")
        inputs = make_inputs(reference, "Model")
        pick = lambda m: (m.encoder.layer[0].intermediate.dense,  # noqa: E731
                          m.encoder.layer[1].attention.self.key)
    model = copy.deepcopy(reference)
    for m in (model, reference):
        for linear in pick(m):
            prune.l1_unstructured(linear, "weight", amount=0.5)
    fastbert.patch_hf(model)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
    assert_close_by_rule(got[real], plain[real], exact[real], name="pruned")


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_torch_func_grad_through_the_patched_model(arch):
    """torch.func.grad over functional_call (per-sample gradients, meta-learning): the torch
    backend's GeGLU and rotary backward wrote with out= ops, which a functorch transform refuses
    (ModernBERT raised); every gradient against the unpatched model's, by the tolerance rule."""
    from torch.func import functional_call, grad
    if arch == "modernbert":
        from tests.test_hf_modernbert import mb, padded_batch, tiny_config
        reference = mb.ModernBertModel(tiny_config()).eval()
        ids, mask = padded_batch()
        inputs = dict(input_ids=ids, attention_mask=mask)
    else:
        reference = make_model(arch, "Model")
        inputs = make_inputs(reference, "Model")
    real = inputs["attention_mask"].bool()
    model = fastbert.patch_hf(copy.deepcopy(reference))

    def grads(m):
        def loss(params):
            out = functional_call(m, params, (), inputs).last_hidden_state
            return out[real].square().sum()
        return grad(loss)({k: v.detach() for k, v in m.named_parameters()})
    got, plain, exact = grads(model), grads(reference), grads(copy.deepcopy(reference).double())
    for name in got:
        assert_close_by_rule(got[name], plain[name], exact[name], name=name)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("kind", ["block-diagonal bool", "causal additive"])
def test_a_callers_4d_mask_is_honoured_as_transformers_does(arch, kind):
    """A (B, 1, S, S) mask from the caller has per-query structure: its last query row was taken
    as a key-padding mask (two sequences packed in a row by a block-diagonal mask: 3.0 off).
    Such a call runs transformers' attention; a 2-D mask after it takes the fast path again."""
    reference = make_model(arch, "Model", **NO_DROPOUT[arch])
    model = fastbert.patch_hf(copy.deepcopy(reference))
    s = 10
    ids = torch.randint(3, reference.config.vocab_size, (2, s))
    if kind == "block-diagonal bool":
        mask = torch.zeros(2, 1, s, s, dtype=torch.bool)
        mask[:, :, :6, :6] = mask[:, :, 6:, 6:] = True
    else:
        mask = torch.full((2, 1, s, s), torch.finfo(torch.float32).min).triu(1)
    def run(m):
        dtype = next(m.parameters()).dtype
        given = mask.to(dtype) if mask.is_floating_point() else mask
        return m(input_ids=ids, attention_mask=given).last_hidden_state

    with torch.no_grad():
        got = run(model)
        plain, exact = _exact_and_plain(reference, run)
        assert_close_by_rule(got, plain, exact, name=kind)
        inputs = make_inputs(model, "Model")  # then a padded 2-D batch, as before
        real = inputs["attention_mask"].bool()
        got = model(**inputs).last_hidden_state
        plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
        assert_close_by_rule(got[real], plain[real], exact[real], name="2-D after")


def test_a_fresh_process_compiles_the_patched_model_in_one_graph():
    """torch.compile(fullgraph=True) as the first call of a process: a per-call check filling a
    table on first use mutated it while dynamo traced, which broke the graph (fullgraph raised;
    7 graphs without it)."""
    script = """
import copy, torch, transformers, fastbert
config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
model = transformers.BertModel(config).eval()
patched = fastbert.patch_hf(copy.deepcopy(model))
ids = torch.randint(1, 100, (2, 8)); mask = torch.ones(2, 8, dtype=torch.long); mask[1, 5:] = 0
run = torch.compile(lambda i, a: patched(i, attention_mask=a).last_hidden_state,
                    backend="eager", fullgraph=True)
with torch.no_grad():
    got, want = run(ids, mask), model(ids, attention_mask=mask).last_hidden_state
print((got - want)[mask.bool()].abs().max().item())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 1e-5, done.stdout


def test_bias_free_projections_in_inference_with_grad_enabled():
    """Q/K/V without biases, a frozen model run outside no_grad (the CPU inference GEMM route
    with autograd on): the inference projections read a missing bias's requires_grad."""
    reference = make_model("bert", "Model")
    for module in reference.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == 64:
            module.bias = None
    reference.requires_grad_(False)
    model = fastbert.patch_hf(copy.deepcopy(reference))
    inputs = make_inputs(model, "Model")
    real = inputs["attention_mask"].bool()
    got = model(**inputs).last_hidden_state
    plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
    assert_close_by_rule(got[real], plain[real], exact[real], name="bias-free")


def test_pickles_of_earlier_versions_find_their_hooks():
    """A DistilBERT patched and pickled before its pre-hook was renamed names it
    fastbert.hf_patch._pass_position_ids: that name still loads."""
    from fastbert import hf_patch
    old = b"cfastbert.hf_patch\n_pass_position_ids\n."
    assert pickle.loads(old) is hf_patch._distilbert_pre_hook


def _replace_activations(model, make):
    """Every FFN activation module of a BERT-family model replaced by make()."""
    for module in model.modules():
        if hasattr(module, "intermediate_act_fn"):
            module.intermediate_act_fn = make()
        elif type(module).__name__ == "FFN":  # DistilBERT
            module.activation = make()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
@pytest.mark.parametrize("when", ["before patching", "after patching"])
def test_a_replaced_or_hooked_activation_runs_as_the_module_says(arch, when):
    """The fused Linear+GELU follows the activation module the layer holds, not the config: a
    ReLU put in its place (before or after patching) ran as GELU (5.6e-2 off); a GELU with a
    forward hook runs as a module call, so the hook fires."""
    reference = make_model(arch, "Model", **NO_DROPOUT[arch])
    model = copy.deepcopy(reference)
    if when == "before patching":
        for m in (model, reference):
            _replace_activations(m, torch.nn.ReLU)
        fastbert.patch_hf(model)
    else:
        fastbert.patch_hf(model)
        for m in (model, reference):
            _replace_activations(m, torch.nn.ReLU)
    inputs = make_inputs(model, "Model")
    real = inputs["attention_mask"].bool()
    got = model(**inputs).last_hidden_state
    plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
    assert_close_by_rule(got[real], plain[real], exact[real], name=f"ReLU {when}")
    calls = []
    for m in (model, reference):
        _replace_activations(m, lambda: torch.nn.GELU(approximate="tanh"))
    for module in model.modules():
        if type(module) is torch.nn.GELU:
            module.register_forward_hook(lambda *a: calls.append(1))
    got = model(**inputs).last_hidden_state
    plain, exact = _exact_and_plain(reference, lambda m: m(**inputs).last_hidden_state)
    assert_close_by_rule(got[real], plain[real], exact[real], name="hooked tanh GELU")
    assert len(calls) == model.config.num_hidden_layers  # DistilBERT's n_layers, aliased


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_uses_the_models_function_and_kwargs(use_reentrant, monkeypatch):
    head = "ForTokenClassification"
    reference = make_model("bert", head, **NO_DROPOUT["bert"]).train()
    model = fastbert.patch_hf(copy.deepcopy(reference))
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    for layer in model.bert.encoder.layer:  # the function transformers bound at enable time
        layer._gradient_checkpointing_func = lambda *a, f=layer._gradient_checkpointing_func: (
            calls.append("bound") or f(*a))
    inputs = make_inputs(model, head)
    assert_agree(model, reference, inputs, f"checkpointed, use_reentrant={use_reentrant}")
    layers = reference.config.num_hidden_layers
    assert calls.count("bound") == layers, calls


@pytest.mark.parametrize("api", ["gradient", "activation"])  # transformers 5.24 renamed it
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, "own function"])
def test_own_model_gradient_checkpointing_as_transformers_api(kwargs, unpad, api, monkeypatch):
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128,
                                 max_position_embeddings=32, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, unpad=unpad)
    model = fastbert.BertForSequenceClassification(config).train()
    checkpointed = copy.deepcopy(model)
    calls = []

    def own_function(function, *args):
        calls.append(len(args))
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    enable = getattr(checkpointed, f"{api}_checkpointing_enable")
    if kwargs == "own function":
        enable(checkpointing_function=own_function)
    else:
        real = torch.utils.checkpoint.checkpoint
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: (
            calls.append(k.get("use_reentrant")) or real(*a, **k)))
        enable(kwargs)
    assert getattr(checkpointed, f"is_{api}_checkpointing")
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1])
    for m in (model, checkpointed):
        m(ids, mask, labels=labels).loss.backward()
    assert len(calls) == config.num_hidden_layers, calls
    if kwargs != "own function":  # transformers' defaults: reentrant for the old name only
        default = {"use_reentrant": api == "gradient"}
        assert set(calls) == {(kwargs or default)["use_reentrant"]}
    for (name, p), q in zip(checkpointed.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    getattr(checkpointed, f"{api}_checkpointing_disable")()
    assert not getattr(checkpointed, f"is_{api}_checkpointing")
    if api == "activation":
        with pytest.raises(ValueError, match="every_n_layers=1 and offload=False expected"):
            checkpointed.activation_checkpointing_enable(every_n_layers=2)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_profiler_names_fastbert_ops_in_inference(arch):
    model = fastbert.patch_hf(make_model(arch, "ForMaskedLM"))
    inputs = make_inputs(model, "ForMaskedLM")
    with torch.no_grad():
        plain = model(**inputs).logits
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = model(**inputs).logits
    seen = {e.name for e in prof.events() if e.name.startswith("fastbert::")}
    expected = {f"fastbert::{op}_fwd" for op in ("attention_varlen", "add_layer_norm",
                                                 "linear_bias_gelu")}
    assert expected <= seen, seen
    torch.testing.assert_close(profiled, plain)


def test_patched_forwards_keep_the_original_signatures():
    # transformers (and its tests) read a model's forward signature: inputs_embeds, labels, ...
    import inspect
    for arch in ("bert", "distilbert"):
        original = make_model(arch, "ForQuestionAnswering")
        patched = fastbert.patch_hf(copy.deepcopy(original))
        assert type(patched) is not type(original)  # the span loss is patched in
        for m, o in zip(patched.modules(), original.modules()):
            assert inspect.signature(m.forward) == inspect.signature(o.forward), type(m)


def test_lora_on_fastberts_own_model_is_honoured():
    peft = pytest.importorskip("peft")
    config = fastbert.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128,
                                 max_position_embeddings=32, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    base = fastbert.BertForSequenceClassification(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["qkv", "attn_out", "ffn_in", "ffn_out"])
    model = peft.get_peft_model(base, lora)
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 4:] = 0
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    for name in ("qkv", "attn_out", "ffn_in", "ffn_out"):
        grads = [p.grad for n, p in model.named_parameters() if f"{name}.lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
    model.eval()
    with torch.no_grad():  # the CPU inference GEMM path must not read the base weight alone
        adapted = model(input_ids=ids, attention_mask=mask).logits
        merged = model.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)
