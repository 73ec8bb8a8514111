"""Triton backend: one module per op (kernels + launchers). fastbert/ops.py chooses backends and
holds the attention op; each other op's registration and autograd live in fastbert/<op>.py."""
from fastbert.triton.attention import attention_backward, attention_forward
from fastbert.triton.attention_varlen import (attention_varlen_backward,
                                              attention_varlen_forward)
from fastbert.triton.layer_norm import add_layer_norm_backward, add_layer_norm_forward
from fastbert.triton.linear_gelu import linear_bias_gelu_backward, linear_bias_gelu_forward
from fastbert.triton.geglu import linear_geglu_backward, linear_geglu_forward
from fastbert.triton.rotary import apply_rotary
from fastbert.triton import attention as _attention
from fastbert.triton import attention_varlen as _attention_varlen
from fastbert.triton import layer_norm as _layer_norm
from fastbert.triton import linear_gelu as _linear_gelu
from fastbert.triton import geglu as _geglu
from fastbert.triton import rotary as _rotary

_UNSUPPORTED = {
    "fastbert.attention": _attention.unsupported,
    "fastbert.attention_varlen": _attention_varlen.unsupported,
    "fastbert.add_layer_norm": _layer_norm.unsupported,
    "fastbert.linear_bias_gelu": _linear_gelu.unsupported,
    "fastbert.apply_rotary": _rotary.unsupported,
    "fastbert.linear_geglu": _geglu.unsupported,
}


def unsupported(op: str, **kw):
    """Why the Triton backend cannot serve this input, or None."""
    check = _UNSUPPORTED.get(op)
    if check is None:
        return f"the Triton backend has no kernel for {op}"
    return check(**kw)


__all__ = ["attention_forward", "attention_backward", "attention_varlen_forward",
           "attention_varlen_backward", "add_layer_norm_forward", "add_layer_norm_backward",
           "linear_bias_gelu_forward", "linear_bias_gelu_backward", "linear_geglu_forward",
           "linear_geglu_backward", "apply_rotary", "unsupported"]
