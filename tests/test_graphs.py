"""CUDA-graph inference (fastbert/graphs.py, issue 22 part 3). The bucket choice, the bucket's
padded layout (real sequences, empty slots, one padding sequence) and the eager fallbacks run on
the CPU; capture, replay against eager for every bucket, the fallback outside them and zero host
syncs in a graphed call are the gpu tier."""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import graphs
from fastbert.model import BertConfig, BertModel
from fastbert.padding import positions_in_sequence

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)


def packed_batch(lengths, device="cpu"):
    """input_ids (1, T), cu_seqlens int32 (B + 1,), max_seqlen of sequences of these lengths."""
    ids = torch.randint(1, 100, (1, sum(lengths)), device=device)
    cu = F.pad(torch.cumsum(torch.tensor(lengths), 0), (1, 0)).to(device, torch.int32)
    return ids, cu, max(lengths, default=0)


def eager_rows(model, ids, cu, max_seqlen):
    return model(ids, cu_seqlens=cu, max_seqlen=max_seqlen, return_packed=True).last_hidden_state


def test_buckets_and_bucket_choice():
    assert graphs.buckets(32) == [1, 2, 4, 8, 16, 32]
    assert graphs.buckets(100, smallest=16) == [16, 32, 64, 100]
    graphed = fastbert.cuda_graphs(BertModel(BertConfig(**TINY)), max_batch=8, max_tokens=256)
    assert graphed.bucket(1, 5) == (1, 16)
    assert graphed.bucket(3, 17) == (4, 32)
    assert graphed.bucket(8, 256) == (8, 256)
    assert graphed.bucket(9, 10) is None and graphed.bucket(2, 257) is None
    with pytest.raises(ValueError, match="positive int"):
        graphs.buckets(0)


@pytest.mark.parametrize("lengths,bucket", [([5, 3, 7], (4, 32)), ([16, 16], (2, 32)),
                                            ([9], (1, 16))])
def test_bucket_layout_gives_the_real_rows(lengths, bucket):
    """The bucket's static inputs -- empty slots and one padding sequence after the real ones,
    max_seqlen = the bucket's tokens -- give the real tokens the rows of the plain call."""
    model = BertModel(BertConfig(**TINY)).eval()
    ids, cu, max_seqlen = packed_batch(lengths)
    b = graphs._Bucket(*bucket, torch.device("cpu"), model.config.position_offset)
    t = ids.numel()
    with torch.no_grad():
        b.fill(ids, cu, positions_in_sequence(cu, t) + model.config.position_offset)
        assert b.cu_seqlens.tolist() == cu.tolist() + [t] * (bucket[0] - len(lengths)) \
            + [bucket[1]]
        torch.testing.assert_close(b.forward(model)[:t], eager_rows(model, ids, cu, max_seqlen),
                                   rtol=1e-5, atol=1e-5)


def test_cpu_and_outside_buckets_run_eagerly(monkeypatch):
    model = BertModel(BertConfig(**TINY)).eval()
    graphed = fastbert.cuda_graphs(model, max_batch=2, max_tokens=32)
    for lengths in ([4, 6], [4, 6, 2], [30, 10]):
        ids, cu, max_seqlen = packed_batch(lengths)
        with torch.no_grad():
            assert torch.equal(graphed(ids, cu, max_seqlen), eager_rows(model, ids, cu, max_seqlen))
    assert graphed.replays == 0 and not graphed._buckets
    monkeypatch.setenv(graphs.ENV_SWITCH, "0")
    assert not fastbert.cuda_graphs(model).enabled  # the kill switch
    assert not fastbert.cuda_graphs(model, enabled=False).enabled


# --------------------------------------------------------------------------------------------
# gpu tier
# --------------------------------------------------------------------------------------------

def gpu_model():
    return BertModel(BertConfig(**TINY)).cuda().eval()


@pytest.mark.gpu
def test_every_bucket_replays_the_eager_forward():
    model = gpu_model()
    graphed = fastbert.cuda_graphs(model, max_batch=4, max_tokens=64)
    cases = 0
    with torch.inference_mode():
        for batch in graphed.batch_sizes:
            for tokens in graphed.token_sizes:
                # batch sequences filling the bucket's tokens but for a few
                real = max(batch, tokens - 3)
                lengths = [real // batch + (i < real % batch) for i in range(batch)]
                ids, cu, max_seqlen = packed_batch(lengths, "cuda")
                assert graphed.bucket(batch, real) == (batch, tokens)
                for _ in range(2):  # the capture, then a replay
                    got = graphed(ids, cu, max_seqlen)
                    # the bucket's GEMMs have more rows: their tiling may round differently
                    torch.testing.assert_close(got, eager_rows(model, ids, cu, max_seqlen),
                                               rtol=1e-4, atol=1e-4)
                cases += 1
    assert cases == len(graphed.batch_sizes) * len(graphed.token_sizes) == 9
    assert graphed.replays == 2 * cases


@pytest.mark.gpu
def test_outside_the_buckets_and_in_training_run_eagerly():
    model = gpu_model()
    graphed = fastbert.cuda_graphs(model, max_batch=2, max_tokens=32)
    with torch.inference_mode():
        for lengths in ([4, 4, 4], [20, 20]):  # 3 sequences; 40 tokens
            ids, cu, max_seqlen = packed_batch(lengths, "cuda")
            assert torch.equal(graphed(ids, cu, max_seqlen), eager_rows(model, ids, cu, max_seqlen))
    ids, cu, max_seqlen = packed_batch([4, 4], "cuda")
    graphed(ids, cu, max_seqlen)  # grad mode on: eager
    graphed.enabled = False  # the kill switch
    with torch.inference_mode():
        graphed(ids, cu, max_seqlen)
    assert graphed.replays == 0 and not graphed._buckets


@pytest.mark.gpu
def test_graphed_calls_never_sync():
    """A captured forward cannot sync (capture fails on one); a graphed call -- buffers filled,
    replay, rows copied out -- runs under sync debug mode "error"."""
    model = gpu_model()
    graphed = fastbert.cuda_graphs(model, max_batch=4, max_tokens=64)
    batches = [packed_batch(lengths, "cuda") for lengths in ([3, 9, 1], [12, 20, 5, 7], [40])]
    with torch.inference_mode():
        for ids, cu, max_seqlen in batches:
            graphed(ids, cu, max_seqlen)  # captures (capture itself synchronizes)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for ids, cu, max_seqlen in batches:
                graphed(ids, cu, max_seqlen)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert graphed.replays == 2 * len(batches)


@pytest.mark.gpu
def test_sentence_encoder_replays_graphs_on_a_gpu():
    from fastbert.data import Tokenizer
    from fastbert.sentence import SentenceEncoder
    from tests.test_sentence import minilm_dir

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    encoder = SentenceEncoder(BertModel(config), Tokenizer.from_pretrained(minilm_dir()))
    encoder.to("cuda")
    texts = ["a short one", "a somewhat longer sentence about nothing in particular", "x"]
    graphed = encoder.encode(texts)
    assert encoder.graphs is not None and encoder.graphs.replays > 0
    encoder.use_cuda_graphs = False
    torch.testing.assert_close(graphed, encoder.encode(texts), rtol=1e-4, atol=1e-4)
