"""The pruned model as the user's own class, for a model captured by ``torch.export``.

An exported graph does not call the model's modules, so the pruned graph itself cannot be the
model. But the graph keeps the model's parameter and buffer names: the model is copied with
each sliced tensor in place of its old one, and the copy is the result when its own forward
computes what the pruned graph computes (on the example inputs and on random ones like them).

A model that builds itself from a ``config`` (Hugging Face) is built again, on the meta
device, from a copy of the config that gives the pruned shapes (:mod:`config_fit`), and gets
the copy's tensors: every size the modules derive from the config (heads, head size, KV
groups) is then the pruned one, and ``save_pretrained`` / ``from_pretrained`` round-trip.
Otherwise (other models, or no config that builds the pruned sizes) the pruned graph is
returned, and the reason says why; the graph calls the model's BatchNorm and Dropout modules
(``graph/export_capture.py``), so it fine-tunes in ``.train()`` as the original would.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .config_fit import build_from_config, config_of, fit_config
from .own_forward import _outputs_differ, _random_like
from .slicing import copy_sliced_roots


def _tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(root.named_parameters(remove_duplicate=False))
    out.update(root.named_buffers(remove_duplicate=False))
    return out


def own_class_after_export(model: nn.Module, pruned: fx.GraphModule,
                           example_inputs: tuple[tuple, dict]) -> tuple[Optional[nn.Module], str]:
    """``(copy of model, reason)`` when the model's own forward runs the pruned graph, else
    ``(None, why not)``."""
    if config_of(model) is None:
        return None, ("its graph does not run the model's own modules, so the pruned graph is "
                      "returned")
    mine, theirs = _tensors(model), _tensors(pruned)
    sliced = {}
    for q, new in theirs.items():
        old = mine.get(q)
        if old is None:
            if q.rpartition(".")[2].startswith(("_tensor_constant", "c_", "_lifted")):
                return None, (f"the graph slices '{q}', a tensor the model's forward creates, "
                              f"so the pruned graph is returned")
            continue
        if old.shape != new.shape:
            sliced[q] = (old, new)
    if not sliced:
        return None, "nothing was sliced"
    copied = copy_sliced_roots([model], sliced)[0]
    result, why = _rebuilt(model, copied)
    if result is None:
        return None, why
    kind = (f"{type(model).__name__} is built again from a copy of its config with the pruned "
            f"sizes")
    result.train(model.training)
    for inputs in (example_inputs, _random_like(example_inputs)):
        problem = _outputs_differ(result, pruned, inputs)
        if problem:
            return None, (f"the model's own forward {problem} on the pruned modules (captured "
                          f"by torch.export), so the pruned graph is returned")
    return result, f"{kind}, so an object of that class is returned"


def _rebuilt(model: nn.Module, copied: nn.Module) -> tuple[Optional[nn.Module], str]:
    """``type(model)`` built from the fitted config, holding ``copied``'s tensors."""
    shapes = {k: tuple(t.shape) for k, t in _tensors(copied).items()}
    cfg, why = fit_config(model, shapes)
    if cfg is None:
        return None, (f"no copy of its config builds the pruned sizes ({why}), so the pruned "
                      f"graph is returned")
    try:
        new = build_from_config(type(model), cfg, meta=True)
        new.load_state_dict(copied.state_dict(keep_vars=True), strict=True, assign=True)
    except Exception as exc:  # a class that does not load its own state
        return None, (f"{type(model).__name__}(config) does not take the pruned tensors "
                      f"({type(exc).__name__}), so the pruned graph is returned")
    # what the state dict does not hold: non-persistent buffers, tensor attributes
    for name, m in new.named_modules():
        src = copied.get_submodule(name)
        for k, b in list(m._buffers.items()):
            if b is not None and b.is_meta and isinstance(src._buffers.get(k), torch.Tensor):
                m._buffers[k] = src._buffers[k]
        for k, v in list(vars(m).items()):
            if isinstance(v, torch.Tensor) and v.is_meta and isinstance(getattr(src, k, None),
                                                                        torch.Tensor):
                setattr(m, k, getattr(src, k))
    left = [k for k, t in _tensors(new).items() if t.is_meta]
    left += [f"{n}.{k}" for n, m in new.named_modules() for k, v in vars(m).items()
             if isinstance(v, torch.Tensor) and v.is_meta]
    if left:
        return None, (f"{type(model).__name__}(config) holds '{left[0]}', which the model "
                      f"does not, so the pruned graph is returned")
    for k, v in vars(copied).items():  # generation_config, name_or_path, ...
        if not k.startswith("_") and k not in vars(new) and k != "config":
            setattr(new, k, v)
    gen = getattr(copied, "generation_config", None)
    if gen is not None:
        new.generation_config = copy.deepcopy(gen)
    tie = getattr(new, "tie_weights", None)
    if callable(tie):
        tie()
    return new, ""
