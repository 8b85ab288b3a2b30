"""Capture a model as an fx graph whose leaves are the modules we have rules for.

``capture`` runs ``torch.fx`` symbolic tracing with a :class:`~structprune.graph.trace.Tracer`.
Models that symbolic tracing cannot capture (they branch on shapes or turn sizes into ints) are
captured with ``torch.export`` on the example inputs instead
(:func:`~structprune.graph.export_capture.capture_export`). When neither works, the error says
where and what to try. :func:`normalize_inputs` and :func:`check_model` check what is captured.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .. import diagnostics
from ..errors import ModelError, TraceError
from ..rules import OpRule, RuleKey
from .export_capture import capture_export
from .modules import _drop_unused, analysis_module
from .trace import Tracer

ExampleInputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    """Turn a tensor, tuple/list or dict of example inputs into ``(args, kwargs)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword "
                     f"inputs, got {type(example_inputs).__name__}")


def check_model(model: nn.Module) -> None:
    """Refuse models we cannot analyse faithfully, naming the first offending tensor."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected an nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            path, _, attr = name.rpartition(".")
            owner = type(model.get_submodule(path)).__name__ if path else type(model).__name__
            raise ModelError(f"module '{path or '(top level)'}' ({owner}) has an uninitialised "
                             f"lazy parameter '{attr}' (a size given as -1 or a Lazy* layer): "
                             f"there is no weight to score or slice yet. Run the model once on "
                             f"an example input first (model(*example_inputs)), then prune.")
        if t.is_meta:
            raise ModelError(f"parameter '{name}' is on the meta device: there are no weights to "
                             f"score or slice. Materialise the model first (model.to_empty("
                             f"device='cpu') and load its state_dict).")
        if t.is_floating_point() and t.dtype in _BACK_TO:
            raise ModelError(f"parameter '{name}' is {t.dtype}: structprune analyses models in "
                             f"float32/float64 (scores and the oracle lose precision in "
                             f"{t.dtype}, and many CPU kernels lack it). Prune model.float() "
                             f"and convert the pruned model back with {_BACK_TO[t.dtype]} "
                             f"afterwards.")


    if has_forward_hooks(model):
        raise ModelError(f"{type(model).__name__} has forward hooks on the model itself: they run "
                         f"outside the forward that structprune traces. Remove them before "
                         f"pruning (and add them to the pruned model).")
    from torch.nn.utils import parametrize

    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            raise ModelError(f"module '{name}' ({type(m).__name__}) is parametrized (weight_norm, "
                             f"spectral_norm, ...): its weight is computed at every call. Call "
                             f"torch.nn.utils.parametrize.remove_parametrizations(module, "
                             f"'weight') first.")
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                raise ModelError(f"module '{name}' ({type(m).__name__}) holds '{k}', a tensor "
                                 f"computed by a hook (old-style torch.nn.utils.weight_norm?). "
                                 f"Remove the reparametrisation first "
                                 f"(torch.nn.utils.remove_weight_norm).")


def has_forward_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward (pre-)hooks of its own, structprune's argument guard aside."""
    from .inputs import _guard_hook

    hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    return any(getattr(h, "func", None) is not _guard_hook for h in hooks)


# How to convert a pruned float32 model back to the dtype the user started from.
_BACK_TO = {torch.float16: ".half()", torch.bfloat16: ".to(torch.bfloat16)"}


def capture(model: nn.Module, rules: dict[RuleKey, OpRule], leaf_modules: Iterable[Any] = (),
            concrete_args: Optional[dict] = None,
            example_inputs: Optional[tuple[tuple, dict]] = None) -> fx.GraphModule:
    """Symbolically trace ``model``; if that fails, capture it with ``torch.export`` on
    ``example_inputs`` (``(args, kwargs)``).

    Raises:
        TraceError: neither works (or fx fails and there are no example inputs). The message is
            short: the module and source line that failed, one line from each of fx and export,
            and what to try, including the largest submodules that do capture on their own.
            When the model does not even run on the example inputs, it says which module
            rejected which input shape instead. ``STRUCTPRUNE_DEBUG=1`` adds torch's full texts
            and keeps the chained exceptions.
    """
    tracer = Tracer(rules, leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many types; all mean "could not capture"
        fx_exc: BaseException = exc
    else:
        _drop_unused(graph)
        return analysis_module(tracer.root, graph, type(model).__name__)
    debug = diagnostics.debug_enabled()
    if example_inputs is None:
        message = diagnostics.capture_failure(model, fx_exc, tracer._sp_failed_at, None, [])
        raise TraceError(message) from (fx_exc if debug else None)
    try:
        with diagnostics.quiet_torch():
            return capture_export(model, *example_inputs)
    except Exception as exc:  # export raises many types too
        export_exc: BaseException = exc
    run = diagnostics.run_eagerly(model, *example_inputs)
    if run.error is not None:  # the inputs do not fit: that is the first thing to fix
        raise TraceError(_eager_mismatch(model, example_inputs, run)) from (
            run.error if debug else None)

    def capture_one(m: nn.Module, args: tuple, kwargs: dict) -> str:
        try:
            Tracer(rules, leaf_modules).trace(m)
            return "fx"
        except Exception:  # fall back as capture() does
            capture_export(m, args, kwargs)
            return "export"

    candidates = diagnostics.capturable_submodules(model, run, capture_one)
    message = diagnostics.capture_failure(model, fx_exc, tracer._sp_failed_at, export_exc,
                                          candidates)
    raise TraceError(message) from (fx_exc if debug else None)


def _eager_mismatch(model: nn.Module, example_inputs: tuple[tuple, dict],
                    run: diagnostics.EagerRun) -> str:
    """The one-line message for a model that fails when run on its example inputs."""
    import inspect

    args, kwargs = example_inputs
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    names += [f"arg{i}" for i in range(len(names), len(args))]
    given = {**dict(zip(names, args)), **kwargs}
    path = run.failed_module or ""
    module = model.get_submodule(path) if path else model
    got = run.inputs.get(path, ((), {}))[0]
    assert run.error is not None
    return diagnostics.shape_mismatch(type(model).__name__, given, path, module,
                                      got[0] if len(got) == 1 else got, run.error)
