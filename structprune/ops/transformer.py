"""``torch.nn``'s transformer modules: ``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and
``nn.Transformer``, traced through functional equivalents of their forwards.

Each equivalent computes the modules' plain math (the fused fast path and the nested-tensor
conversion are implementation details the module picks at run time): its submodules are called
as they are, so the attention (:func:`~structprune.ops.attention.mha_forward`: heads with q, k
and v together, masks), the feed-forward linears (neurons), the norms and dropouts get their own
rules. ``d_model`` runs through LayerNorms and residual adds: it stays whole under the exact
rules (``prune_normalized_dims=True`` opts into the approximate LayerNorm rule). A call an
equivalent does not cover (an argument it does not know, a module the user made a leaf) stays
one frozen ``call_module`` node with the reason.

One difference from the module's own output: in eval mode under ``torch.no_grad``, an
``nn.TransformerEncoder`` with ``enable_nested_tensor=True`` and a ``src_key_padding_mask``
returns zeros at the padded positions (its nested-tensor fast path); the equivalent computes
them as every other position (as the module does with gradients enabled). The positions that
are not padded agree.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn

from ..rules import CoupleContext, OpRule, Record, register


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[dict]:
    """The arguments of a call of ``fn`` (an ``nn`` forward, ``self`` bound) by name, defaults
    applied; None if they do not bind."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _flag(v: Any) -> Optional[bool]:
    """A bool argument (None read as False, as the modules do after detection); None if it is
    not a plain value (a traced one)."""
    if v is None:
        return False
    return v if isinstance(v, bool) else None


def encoder_layer_forward(m: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None,
                          src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    """``nn.TransformerEncoderLayer.forward``'s plain math (pre- or post-norm)."""
    def sa(x: Any) -> Any:
        x = m.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                        need_weights=False, is_causal=is_causal)[0]
        return m.dropout1(x)

    def ff(x: Any) -> Any:
        return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    return _residual_blocks(src, [(m.norm1, sa), (m.norm2, ff)], m.norm_first)


def decoder_layer_forward(m: nn.TransformerDecoderLayer, tgt: Any, memory: Any,
                          tgt_mask: Any = None, memory_mask: Any = None,
                          tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                          tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Any:
    """``nn.TransformerDecoderLayer.forward``'s plain math (pre- or post-norm)."""
    def sa(x: Any) -> Any:
        x = m.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                        is_causal=tgt_is_causal, need_weights=False)[0]
        return m.dropout1(x)

    def mha(x: Any) -> Any:
        x = m.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                             key_padding_mask=memory_key_padding_mask,
                             is_causal=memory_is_causal, need_weights=False)[0]
        return m.dropout2(x)

    def ff(x: Any) -> Any:
        return m.dropout3(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    return _residual_blocks(tgt, [(m.norm1, sa), (m.norm2, mha), (m.norm3, ff)], m.norm_first)


def _residual_blocks(x: Any, blocks: list, norm_first: bool) -> Any:
    """``x + f(norm(x))`` per block (pre-norm), or ``norm(x + f(x))`` (post-norm)."""
    for norm, f in blocks:
        x = x + f(norm(x)) if norm_first else norm(x + f(x))
    return x


def encoder_forward(m: nn.TransformerEncoder, src: Any, mask: Any = None,
                    src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    """``nn.TransformerEncoder.forward``'s plain math: the layers in turn, then ``norm``."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, is_causal=is_causal,
                    src_key_padding_mask=src_key_padding_mask)
    return m.norm(out) if m.norm is not None else out


def decoder_forward(m: nn.TransformerDecoder, tgt: Any, memory: Any, tgt_mask: Any = None,
                    memory_mask: Any = None, tgt_key_padding_mask: Any = None,
                    memory_key_padding_mask: Any = None, tgt_is_causal: bool = False,
                    memory_is_causal: bool = False) -> Any:
    """``nn.TransformerDecoder.forward``'s plain math: the layers in turn, then ``norm``."""
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
    return m.norm(out) if m.norm is not None else out


def transformer_forward(m: nn.Transformer, src: Any, tgt: Any, src_mask: Any = None,
                        tgt_mask: Any = None, memory_mask: Any = None,
                        src_key_padding_mask: Any = None, tgt_key_padding_mask: Any = None,
                        memory_key_padding_mask: Any = None, src_is_causal: bool = False,
                        tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Any:
    """``nn.Transformer.forward``: the encoder on ``src``, the decoder on ``tgt`` and its
    output (the size checks the module makes are the shape records')."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                       is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


_EQUIVALENTS: dict[type, Callable[..., Any]] = {
    nn.TransformerEncoderLayer: encoder_layer_forward,
    nn.TransformerDecoderLayer: decoder_layer_forward,
    nn.TransformerEncoder: encoder_forward,
    nn.TransformerDecoder: decoder_forward,
    nn.Transformer: transformer_forward,
}

#: the bool arguments of each forward (``None``: detected by the module from the mask's values;
#: the mask is then used either way, which is what ``False`` computes)
_FLAGS = ("is_causal", "tgt_is_causal", "memory_is_causal", "src_is_causal")


@register(*_EQUIVALENTS)
class TransformerRule(OpRule):
    """``nn.Transformer`` and its encoder/decoder (layers): traced through the functional
    equivalents of this module (see the module docstring); a call they do not cover, or a
    module the user made a leaf, stays one frozen ``call_module`` node with the reason."""

    decomposes = True

    def trace_through(self, module: nn.Module, getp: Callable[[str], Any], *args: Any,
                      **kwargs: Any) -> Any:
        # the class itself, or a subclass the registry gave this rule (it computes the same)
        cls = next((c for c in type(module).__mro__ if c in _EQUIVALENTS), None)
        if cls is None:
            return NotImplemented
        bound = _bind(module.forward, args, kwargs)
        if bound is None:
            return NotImplemented
        for k in _FLAGS:
            if k in bound:
                flag = _flag(bound[k])
                if flag is None:
                    return NotImplemented
                bound[k] = flag
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and \
                not callable(module.activation):
            return NotImplemented
        return _EQUIVALENTS[cls](module, **bound)

    def couple(self, ctx: CoupleContext) -> Iterator[Record]:
        reason = (f"{type(ctx.module).__name__} '{ctx.module_path}' is kept whole (a leaf "
                  f"module, or a call its traced equivalent does not cover)")
        yield from ctx.freeze_call(reason)
