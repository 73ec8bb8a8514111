"""fastbert: fused Triton and CUDA C++ kernels for BERT encoders, and a BERT that uses them.

    import fastbert
    out = fastbert.attention(q, k, v, key_padding_mask)          # (B, S, H, D)
    out = fastbert.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    y = fastbert.add_layer_norm(x, residual, weight, bias)
    h = fastbert.linear_bias_gelu(x, weight, bias)
    h = fastbert.linear_geglu(x, wi_weight)                       # gelu(x W_a^T) * (x W_g^T)
    q = fastbert.apply_rotary(q, cos, sin)                        # rotary embeddings

Importing fastbert loads neither Triton, the CUDA extension nor transformers; each is loaded the
first time something that needs it is used.
"""
import importlib

from fastbert.ops import BACKENDS, attention, get_backend, set_backend
from fastbert.layer_norm import add_layer_norm
from fastbert.linear_gelu import linear_bias_gelu
from fastbert.geglu import linear_geglu
from fastbert.rotary import apply_rotary
from fastbert.varlen import attention_varlen

__version__ = "0.1.0"

# name -> module, imported on first access
_LAZY = {
    "BertConfig": "fastbert.model",
    "BertModel": "fastbert.model",
    "BertForPreTraining": "fastbert.heads",
    "BertForMaskedLM": "fastbert.heads",
    "BertForNextSentencePrediction": "fastbert.heads",
    "BertForSequenceClassification": "fastbert.heads",
    "BertForTokenClassification": "fastbert.heads",
    "BertForQuestionAnswering": "fastbert.heads",
    "BertForMultipleChoice": "fastbert.heads",
    "BertLMHeadModel": "fastbert.heads",
    "patch_hf": "fastbert.hf",
    "SentenceEncoder": "fastbert.sentence",
    "cuda_graphs": "fastbert.graphs",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")


__all__ = ["BACKENDS", "attention", "attention_varlen", "add_layer_norm", "linear_bias_gelu",
           "linear_geglu", "apply_rotary", "set_backend",
           "get_backend", "__version__", *_LAZY]
