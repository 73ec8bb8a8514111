"""The torch backend: the reference math (fastbert/reference.py) on ATen's fused CPU kernels
where they measure faster, and on fastbert's own fp32 CPU kernels (fastbert._cpu: attention,
add+LayerNorm) where those serve, behind the same entry points as the Triton and CUDA backends
(see fastbert/ops.py). Dropout masks come from a torch.Generator seeded by the call's seed (on
fastbert._cpu's attention kernel, and add_layer_norm's on CPU in every dtype, from a hash of
it), so backward regenerates forward's mask."""
from __future__ import annotations

import torch

from fastbert import cpu_attention, cpu_layer_norm, cpu_train, reference, window as sliding


class TorchBackend:
    """The reference math as a backend; dropout masks come from a torch.Generator seeded by `seed`."""

    @staticmethod
    def unsupported(op, **kw):
        return None

    @staticmethod
    def _keep(seed, shape, p, device):
        return reference.dropout_keep_mask(seed, shape, p, device) if p > 0.0 else None

    @staticmethod
    def _cpu_flash(q, dropout_p):
        """ATen's fused CPU attention (2-3x the reference's speed) serves CPU inputs without
        dropout; float64 stays on the reference, so gradcheck exercises the explicit formulas."""
        return (q.device.type == "cpu" and dropout_p == 0.0 and q.dtype != torch.float64
                and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"))

    @staticmethod
    def _additive_mask(q, k, mask, causal, window):
        """(B, 1, Sq|1, Sk) float mask (0 or -inf) for ATen, and (B, 1, Sq) rows that see no key."""
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        visible = reference.attention_visible(mask, causal, b, sq, sk, q.device, window)
        if visible is None:
            return None, None
        additive = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
        return additive.masked_fill_(~visible, float("-inf")), ~visible.any(-1)

    @staticmethod
    def _band(q, k, mask, band, block):
        """The blocked layout of a sliding window finite on both sides (fastbert/window.py)."""
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        return sliding.cached_band(mask, (b, sq, sk, band, block, q.dtype, q.device), lambda: (
            sliding.make_band(b, sq, sk, *band, q.dtype, q.device, key_padding_mask=mask,
                              block=block)))

    @staticmethod
    def _visible(q, k, mask, causal, window):
        return reference.attention_visible(mask, causal, q.shape[0], q.shape[1], k.shape[1],
                                           q.device, window)

    @staticmethod
    def attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, window=(-1, -1)):
        if cpu_attention.serves(q, k, v):  # fastbert's CPU kernel, forward and backward in fp32
            return cpu_attention.padded_forward(q, k, v, mask, causal, scale, window, dropout_p,
                                                seed)
        band = sliding.bounded(window, causal)
        if band is not None:  # a local layer: O(S * window)
            block = sliding.forward_block(q, dropout_p)
            return sliding.forward(q, k, v, TorchBackend._band(q, k, mask, band, block),
                                   dropout_p, scale, seed)
        if TorchBackend._cpu_flash(q, dropout_p):
            additive, empty = TorchBackend._additive_mask(q, k, mask, causal, window)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=additive, scale=scale)
            out = out.transpose(1, 2)  # (B, Sq, H, D)
            lse = lse.contiguous()  # (B, H, Sq)
            if empty is not None:  # the contract: zeros and lse = +inf where no key is visible
                out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
                lse = lse.masked_fill(empty, float("inf"))
            return out.contiguous(), lse
        keep = TorchBackend._keep(seed, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]),
                                   dropout_p, q.device)
        return reference.attention_forward(q, k, v, mask, causal, dropout_p, scale, keep,
                                           visible=TorchBackend._visible(q, k, mask, causal,
                                                                         window))

    @staticmethod
    def attention_backward(dout, q, k, v, out, lse, mask, causal, dropout_p, scale, seed,
                           deterministic, window=(-1, -1)):
        if cpu_attention.serves_backward(q, k, v):  # as forward chose
            return cpu_attention.padded_backward(dout, q, k, v, out, lse, mask, causal, scale,
                                                 window, dropout_p, seed)
        band = sliding.bounded(window, causal)
        if band is not None:
            return sliding.backward(dout, q, k, v, out, lse,
                                    TorchBackend._band(q, k, mask, band, sliding.BACKWARD_BLOCK),
                                    dropout_p, scale, seed)
        if TorchBackend._cpu_flash(q, dropout_p):
            additive, _ = TorchBackend._additive_mask(q, k, mask, causal, window)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                *(t.transpose(1, 2) for t in (dout, q, k, v, out)), lse, 0.0, False,
                attn_mask=additive, scale=scale)
            return tuple(g.transpose(1, 2).contiguous() for g in grads)
        keep = TorchBackend._keep(seed, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]),
                                   dropout_p, q.device)
        return reference.attention_backward(dout, q, k, v, out, lse, mask, causal, dropout_p,
                                            scale, keep,
                                            visible=TorchBackend._visible(q, k, mask, causal,
                                                                          window))

    # LayerNorm and GELU run on torch's fused ATen kernels here (the same math as reference.py,
    # which the tests hold them to): the reference's elementwise chains are many times slower.
    # Casts that are no-ops in fp32 are skipped, not called (see reference.py's docstring).
    @staticmethod
    def _norm_keep(seed, x, p):
        """add_layer_norm's keep mask: on CPU the hash fastbert's kernel draws (every dtype alike,
        kernel or not), else reference.dropout_keep_mask's."""
        if cpu_layer_norm.masks_here(x):
            return cpu_layer_norm.keep_mask(seed, x.shape, p)
        return reference.dropout_keep_mask(seed, x.shape, p, x.device)

    @staticmethod
    def add_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed, store_sum=False,
                               out_dtype=None):
        """store_sum: the pre-norm sum as a fourth output. y and the sum in out_dtype (default
        x's); residual may differ from x in dtype. fp32 on fastbert's CPU kernel where it serves
        (fastbert/cpu_layer_norm.py)."""
        if cpu_layer_norm.serves(x, residual, out_dtype):
            return cpu_layer_norm.add_layer_norm_forward(x, residual, weight, bias, eps,
                                                         dropout_p, seed, store_sum)
        out_dtype = out_dtype or x.dtype
        keep = TorchBackend._norm_keep(seed, x, dropout_p) if dropout_p > 0.0 else None
        # fp64 where any of x, residual and y is (reference.acc_dtype), else fp32: a mixed call
        # under autocast keeps an fp64 residual's precision (inline: a call per norm counts)
        f64 = torch.float64
        acc = f64 if (x.dtype == f64 or out_dtype == f64 or (residual is not None and
                                                             residual.dtype == f64)) \
            else torch.float32
        s = reference.prenorm_sum(x, residual, dropout_p, keep, acc)  # (rows, C)
        if weight.dtype != acc or bias.dtype != acc:
            weight, bias = weight.to(acc), bias.to(acc)
        y, mean, rstd = torch.native_layer_norm(s, s.shape[-1:], weight, bias, eps)
        y = y if y.dtype == out_dtype else y.to(out_dtype)
        if not store_sum:
            return y, mean.view(-1), rstd.view(-1)
        # an output never aliases an input (x itself without residual and dropout)
        s = s.to(out_dtype, copy=s is x)
        return y, mean.view(-1), rstd.view(-1), s

    @staticmethod
    def add_layer_norm_backward(dy, x, residual, weight, mean, rstd, dropout_p, seed, dsum=None):
        if cpu_layer_norm.serves(x, residual, dy.dtype, backward=True):
            return cpu_layer_norm.add_layer_norm_backward(dy, x, residual, weight, mean, rstd,
                                                          dropout_p, seed, dsum)
        keep = TorchBackend._norm_keep(seed, x, dropout_p) if dropout_p > 0.0 else None
        f64 = torch.float64  # as in the forward
        acc = f64 if (x.dtype == f64 or dy.dtype == f64 or (residual is not None and
                                                            residual.dtype == f64)) \
            else torch.float32
        s = reference.prenorm_sum(x, residual, dropout_p, keep, acc)
        w = weight if weight.dtype == acc else weight.to(acc)
        ds, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            dy if dy.dtype == acc else dy.to(acc), s, s.shape[-1:], mean.view(-1, 1),
            rstd.view(-1, 1), w, w, [True, True, True])
        if dsum is not None:  # the gradient reaching the sum as an output (return_residual)
            ds = ds + (dsum if dsum.dtype == acc else dsum.to(acc))
        dx = ds * keep / (1.0 - dropout_p) if dropout_p > 0.0 else ds  # float * bool
        dres = ds.to(residual.dtype, copy=True) if residual is not None else None
        if dweight.dtype != weight.dtype:
            dweight, dbias = dweight.to(weight.dtype), dbias.to(weight.dtype)
        return dx if dx.dtype == x.dtype else dx.to(x.dtype), dres, dweight, dbias

    @staticmethod
    def linear_bias_gelu_forward(x, weight, bias, approximate):
        # (M, N); oneDNN's GEMM from cpu_train.MIN_ROWS rows (MKL's runs at half its rate on AMD)
        pre = torch.nn.functional.linear(x, weight, bias) if x.shape[0] < cpu_train.MIN_ROWS \
            else cpu_train.gemm(x, weight, bias)
        if pre.dtype == torch.float32 or pre.dtype == torch.float64:  # reference.acc_dtype
            act = torch.nn.functional.gelu(pre, approximate=approximate)
            return act, pre
        act = torch.nn.functional.gelu(pre.to(torch.float32), approximate=approximate)
        return act.to(x.dtype), pre

    @staticmethod
    def linear_bias_gelu_backward(dout, x, weight, pre, approximate):
        acc = torch.float64 if pre.dtype == torch.float64 else torch.float32
        if pre.dtype == acc and dout.dtype == acc and x.dtype == acc:
            dpre = torch.ops.aten.gelu_backward(dout, pre, approximate=approximate)
            return (reference.linear_backward if x.shape[0] < cpu_train.MIN_ROWS
                    else cpu_train.linear_backward)(dpre, x, weight)
        dpre = torch.ops.aten.gelu_backward(dout.to(acc), pre.to(acc), approximate=approximate)
        return (reference.linear_backward if x.shape[0] < cpu_train.MIN_ROWS
                else cpu_train.linear_backward)(dpre.to(x.dtype), x, weight)

    @staticmethod
    def linear_geglu_forward(x, weight, bias, approximate):
        pre = torch.nn.functional.linear(x, weight, bias) if x.shape[0] < cpu_train.MIN_ROWS \
            else cpu_train.gemm(x, weight, bias)  # (M, 2N), as linear_bias_gelu_forward's
        act, gate = pre.to(reference.acc_dtype(pre)).chunk(2, dim=-1)
        out = torch.nn.functional.gelu(act, approximate=approximate).mul_(gate)
        return out.to(x.dtype), pre

    @staticmethod
    def linear_geglu_backward(dout, x, weight, pre, approximate):
        acc = reference.acc_dtype(pre)
        act, gate = pre.to(acc).chunk(2, dim=-1)
        g = dout.to(acc)
        if torch._C._are_functorch_transforms_active():  # torch.func.grad: no out= ops there
            dpre = torch.cat([torch.ops.aten.gelu_backward(g * gate, act, approximate=approximate),
                              g * torch.nn.functional.gelu(act, approximate=approximate)], -1)
            return (reference.linear_backward if x.shape[0] < cpu_train.MIN_ROWS
                    else cpu_train.linear_backward)(dpre.to(x.dtype), x, weight)
        # both halves written into one (M, 2N) gradient, not concatenated after
        dpre = torch.empty(pre.shape, dtype=acc, device=pre.device)
        dact, dgate = dpre.chunk(2, dim=-1)
        torch.ops.aten.gelu_backward.grad_input(g * gate, act, approximate=approximate,
                                                grad_input=dact)
        torch.mul(g, torch.nn.functional.gelu(act, approximate=approximate), out=dgate)
        return (reference.linear_backward if x.shape[0] < cpu_train.MIN_ROWS
                else cpu_train.linear_backward)(dpre.to(x.dtype), x, weight)

    @staticmethod
    def apply_rotary(x, cos, sin, positions, interleaved, conjugate):
        if torch._C._are_functorch_transforms_active():  # torch.func.grad: no out= ops there
            return reference.rotary_forward(x, cos, sin, positions, interleaved, conjugate)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        reference.rotary_into(out, x, cos, sin, positions, interleaved, conjugate)
        return out

