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
                  f"bias_k / add_zero_attn / kdim, vdim / is_causal without a mask, which "
                  f"mha_forward does not cover)")
        for k, shape in enumerate(ctx.item_shapes(ctx.node) or []):
            for d in range(len(shape) if shape is not None else 0):
                yield Freeze(ctx.item(k, d), reason)
        yield from ctx.freeze(ctx.node, reason)
        for a in ctx.node.all_input_nodes:
            yield from ctx.freeze(a, reason)


def mha_mask(mask: torch.Tensor, like: torch.Tensor, padding: bool = False) -> torch.Tensor:
    """An ``nn.MultiheadAttention`` mask as an additive one that broadcasts against the scores
    ``(B, H, L, S)``, in the dtype of ``like`` (the queries, ``(B, H, L, D)``): a bool mask's
    ``True`` (not allowed) becomes ``-inf``, a float mask is added as it is. A
    ``key_padding_mask`` (``padding``) ``(B, S)`` (or ``(S,)``) becomes ``(B, 1, 1, S)``; a 3-D
    ``attn_mask`` ``(B*H, L, S)`` (or ``(H, L, S)``) becomes ``(B, H, L, S)``; a 2-D one stays.
    Called at run time (neither the dtype nor the rank is known while tracing); reads no module
    attribute, so the number of heads follows the pruned queries."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=like.dtype, device=mask.device).masked_fill_(
            mask, float("-inf"))
    else:
        mask = mask.to(like.dtype)
    if padding:  # (B, S), or (S,) unbatched
        return mask.reshape(-1, 1, 1, mask.shape[-1])
    if mask.dim() == 3:
        return mask.reshape(like.shape[0], -1, mask.shape[1], mask.shape[2])
    return mask


@register(mha_mask)
class MhaMaskRule(OpRule):
    """:func:`mha_mask`: a padding mask's batch and key dims, a 2-D mask's dims, and a 3-D
    mask's ``(L, S)`` map to the output's; row ``b*H + h`` of a 3-D mask belongs to head ``h``
    (the output's batch dim stays whole). ``like`` is read for its dtype and batch size only, so
    its dims stay free."""

    freezes_unmentioned = False

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        mask, so = ctx.arg(0, "mask"), ctx.out_shape
        sm = ctx.shape(mask)
        if sm is None or so is None:
            return
        if bool(ctx.value(ctx.arg(2, "padding", False))):
            if len(sm) == 2:
                yield Couple(ctx.space(mask, 0), ctx.out(0))
            yield Couple(ctx.space(mask, -1), ctx.out(-1))
        elif len(sm) == 3:
            b, h = so[0], so[1]
            yield Couple(ctx.out(1), ctx.space(mask, 0), np.tile(np.arange(h), b),
                         np.arange(b * h))
            yield Couple(ctx.space(mask, 1), ctx.out(2))
            yield Couple(ctx.space(mask, 2), ctx.out(3))
            yield Freeze(ctx.out(0), "a per-head attention mask's batch dim is read as "
                                     "rows b*H + h")
        else:
            yield from ctx.identity(mask, ctx.node)


def _record(fn: Callable[..., Any], like: Any, *args: Any) -> Any:
    """A call of ``fn`` recorded in the graph being traced (``like`` is one of its proxies):
    ``fn`` branches on what only the run knows (a mask's dtype and rank)."""
    return like.tracer.create_proxy("call_function", fn, args, {})


def mha_forward(m: nn.MultiheadAttention, getp: Any, query: Any, key: Any, value: Any,
                key_padding_mask: Optional[Any] = None, need_weights: bool = True,
                attn_mask: Optional[Any] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Any:
    """``nn.MultiheadAttention.forward`` written with traceable functional ops, for batched
    (``batch_first`` or not) and unbatched inputs.

    Masks as the module reads them: ``key_padding_mask`` ``(B, S)`` and ``attn_mask`` ``(L, S)``
    or ``(B*H, L, S)``, bool (``True`` = not allowed) or additive float, made additive by
    :func:`mha_mask` at run time; a 3-D mask is viewed as ``(B, H, L, S)``, so its head
    rows are pruned with their heads (or, a model input being whole, keep the heads whole).
    ``is_causal`` is the module's hint: with no ``key_padding_mask`` and ``need_weights=False``
    the given ``attn_mask`` is not read and a causal mask is used, otherwise ``attn_mask`` is.
    ``need_weights`` returns the softmaxed scores, averaged over the heads
    (``average_attn_weights``; a mean over heads keeps them whole where it is read) or per head.

    ``getp(name)`` returns the graph value of the module's parameter ``name``. Returns
    ``NotImplemented`` for configurations it does not cover (``bias_k``, ``add_zero_attn``,
    separate key/value dims, ``is_causal`` without a mask, which the module refuses); the
    module is then a frozen leaf.
    """
    if m.bias_k is not None or m.add_zero_attn or not m._qkv_same_embed_dim:
        return NotImplemented
    if not isinstance(need_weights, bool) or not isinstance(average_attn_weights, bool) \
            or not isinstance(is_causal, bool):
        return NotImplemented
    if is_causal and attn_mask is None:
        return NotImplemented  # the module raises
    # Batched (B, L, E) or (L, B, E), or unbatched (L, E): the rank is not known while tracing,
    # so every input is reshaped to (B, L, E) (B = 1 when unbatched) and the outputs back.
    batch_shape = query.shape[:-2] if m.batch_first else query.shape[1:-1]  # (B,) or ()
    sizes = query.shape[:-1]
    if m.batch_first:
        query, key, value = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (query, key, value))
    else:
        query, key, value = (t.reshape(t.shape[0], -1, t.shape[-1]).transpose(0, 1)
                             for t in (query, key, value))
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
    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None
    if attn_mask is not None and not causal:
        mask = _record(mha_mask, q, attn_mask, q)
    if key_padding_mask is not None:
        pad = _record(mha_mask, q, key_padding_mask, q, True)
        mask = pad if mask is None else mask + pad
    dropout = m.dropout if m.training else 0.0
    if need_weights:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)  # [B, H, T, S]
        attn = F.dropout(attn, p=dropout, training=m.training)
        out = torch.matmul(attn, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=causal)
        attn = None
    out = out.transpose(1, 2).reshape(bsz, tgt, heads * head_dim)
    out = m.out_proj(out)
    if not m.batch_first:
        out = out.transpose(0, 1)
    out = out.reshape(sizes + out.shape[-1:])
    if attn is not None:
        if average_attn_weights:
            attn = attn.mean(dim=1)
        attn = attn.reshape(batch_shape + attn.shape[1:])
    return out, attn
