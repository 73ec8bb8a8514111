"""The pre-norm encoder layer beside model.py's post-norm BertLayer: ModernBERT's (issue 20).

    h = x + Dropout(Attn(RoPE(LN_a(x) W_qkv)) W_o)            # LN_a is the identity in layer 0
    y = h + W_out(Dropout(GELU(LN_f(h) W_a) * (LN_f(h) W_g)))  # W_in = [W_a; W_g]

as transformers' ModernBertEncoderLayer computes it, on fastbert's ops (apply_rotary,
attention_varlen / attention with a sliding window, linear_geglu, bias-free add_layer_norm).
Layer i is global when i % global_attn_every_n_layers == 0 (or as config.json's layer_types say),
else local: query i sees keys j with |i - j| <= local_attention // 2. The layer type also picks
the RoPE theta. BertModel computes the rotary angles of every token once per forward
(`rotary_tables`) and hands each layer the table of its theta.

Parameter names are BertLayer's (qkv, attn_out, attn_norm, ffn_in, ffn_out, ffn_norm);
fastbert/family.py maps them to ModernBERT's (attn.Wqkv, attn.Wo, attn_norm, mlp.Wi, mlp.Wo,
mlp_norm) on save and load.

Shapes: N token rows ((T,) packed or (B, S) padded), nh heads, hd head dim.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbert
from fastbert import varlen
from fastbert.config import BertConfig
from fastbert.model import linear, plain
from fastbert.padding import PackedBatch

_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_kinds(config: BertConfig) -> List[Tuple[int, float]]:
    """(window, rope theta) per layer: window -1 for a global layer, local_attention // 2 for a
    local one. Raises for what fastbert cannot serve (a RoPE type other than the default, a causal
    ModernBERT)."""
    if config.is_decoder:
        raise ValueError("BertConfig: is_decoder expected False for model_type 'modernbert' (its "
                         "layers attend both ways; fastbert serves no causal ModernBERT)")
    n = config.num_hidden_layers
    types = config.setting("layer_types", None)
    if types is None:
        every = config.setting("global_attn_every_n_layers", 1)
        types = ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    if len(types) != n or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"BertConfig: layer_types expected {n} entries of {_LAYER_TYPES}, got "
                         f"{types!r}")
    rope = config.setting("rope_parameters", None) or {}
    thetas = {"full_attention": config.setting("global_rope_theta", 10000.0),
              "sliding_attention": config.setting("local_rope_theta", 10000.0)}
    for kind in _LAYER_TYPES:
        params = rope.get(kind) or {}
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"BertConfig: rope_type {params['rope_type']!r} for {kind} layers "
                             f"is not served by fastbert's own classes (the default RoPE only)")
        thetas[kind] = float(params.get("rope_theta", thetas[kind]))
    if config.extra.get("rope_scaling"):
        raise ValueError(f"BertConfig: rope_scaling {config.extra['rope_scaling']!r} is not "
                         f"served by fastbert's own classes (the default RoPE only)")
    half = config.setting("local_attention", 0) // 2
    return [(-1 if t == "full_attention" else half, thetas[t]) for t in types]


def init_weights(module: nn.Module, config: BertConfig, role: str) -> None:
    """transformers' ModernBERT initialisation of a Linear or Embedding: a normal of the role's
    std ("in": initializer_range; "out", a projection back into the residual stream:
    initializer_range / sqrt(2 * layers); "final_out", a classifier: hidden_size ** -0.5),
    truncated at initializer_cutoff_factor stds; biases zero."""
    r = config.initializer_range
    std = {"in": r, "out": r / math.sqrt(2.0 * config.num_hidden_layers),
           "final_out": config.hidden_size ** -0.5}[role]
    cutoff = config.setting("initializer_cutoff_factor", 2.0)
    cutoff = 3.0 if cutoff is None else cutoff  # as transformers reads a null
    nn.init.trunc_normal_(module.weight, std=std, a=-cutoff * std, b=cutoff * std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_encoder(model: nn.Module, config: BertConfig) -> None:
    """A pre-norm BertModel's weights as transformers initialises ModernBertModel's (the word
    embeddings' padding row included; LayerNorms one, biases zero as BERT's)."""
    init_weights(model.embeddings.word_embeddings, config, "in")
    for layer in model.encoder.layer:
        for name, role in (("qkv", "in"), ("ffn_in", "in"), ("attn_out", "out"),
                           ("ffn_out", "out")):
            init_weights(getattr(layer, name), config, role)


def rotary_tables(layers, positions: torch.Tensor, dtype: torch.dtype
                  ) -> Dict[float, Tuple[torch.Tensor, torch.Tensor]]:
    """theta -> (cos, sin) (N, hd / 2) at each token row's position (positions: N ints) for the
    thetas of these PreNormLayers, as transformers' ModernBertRotaryEmbedding computes them (fp32
    angles, then the model's dtype)."""
    positions = positions.reshape(-1).float()
    tables = {}
    for layer in layers:
        theta, d = layer.rope_theta, layer.head_dim
        if theta not in tables:
            inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float,
                                                     device=positions.device) / d))
            angles = positions[:, None] * inv_freq  # (N, hd / 2)
            tables[theta] = (angles.cos().to(dtype), angles.sin().to(dtype))
    return tables


def _norm(module: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """module(x): fastbert.add_layer_norm for a plain nn.LayerNorm; None is the identity."""
    if module is None:
        return x
    if plain(module, nn.LayerNorm):
        return fastbert.add_layer_norm(x, None, module.weight, module.bias, module.eps)
    return module(x)


def _add_norm(module: nn.Module, delta: torch.Tensor, x: torch.Tensor, dropout_p: float
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(module(s), s) with s = x + dropout(delta), the residual stream after a sublayer: one
    fastbert.add_layer_norm pass (its pre-norm form) for a plain nn.LayerNorm."""
    if plain(module, nn.LayerNorm):
        return fastbert.add_layer_norm(delta, x, module.weight, module.bias, module.eps,
                                       dropout_p=dropout_p, return_residual=True)
    s = x + F.dropout(delta, dropout_p, dropout_p > 0.0)
    return module(s), s


class PreNormLayer(nn.Module):
    """One ModernBERT encoder layer (module docstring). index: the layer's place in the
    encoder, which fixes its kind (global or local) and whether it has attn_norm."""

    deterministic = False  # what layers pickled before deterministic_flash_attn was read have

    def __init__(self, config: BertConfig, index: int):
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.window, self.rope_theta = layer_kinds(config)[index]
        self.attn_dropout = config.attention_probs_dropout_prob  # probabilities and output
        self.hidden_dropout = config.hidden_dropout_prob  # ModernBERT's mlp_dropout
        self.gelu_approximate = config.gelu_approximate
        # attention backward without atomics (flash-attn's deterministic=, as transformers passes)
        self.deterministic = bool(config.setting("deterministic_flash_attn", False))
        norm_bias = config.setting("norm_bias", True)
        attention_bias, mlp_bias = (config.setting(name, True)
                                    for name in ("attention_bias", "mlp_bias"))
        # the embeddings' LayerNorm is layer 0's input norm
        self.attn_norm = nn.LayerNorm(c, eps=eps, bias=norm_bias) if index else None
        self.qkv = nn.Linear(c, 3 * c, bias=attention_bias)  # rows: query, key, value
        self.attn_out = nn.Linear(c, c, bias=attention_bias)
        self.ffn_norm = nn.LayerNorm(c, eps=eps, bias=norm_bias)
        self.ffn_in = nn.Linear(c, 2 * config.intermediate_size, bias=mlp_bias)  # [W_a; W_g]
        self.ffn_out = nn.Linear(config.intermediate_size, c, bias=mlp_bias)

    def forward(self, x, attention_mask=None, kv_cache: Optional[dict] = None,
                packed: Optional[PackedBatch] = None, rotary: Optional[dict] = None):
        """x (T, C) packed real tokens with `packed`, or (B, S, C) padded with attention_mask;
        rotary: BertModel's rotary_tables for these rows."""
        if kv_cache is not None:
            raise ValueError("PreNormLayer: no KV cache (ModernBERT is an encoder, not a decoder)")
        training = self.training
        attn_p = self.attn_dropout if training else 0.0
        rows, nh, hd = x.shape[:-1], self.n_head, self.head_dim
        qkv = linear(_norm(self.attn_norm, x), self.qkv).view(*rows, 3, nh, hd)
        cos, sin = rotary[self.rope_theta]  # (N, hd / 2)
        # queries and keys turned in one call, as one sequence of N rows of 2 * nh heads
        # split and unbind, not slices: their backward joins the gradients (a slice's fills a
        # zero tensor of the whole and adds into it)
        qk, v = qkv.split([2, 1], dim=-3)
        v = v.squeeze(-3)
        window = (self.window, self.window)
        turn = {}
        if packed is not None and varlen.rotary_in_kernel(qkv, attn_p, window=window):
            # the Triton kernel turns q and k as it loads them; row t at cos[t]
            turn = dict(rotary=(cos, sin), rotary_seqlen_offsets=packed.cu_seqlens[:-1])
        else:
            qk = fastbert.apply_rotary(qk.reshape(1, -1, 2 * nh, hd), cos, sin)
        q, k = qk.view(*rows, 2, nh, hd).unbind(-3)
        if packed is not None:
            y = fastbert.attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens,
                                          packed.max_seqlen, packed.max_seqlen,
                                          window_size=window, dropout_p=attn_p,
                                          deterministic=self.deterministic, **turn)
        else:
            y = fastbert.attention(q, k, v, attention_mask, window_size=window, dropout_p=attn_p,
                                   deterministic=self.deterministic)
        # the attention's residual add and ffn_norm in one pass
        h, x = _add_norm(self.ffn_norm, linear(y.flatten(-2), self.attn_out), x, attn_p)
        f = self._geglu(h)
        return x + linear(F.dropout(f, self.hidden_dropout if training else 0.0, training),
                          self.ffn_out)

    def _geglu(self, h: torch.Tensor) -> torch.Tensor:
        """gelu(a) * g with a, g = ffn_in(h).chunk(2): one fastbert.linear_geglu for a plain
        nn.Linear; anything else (a LoRA wrapper, a hooked module) is called as a module."""
        if plain(self.ffn_in):
            return fastbert.linear_geglu(h, self.ffn_in.weight, self.ffn_in.bias,
                                         approximate=self.gelu_approximate)
        a, g = self.ffn_in(h).chunk(2, dim=-1)
        return F.gelu(a, approximate=self.gelu_approximate) * g
