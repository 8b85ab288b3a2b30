"""Attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

Heads are pruned whole. ``nn.MultiheadAttention`` is traced through :func:`mha_forward`, a
functional equivalent built from ``F.linear``, a reshape to ``(B, T, H, D)`` and
``F.scaled_dot_product_attention``, so its heads are ordinary units of the graph (the reshape rule
ties each head's ``D`` rows of the q/k/v projections and ``D`` columns of ``out_proj``) and the
masked-activation oracle can check them. Variants it does not cover (``bias_k``, ``add_zero_attn``,
separate k/v dims) stay a frozen leaf. The tracer learns this from :class:`MultiheadAttentionRule`
(``decomposes``), not from a special case.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..rules import Couple, CoupleContext, Freeze, OpRule, Record, Space, head_dim_of, register


@register(F.scaled_dot_product_attention)
class SDPARule(OpRule):
    """``sdpa(q, k, v)``: batch and head dims shared by q, k, v and out; v's last dim is out's.

    q/k's feature dim sets the softmax scale and the key positions are softmaxed over, so both
    stay whole (a head is removed through its batch-like head dim instead). With ``is_causal``
    or an ``attn_mask`` the query positions stay whole too (the mask is aligned by position);
    with grouped-query attention (fewer key/value heads) a key/value head is one unit with the
    query heads that read it.
    """

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
        sq, sk, sv, so = ctx.shape(q), ctx.shape(k), ctx.shape(v), ctx.out_shape
        if None in (sq, sk, sv, so):
            return
        nb = len(so) - 2
        for t, st in ((q, sq), (k, sk), (v, sv)):
            shift = len(st) - 2 - nb
            for d in range(nb):
                if d + shift >= 0 and st[d + shift] == so[d]:
                    yield Couple(ctx.space(t, d + shift), ctx.out(d))
        if nb >= 1 and sq[-3] != sk[-3] and sk[-3] == sv[-3] and sq[-3] % sk[-3] == 0:
            # enable_gqa: query head h reads key/value head h // g; a key/value head goes with
            # its g query heads (and out's, coupled to q's above).
            g = sq[-3] // sk[-3]
            for t in (k, v):
                yield Couple(ctx.space(t, -3), ctx.space(q, -3), np.repeat(np.arange(sk[-3]), g),
                             np.arange(sq[-3]))
        mask = ctx.arg(3, "attn_mask")
        sm = ctx.shape(mask) if isinstance(mask, fx.Node) else None
        if sm is not None:
            # A mask or additive bias broadcasts to (..., H, L, S): its batch and head dims are
            # the output's (T5's position bias has one row per head); its position dims stay.
            for d in range(nb):
                dm = len(sm) - len(so) + d
                if dm >= 0 and sm[dm] == so[d] and so[d] != 1:
                    yield Couple(ctx.space(mask, dm), ctx.out(d))
        if bool(ctx.value(ctx.arg(5, "is_causal", False))) or mask is not None:
            # A causal or explicit mask is aligned by query position: those stay whole.
            reason = "the attention mask is aligned by query position"
            yield Freeze(ctx.space(q, -2), reason)
            yield Freeze(ctx.out(-2), reason)
        else:
            yield Couple(ctx.space(q, -2), ctx.out(-2))
        yield Couple(ctx.space(v, -1), ctx.out(-1))

    def head_dims(self, node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> list[Space]:
        return head_dim_of(list(node.args[:3]), shapes)

    def macs(self, mctx: Any) -> int:
        q, k, v = mctx.node.args[:3]
        sq, sk, sv = mctx.shape(q), mctx.shape(k), mctx.shape(v)
        if None in (sq, sk, sv):
            return 0
        return math.prod(sq[:-1]) * sk[-2] * (sq[-1] + sv[-1])


@register(nn.MultiheadAttention)
class MultiheadAttentionRule(OpRule):
    """``nn.MultiheadAttention``: traced through :func:`mha_forward`, so its heads are units of the
    graph (the linears, reshapes and attention ops there have their own rules).

    A call :func:`mha_forward` does not cover, or a module the user made a leaf, stays one
    ``call_module`` node, and everything it touches is frozen, with the reason.
    """

    decomposes = True

    def trace_through(self, module: nn.Module, getp: Callable[[str], Any], *args: Any,
                      **kwargs: Any) -> Any:
        assert isinstance(module, nn.MultiheadAttention)
        return mha_forward(module, getp, *args, **kwargs)

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        reason = (f"nn.MultiheadAttention '{ctx.module_path}' is kept whole (a leaf module, or "
                  f"bias_k / add_zero_attn / kdim, vdim / masks, which mha_forward does not cover)")
        for k, shape in enumerate(ctx.item_shapes(ctx.node) or []):
            for d in range(len(shape) if shape is not None else 0):
                yield Freeze(ctx.item(k, d), reason)
        yield from ctx.freeze(ctx.node, reason)
        for a in ctx.node.all_input_nodes:
            yield from ctx.freeze(a, reason)


def mha_forward(m: nn.MultiheadAttention, getp: Any, query: Any, key: Any, value: Any,
                key_padding_mask: Optional[Any] = None, need_weights: bool = True,
                attn_mask: Optional[Any] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Any:
    """``nn.MultiheadAttention.forward`` written with traceable functional ops.

    ``getp(name)`` returns the graph value of the module's parameter ``name``. Returns
    ``NotImplemented`` for configurations it does not cover; the module is then a frozen leaf.
    """
    if m.bias_k is not None or m.add_zero_attn or not m._qkv_same_embed_dim:
        return NotImplemented
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        return NotImplemented
    if not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    heads, head_dim = m.num_heads, m.head_dim
    wq, wk, wv = getp("in_proj_weight").chunk(3)
    has_bias = m.in_proj_bias is not None
    bq, bk, bv = getp("in_proj_bias").chunk(3) if has_bias else (None, None, None)
    q = F.linear(query, wq, bq)  # [B, T, E]
    k = F.linear(key, wk, bk)  # [B, S, E]
    v = F.linear(value, wv, bv)
    bsz, tgt = query.shape[0], query.shape[1]
    src = key.shape[1]
    q = q.reshape(bsz, tgt, heads, head_dim).transpose(1, 2)  # [B, H, T, D]
    k = k.reshape(bsz, src, heads, head_dim).transpose(1, 2)
    v = v.reshape(bsz, src, heads, head_dim).transpose(1, 2)
    dropout = m.dropout if m.training else 0.0
    if need_weights:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
        attn = torch.softmax(scores, dim=-1)  # [B, H, T, S]
        attn = F.dropout(attn, p=dropout, training=m.training)
        out = torch.matmul(attn, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        attn = None
    out = out.transpose(1, 2).reshape(bsz, tgt, heads * head_dim)
    out = m.out_proj(out)
    if not m.batch_first:
        out = out.transpose(0, 1)
    if attn is not None and average_attn_weights:
        attn = attn.mean(dim=1)
    return out, attn
