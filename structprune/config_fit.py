"""A copy of a model's ``config`` that builds the pruned model's shapes.

Hugging Face models (and any model whose class builds itself from a ``config`` object, with
``type(model)(config)``) read their sizes from the config: ``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``n_embd``, ``d_ff``...
:func:`fit_config` finds the config that builds exactly the pruned model's parameter shapes, by
building candidates on the meta device (no memory, no weights) and comparing their shapes: no
list of attribute names per model family. Starting from a copy of the original config, it
changes one integer attribute at a time, to a value the pruned shapes imply (a dim of the old
size ``v`` that became ``n`` suggests ``n``; a dim of size ``k * v`` that became ``m``, with
``v * m / (k * v)`` whole, suggests ``m / k``), keeping the change that leaves the fewest
mismatched tensors, until none is left. A pruned model that no config describes (layers pruned
to different widths, which a config with one size per kind cannot say) gets a reason instead.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn


def config_of(model: nn.Module) -> Optional[Any]:
    """The model's config object, when its class builds itself from one (Hugging Face's
    ``PreTrainedModel`` and lookalikes: a ``config`` attribute with ``to_dict``)."""
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and callable(getattr(cfg, "to_dict", None)) else None


def build_from_config(cls: type, config: Any, meta: bool) -> nn.Module:
    """``cls(config)``, on the meta device when ``meta`` (shapes only, nothing allocated)."""
    if meta:
        with torch.device("meta"):
            return cls(config)
    return cls(config)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    out = {k: tuple(t.shape) for k, t in module.named_parameters(remove_duplicate=False)}
    out.update({k: tuple(t.shape) for k, t in module.named_buffers(remove_duplicate=False)})
    return out


def _int_attrs(config: Any) -> dict[str, int]:
    """The config's integer attributes (sizes, counts), booleans excluded."""
    out = {}
    for k, v in config.to_dict().items():
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and hasattr(config, k):
            out[k] = v
    # attributes a config computes (Llama's head_dim) are not always in to_dict
    for k in ("head_dim",):
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.setdefault(k, v)
    return out


def _pin_derived(cfg: Any, model: nn.Module, same: Any) -> list[str]:
    """Write into ``cfg`` the sizes the model's modules derive from it (an attention's
    ``head_dim`` = hidden size / heads) under their own names, where the config does not hold
    them and setting them builds the same model (``same(cfg)``): pruning heads then keeps the
    head size. Returns the names written."""
    seen: dict[str, set] = {}
    for m in model.modules():
        for k, v in vars(m).items():
            if isinstance(v, int) and not isinstance(v, bool) and v > 1 and not k.startswith("_"):
                seen.setdefault(k, set()).add(v)
    have = cfg.to_dict()
    pinned = []
    for k, vals in sorted(seen.items()):
        if len(vals) != 1 or k in have or hasattr(cfg, k):
            continue
        setattr(cfg, k, next(iter(vals)))
        if same(cfg):
            pinned.append(k)
        else:
            delattr(cfg, k)
    return pinned


def _none_attrs(config: Any) -> list[str]:
    return [k for k, v in config.to_dict().items() if v is None and hasattr(config, k)
            and not k.startswith("_")]


def fit_config(model: nn.Module, pruned: dict[str, tuple[int, ...]],
               max_steps: int = 16) -> tuple[Optional[Any], str]:
    """``(config, "")``: a copy of ``model.config`` from which ``type(model)`` builds tensors of
    exactly the shapes ``pruned`` lists (``{qualified name: shape}``, every parameter and buffer
    of the pruned model); or ``(None, reason)``."""
    cfg0 = config_of(model)
    if cfg0 is None:
        return None, "the model has no config to build it from"
    cls = type(model)
    original = _shapes(model)
    if set(original) != set(pruned):
        return None, "the pruned model's tensors are not the original's"
    changes: list[tuple[int, int]] = []  # (old size, new size) of every pruned dim
    for k, old in original.items():
        for a, b in zip(old, pruned[k]):
            if a != b:
                changes.append((a, b))
    if not changes:
        return copy.deepcopy(cfg0), ""
    changes = sorted(set(changes))

    def mismatch(cfg: Any) -> Optional[int]:
        try:
            built = _shapes(build_from_config(cls, cfg, meta=True))
        except Exception:  # a config the class rejects (heads not dividing the width...)
            return None
        if set(built) != set(pruned):
            return None
        return sum(built[k] != pruned[k] for k in pruned)

    cfg = copy.deepcopy(cfg0)
    best = mismatch(cfg)
    if best is None:
        return None, f"{cls.__name__}(config) does not build on the meta device"
    pinned = _pin_derived(cfg, model, lambda c: mismatch(c) == best)
    seen: set = set()
    closest = [best, cfg]

    def moves(cfg: Any, best: int) -> list[tuple[int, Any]]:
        """Every one-attribute change that leaves fewer tensors mismatched, best first."""
        tries = [(name, _candidates(v, changes)) for name, v in _int_attrs(cfg).items()]
        # a size left to a default (GPT-2's n_inner=None: 4 * n_embd) may be any new size
        tries += [(name, sorted({b for _, b in changes})) for name in _none_attrs(cfg)]
        out = []
        for name, cands in tries:
            for cand in cands:
                trial = copy.deepcopy(cfg)
                try:
                    setattr(trial, name, cand)
                except Exception:  # a read-only or validated attribute
                    continue
                key = tuple(sorted((k, repr(v)) for k, v in trial.to_dict().items()))
                if key in seen:
                    continue
                seen.add(key)
                m = mismatch(trial)
                if m is not None and m < best:
                    out.append((m, trial))
        return sorted(out, key=lambda t: t[0])

    def search(cfg: Any, best: int, depth: int) -> Optional[Any]:
        # depth first, best move first: a change that fits the most tensors can be a dead end
        # (4 heads of 8 where 2 of 16 were kept: the rotary table then no longer fits)
        if best < closest[0]:
            closest[:] = [best, cfg]
        if best == 0:
            return cfg
        if depth == 0:
            return None
        for m, trial in moves(cfg, best):
            found = search(trial, m, depth - 1)
            if found is not None:
                return found
        return None

    found = search(cfg, best, max_steps)
    if found is not None:
        cfg, best = found, 0
    else:
        best, cfg = closest
    if best == 0:
        for name in pinned:  # pins the fitted config does not need
            trial = copy.deepcopy(cfg)
            delattr(trial, name)
            if mismatch(trial) == 0:
                cfg = trial
        return cfg, ""
    built = _shapes(build_from_config(cls, cfg, meta=True))
    k = next(k for k in pruned if built[k] != pruned[k])
    return None, (f"no value per attribute of {type(cfg0).__name__} builds the pruned shapes: "
                  f"{best} tensors differ, e.g. '{k}' is {pruned[k]} where the closest config "
                  f"builds {built[k]}")


def _candidates(v: int, changes: list[tuple[int, int]]) -> list[int]:
    """Values the pruned dims suggest for an attribute of value ``v``."""
    out = set()
    for old, new in changes:
        if old == v:
            out.add(new)
        elif old % v == 0 and (v * new) % old == 0:
            out.add(v * new // old)
    out.discard(v)
    return sorted(c for c in out if c > 0)
