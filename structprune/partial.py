"""Prune a model that cannot be captured whole (a detector), in parts.

When neither torch.fx nor torch.export captures the whole model (a detector loops over its
list of images and runs NMS, whose output size depends on the data), :func:`prune_in_parts`
captures what can be captured instead: the largest submodules that capture on their own,
found top-down (a child that does not capture is replaced by its children). Each part is
traced on the inputs it really receives in one forward of the whole model on the example
inputs (recorded with forward pre-hooks), and pruned by a :class:`~structprune.pruner.Pruner`
of its own with the same settings. Everything else (a detector's transform, anchor generator,
RoI pooling, post-processing, NMS) runs as it is.

What keeps this exact:

- a part's inputs and outputs keep their shapes (graph inputs and outputs are frozen, as for
  any captured model), so nothing outside it has to follow. (A part whose output feeds only
  other parts could in principle pass pruned channels on; that is not attempted.)
- a part called several times (a head run once per FPN level) is checked on every call: for
  each pruning step, its pruned output must equal its masked original (the dropped units'
  activations zeroed) on each recorded call's inputs; a call that fails or differs refuses the
  part (it is kept as it was, with the reason).
- a part whose parameters are also held by a module outside it is not a part (its children
  are tried instead), and the assembled model is run once to check that every pruned part is
  called as often as the original part was.

The returned model is a deep copy of the user's model with each pruned part put in place (of
its own class or an ``fx.GraphModule``, as :func:`structprune.prune` returns them); the
original model is never changed. :class:`PartsResult` (``Pruner.parts``; read by
:func:`structprune.report`) lists the parts pruned, those kept and why.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from . import diagnostics
from .errors import (ModelError, NothingPrunedWarning, PlanError, StructpruneWarning,
                     TraceError)
from .modes import eval_mode

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan
    from .pruner import Pruner

#: Largest relative difference between a pruned part and its masked original on a recorded call
#: (float32 kernels sum in another order on the smaller tensors).
ORACLE_TOL = 1e-4

Call = tuple[tuple, dict]


@dataclass
class Part:
    """One submodule captured and pruned on its own.

    Attributes:
        path: its qualified name in the model.
        cls: its class name.
        calls: how many times one forward of the model called it.
        capture: ``"fx"`` or ``"export"``.
        params_before, params_after: its parameter counts.
        returned: what the pruned part is (its own class or a GraphModule) and why.
        oracle_diff: the largest relative difference from the masked original over every step
            and every recorded call (``None`` when nothing was dropped).
        plans: the plan of every step (the oracle's masks; ``plan.graph`` is the part's graph).
    """

    path: str
    cls: str
    calls: int
    capture: str
    params_before: int
    params_after: int
    returned: str = ""
    oracle_diff: Optional[float] = None
    plans: list = field(default_factory=list, repr=False)

    @property
    def pruned(self) -> bool:
        return self.params_after < self.params_before


@dataclass
class PartsResult:
    """How a model was pruned in parts: the parts, what was kept as it was and why.

    Attributes:
        whole_error: the first line of why the whole model could not be captured.
        parts: the captured parts (pruned or, where nothing in them is prunable, not).
        kept: ``(path, class name, reason)`` of every submodule left as it was (no parameters,
            not captured, refused by the oracle, not called, ignored).
    """

    whole_error: str
    parts: list[Part] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line per part and per kept submodule."""
        lines = [f"pruned in parts (the whole model cannot be captured: {self.whole_error})"]
        for p in self.parts:
            what = (f"{p.params_before:,} -> {p.params_after:,} params" if p.pruned
                    else "nothing pruned (its inputs and outputs keep their shapes)")
            lines.append(f"  part '{p.path}' ({p.cls}, {p.capture}, {p.calls} call"
                         f"{'s' if p.calls != 1 else ''}): {what}")
        for path, cls, why in self.kept:
            lines.append(f"  kept '{path}' ({cls}): {why}")
        return "\n".join(lines)


#: The parts results of the models :func:`prune_in_parts` returned (read by ``sp.report``).
_PARTS: "weakref.WeakKeyDictionary[nn.Module, PartsResult]" = weakref.WeakKeyDictionary()


def parts_of(model: nn.Module) -> Optional[PartsResult]:
    """The :class:`PartsResult` of a model that ``sp.prune`` pruned in parts, else None."""
    try:
        return _PARTS.get(model)
    except TypeError:
        return None


# --- recording what each submodule receives ---------------------------------------------------
def _clone(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                           value)


def record_calls(model: nn.Module, args: tuple, kwargs: dict,
                 paths: list[str]) -> dict[str, list[Call]]:
    """Run ``model(*args, **kwargs)`` once (eval mode, no grad) and return, for each of
    ``paths``, the ``(args, kwargs)`` of every call of that submodule, tensors cloned (a later
    in-place op cannot change them). Raises what the forward raises."""
    mods = dict(model.named_modules())
    calls: dict[str, list[Call]] = {p: [] for p in paths}
    handles = []

    def hook(path: str) -> Any:
        def pre(_m: nn.Module, a: tuple, k: dict) -> None:
            calls[path].append(_clone((a, k)))
        return pre

    try:
        for p in paths:
            handles.append(mods[p].register_forward_pre_hook(hook(p), with_kwargs=True))
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _empty(call: Call) -> bool:
    """Whether a call has a tensor with no elements (a head run on zero detections)."""
    return any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in pytree.tree_leaves(call))


def _as_example(module: nn.Module, call: Call) -> Any:
    """One call's ``(args, kwargs)`` as example inputs for ``sp.trace``: a tuple (keywords bound
    to their positions, skipped defaults filled in), or a dict when called by keyword only."""
    args, kwargs = call
    if not kwargs:
        return tuple(args)
    if not args:
        return dict(kwargs)
    sig = inspect.signature(module.forward)
    if any(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD, p.VAR_POSITIONAL)
           for p in sig.parameters.values()):
        raise _NotAPart("called with positional and keyword arguments that cannot be bound "
                        "to positions")
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


# --- finding the parts --------------------------------------------------------------------------
def _num_params(m: nn.Module) -> int:
    return sum(t.numel() for t in m.parameters())


def _shared_outside(model: nn.Module, path: str, module: nn.Module) -> Optional[str]:
    """The first module outside ``path`` that holds a parameter or buffer of ``module``."""
    inside = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    for p, m in model.named_modules():
        if p == path or p.startswith(path + "."):
            continue
        for name, t in list(m.named_parameters(recurse=False)) + list(
                m.named_buffers(recurse=False)):
            if id(t) in inside:
                return f"{p}.{name}"
    return None


def _part_ratio(outer: "Pruner", path: str, module: nn.Module) -> Any:
    """The ratio a part is pruned with: the number, or the outer per-module dict restricted to
    the part (its most specific enclosing key applies to the whole part); None: nothing asked."""
    paths = outer._ratio_paths
    if not paths:
        return outer.config.ratio
    enclosing = [p for p in paths if p == "" or p == path or path.startswith(p + ".")]
    out: dict = {}
    if enclosing:
        out[module] = paths[max(enclosing, key=len)]
    for p, r in paths.items():
        if p.startswith(path + "."):
            out[module.get_submodule(p[len(path) + 1:])] = r
    if not out or all(r == 0 for r in out.values()):
        return None
    return out


@contextlib.contextmanager
def _quiet_nothing_pruned() -> Any:
    """Drop a part's NothingPrunedWarning (one summary follows for the whole model); re-emit
    every other warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not issubclass(w.category, NothingPrunedWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _NotAPart(Exception):
    """A submodule that cannot be a part as it is called (its children are tried)."""


class _Refused(Exception):
    """A part that fails its checks: it is kept as it was, with this reason."""


def _part_pruner_class() -> type:
    from .oracle import masked_output, max_rel_diff
    from .pruner import Pruner

    class PartPruner(Pruner):
        """A Pruner for one part that checks every step on every recorded call."""

        calls: list[Call] = []

        def apply(self, plan: "Plan") -> nn.Module:
            pruned = super().apply(plan)
            if plan.is_empty:
                return pruned
            self.plans.append(plan)
            exact = all(getattr(r, "exact", True) for r in plan.graph.node_rules.values())
            for k, (a, kw) in enumerate(self.calls):
                where = f"call {k + 1} of {len(self.calls)}"
                try:
                    with eval_mode(plan.graph.graph_module), eval_mode(plan.graph.model):
                        want = masked_output(plan.graph, plan,
                                             _as_example(self.original, (a, kw)))
                    with torch.no_grad(), eval_mode(pruned):
                        got = pruned(*a, **kw)
                except Exception as exc:  # the capture does not serve this call
                    raise _Refused(f"the pruned part fails on {where} "
                                   f"({diagnostics.first_line(exc)})") from None
                d = max_rel_diff(got, want)
                if exact and not d <= ORACLE_TOL:
                    raise _Refused(f"on {where} the pruned part differs from its masked "
                                   f"original by {d:.2e}")
                self.oracle_diff = max(self.oracle_diff or 0.0, d)
            return pruned

    return PartPruner


def _part_kwargs(outer: "Pruner", path: str, module: nn.Module) -> Optional[dict]:
    cfg = outer.config
    ratio = _part_ratio(outer, path, module)
    if ratio is None:
        return None
    inside = {id(m) for m in module.modules()}
    return dict(ratio=ratio, importance=cfg.importance,
                ignore=[m for m in cfg.ignore if id(m) in inside], global_=cfg.global_,
                round_to=cfg.round_to, max_ratio=cfg.max_ratio,
                iterative_steps=cfg.iterative_steps, rules=cfg.rules,
                leaf_modules=cfg.leaf_modules, head_ratio=outer.head_ratio,
                head_channels=cfg.head_channels)


def _check_settings(outer: "Pruner") -> None:
    cfg = outer.config
    if cfg.target_macs is not None:
        raise PlanError(f"{type(outer.original).__name__} cannot be captured whole and is pruned "
                        f"in parts, where target_macs (a budget for the whole model) is not "
                        f"supported; use ratio= (per group, as usual)")
    if outer.data is not None:
        raise PlanError(f"{type(outer.original).__name__} cannot be captured whole and is pruned "
                        f"in parts, where data=/loss_fn= (gradients of the whole model's loss) "
                        f"are not supported; compute the gradients yourself (loss.backward()) "
                        f"and use importance='taylor' without data=, or another importance")


def capture_or_prune_in_parts(pruner: "Pruner") -> Optional[nn.Module]:
    """Trace ``pruner``'s model whole; if it cannot be captured (a :class:`TraceError` that is
    not about the inputs), prune it in parts (:func:`prune_in_parts`) and return the result.
    None when the whole model captured (``pruner.graph`` is then built)."""
    with diagnostics.parts_follow():
        try:
            pruner.graph
            return None
        except TraceError as exc:
            whole = exc
    return prune_in_parts(pruner, whole)


def prune_in_parts(pruner: "Pruner", whole: TraceError) -> nn.Module:
    """Prune ``pruner.original`` part by part (see the module docstring) and return the pruned
    copy; ``pruner.parts`` and ``pruner.applied`` say what was pruned, what was kept and why.

    Raises:
        TraceError: ``whole`` again when the model does not run on its example inputs or no
            submodule captures on its own.
        PlanError: a setting that needs the whole model (``target_macs``, ``data=``).
    """
    from .apply_copy import Applied

    model = pruner.original
    name = type(model).__name__
    args, kwargs = pruner._inputs
    frontier = list(model.named_children())
    try:
        calls = record_calls(model, args, kwargs, [p for p, _ in frontier])
    except Exception:
        raise whole from None  # it says which input does not fit
    _check_settings(pruner)
    result = PartsResult(_whole_reason(whole))
    part_pruner = _part_pruner_class()
    ignored = set(pruner._ignore_paths)
    out = copy.deepcopy(model)
    replaced: dict[str, nn.Module] = {}
    while frontier:
        calls.update(record_calls(model, args, kwargs, [p for p, _ in frontier
                                                        if p not in calls]))
        nxt: list[tuple[str, nn.Module]] = []
        for path, m in sorted(frontier, key=lambda pm: -_num_params(pm[1])):
            cls = type(m).__name__
            if _num_params(m) == 0:
                result.kept.append((path, cls, "no parameters: runs as it is"))
                continue
            if not calls.get(path):
                children = list(m.named_children())
                if children:  # a container the forward indexes (a ModuleList): its entries
                    nxt += [(f"{path}.{p}", c) for p, c in children]
                    result.kept.append((path, cls, "not called itself in the forward on the "
                                                   "example inputs; its submodules were tried "
                                                   "instead"))
                else:
                    result.kept.append((path, cls, "not called in the forward on the example "
                                                   "inputs (not pruned)"))
                continue
            if path in ignored:
                result.kept.append((path, cls, "ignored by the user"))
                continue
            kw = _part_kwargs(pruner, path, m)
            if kw is None:
                result.kept.append((path, cls, "no ratio given for it (per-module ratio dict)"))
                continue
            shared = _shared_outside(model, path, m)
            why = f"shares '{shared}' with a module outside it" if shared else None
            if why is None and all(_empty(c) for c in calls[path]):
                why = ("every call on the example inputs gets an empty tensor, which would check "
                       "nothing (give example inputs for which it sees data)")
            if why is None:
                try:
                    why, part, pruned = _prune_part(part_pruner, path, m, calls[path], kw)
                except _Refused as exc:
                    why = f"refused: {exc}"
                    warnings.warn(f"{name}: part '{path}' ({cls}) was not pruned: {exc}",
                                  StructpruneWarning, stacklevel=4)
            if why is None:
                result.parts.append(part)
                if part.pruned:
                    replaced[path] = out.get_submodule(path)
                    _put(out, path, pruned)
                continue
            children = list(m.named_children())
            if children:
                nxt += [(f"{path}.{p}", c) for p, c in children]
                why += "; its submodules were tried instead"
            result.kept.append((path, cls, why))
        frontier = nxt
    if not result.parts:
        raise TraceError(f"{whole}\nNo submodule captures on its own either, so it cannot be "
                         f"pruned in parts.") from whole.__cause__
    _check_called(out, args, kwargs, calls, replaced, result)
    result.parts.sort(key=lambda p: [i for i, (q, _) in enumerate(model.named_modules())
                                     if q == p.path][:1])
    asked = pruner.config.nominal_ratio > 0 or (pruner.head_ratio or 0) > 0
    if not any(p.pruned for p in result.parts):
        if asked:  # an unchanged copy would help no one: the capture error says what to try
            raise TraceError(f"{whole}\nPruning it in parts removed nothing either:\n"
                             + "\n".join(result.summary().splitlines()[1:])) from whole.__cause__
    else:
        pruned_parts = ", ".join(f"{p.path} ({p.capture})" for p in result.parts if p.pruned)
        warnings.warn(f"{name} cannot be captured whole; pruned in parts: {pruned_parts}; "
                      f"{len(result.kept)} submodules kept as they are "
                      f"(sp.report or Pruner.parts says which and why)",
                      StructpruneWarning, stacklevel=4)
    out.train(model.training)
    _PARTS[out] = result
    pruner.parts = result
    pruner.model = out
    pruner.steps_done = pruner.config.iterative_steps
    pruner.applied = Applied(out, True, f"{name} pruned in parts: a copy of the model with "
                                        f"each pruned part put in place")
    return out


def _whole_reason(exc: TraceError) -> str:
    """Why the whole model cannot be captured: torch.fx's and torch.export's one-line reasons
    from the capture error, else its first line."""
    said = [ln.strip() for ln in str(exc).splitlines()
            if ln.strip().startswith(("torch.fx:", "the torch.export fallback"))]
    return "; ".join(said) if said else _first_reason(exc)


def _prune_part(part_pruner: type, path: str, m: nn.Module, calls: list[Call],
                kw: dict) -> tuple[Optional[str], Any, Any]:
    """Capture and prune one part: ``(None, Part, pruned module)``, or ``(why not, None, None)``
    when it cannot be captured. Raises :class:`_Refused` when a step fails its check."""
    try:
        sub = part_pruner(m, _as_example(m, calls[0]), **kw)
        sub.calls, sub.plans, sub.oracle_diff = calls, [], None
        with diagnostics.parts_follow(), diagnostics.quiet_torch():
            sub.graph
    except (TraceError, ModelError, _NotAPart) as exc:
        return f"cannot be captured: {_first_reason(exc)}", None, None
    with _quiet_nothing_pruned():
        pruned = sub.run()
    graph = sub._first_graph
    capture = graph.graph_module.meta.get("structprune_capture", "fx") if graph else "fx"
    part = Part(path, type(m).__name__, len(calls), capture, _num_params(m),
                _num_params(pruned), sub.applied.reason if sub.applied is not None else
                "nothing was dropped", sub.oracle_diff, list(sub.plans))
    return None, part, pruned


def _first_reason(exc: BaseException) -> str:
    """The first line of a structprune error (its message starts with what failed)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = lines[0]
    if text.endswith(" at") and len(lines) > 1:  # "... failed in module 'x' at" + the frame
        text = f"{text} {lines[1]}"
    return text if len(text) <= 240 else text[:237] + "..."


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _check_called(out: nn.Module, args: tuple, kwargs: dict, calls: dict[str, list[Call]],
                  replaced: dict[str, nn.Module], result: PartsResult) -> None:
    """Run the assembled model once: every pruned part must be called as often as the original
    part was (a caller holding the old module by another reference would bypass it); such a
    part is put back as it was."""
    if not replaced:
        return
    got = record_calls(out, args, kwargs, list(replaced))
    for path, old in replaced.items():
        if len(got[path]) != len(calls[path]):
            _put(out, path, old)
            part = next(p for p in result.parts if p.path == path)
            result.parts.remove(part)
            result.kept.append((path, part.cls, f"refused: the pruned model called it "
                                                f"{len(got[path])} times, the original "
                                                f"{len(calls[path])} (the model reaches it "
                                                f"other than through its attribute)"))


def forward_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one eager forward (``torch.utils.flop_counter``, FLOPs / 2; ops
    it does not know, such as torchvision's ``roi_align`` and ``nms``, count 0)."""
    from .graph.capture import normalize_inputs

    return call_macs(model, normalize_inputs(example_inputs))


def call_macs(module: nn.Module, call: Call) -> int:
    """Multiply-accumulates of ``module(*args, **kwargs)`` for one ``(args, kwargs)``."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = call
    with FlopCounterMode(display=False) as fc, torch.no_grad(), eval_mode(module):
        module(*args, **kwargs)
    return int(fc.get_total_flops()) // 2


def parts_macs(model: nn.Module, pruned: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """MACs of one forward of ``model`` and of its pruned-in-parts copy ``pruned``, counted so
    that both see the same data: ``before`` is the whole eager forward; ``after`` is ``before``
    less what each pruned part saves on the inputs the original part received. (Run on its own,
    the pruned model's data-dependent stages, such as a mask head run once per detection, see
    other detections and would count other work.)"""
    from .graph.capture import normalize_inputs

    info = parts_of(pruned)
    if info is None:
        raise PlanError("parts_macs takes a model that sp.prune pruned in parts")
    args, kwargs = normalize_inputs(example_inputs)
    before = call_macs(model, (args, kwargs))
    paths = [p.path for p in info.parts if p.pruned]
    calls = record_calls(model, args, kwargs, paths)
    saved = 0
    for path in paths:
        old, new = model.get_submodule(path), pruned.get_submodule(path)
        for call in calls[path]:
            saved += call_macs(old, call) - call_macs(new, call)
    return before, before - saved
