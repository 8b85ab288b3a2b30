"""The :class:`Pruner`: score, allocate, plan and apply, once or over several steps.

``sp.prune`` and ``sp.prune_`` are thin wrappers around it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import allocate, importance as importance_mod
from .apply_copy import Applied, apply_plan_copy
from .apply_in_place import Snapshot, apply_plan_, held_parameters, literal_sizes_error
from .errors import NothingPrunedWarning, PlanError, StructpruneWarning
from .graph.depgraph import DependencyGraph, resolve_ignore, trace
from .graph.capture import ExampleInputs, check_model, normalize_inputs
from .importance.base import scoring_pass
from .scratch import scratch_space
from .plan import Plan, count_macs, count_params
from .rules import Space


RatioSpec = Union[float, Mapping[Any, float]]


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much; validated on construction."""

    ratio: Any = 0.5
    importance: Any = "l2"
    ignore: tuple = ()
    global_: bool = False
    target_macs: Optional[float] = None
    round_to: Optional[int] = None
    max_ratio: Optional[float] = None
    iterative_steps: int = 1
    rules: Optional[dict] = None
    leaf_modules: tuple = field(default=())
    head_channels: bool = False

    def __post_init__(self) -> None:
        ratios = list(self.ratio.values()) if isinstance(self.ratio, Mapping) else [self.ratio]
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
                raise PlanError(f"ratio must be a number in [0, 1) (the fraction of units to "
                                f"remove per group) or a {{module: ratio}} dict of them, got "
                                f"{r!r}")
        if isinstance(self.ratio, Mapping) and (self.global_ or self.target_macs is not None):
            raise PlanError("a per-module ratio dict works with the uniform allocator; global_ "
                            "and target_macs rank or budget the whole model with one number")
        if self.target_macs is not None and not (0.0 < float(self.target_macs) <= 1.0):
            raise PlanError(f"target_macs must be in (0, 1] (the fraction of MACs to keep), got "
                            f"{self.target_macs!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise PlanError(f"round_to must be a positive int, got {self.round_to!r}")
        if not isinstance(self.iterative_steps, int) or self.iterative_steps < 1:
            raise PlanError(f"iterative_steps must be an int >= 1, got {self.iterative_steps!r}")
        if self.max_ratio is not None and not (0.0 < self.max_ratio <= 1.0):
            raise PlanError(f"max_ratio must be in (0, 1], got {self.max_ratio!r}")

    @property
    def nominal_ratio(self) -> float:
        """The ratio asked for: the number, or the largest of a per-module dict."""
        if isinstance(self.ratio, Mapping):
            return max((float(r) for r in self.ratio.values()), default=0.0)
        return float(self.ratio)


class Pruner:
    """Stateful structured pruner for one-shot and iterative schedules.

    Call tree::

        run()  +-- step() x iterative_steps
                     +-- plan()    trace -> score every group -> allocate -> Plan
                     +-- apply()   a pruned copy: the model's own class when its forward runs
                                   on the smaller modules, else a rewritten fx.GraphModule
        step_()    plan() and slice the model itself (what :func:`prune_` runs)

    Args:
        model: the model to prune; ``plan``/``apply``/``step``/``run`` never modify it
            (``apply`` works on a copy), ``step_`` prunes it in place.
        example_inputs: a tensor, tuple or dict the model runs on.
        ratio: fraction of each group's units to *remove*, in ``[0, 1)``, or a dict
            ``{module: ratio}``: a group takes the ratio of the most specific listed module
            that contains it (``{model: 0.3, model.layer4: 0.7}``) and groups under no listed
            module are not pruned. (default: ``0.5``)
        importance: a name (``"l2"``, ``"l1"``, ``"random"``, ``"bn_scale"``, ``"taylor"``,
            ``"hessian"``, ``"fpgm"``, ``"lamp"``) or an Importance. (default: ``"l2"``)
        ignore: modules whose output dims must stay (e.g. ``[model.fc]``).
        global_: rank units across groups instead of per group. (default: False)
        target_macs: the fraction of MACs to *keep* (e.g. ``0.5``); replaces ``ratio``.
        round_to: keep channel counts multiples of this (e.g. 8).
        max_ratio: the most any one group may lose (default: 1.0 uniform, 0.9 global); a
            group always keeps at least one unit.
        iterative_steps: prune in this many steps, re-scoring between them. (default: 1)
        data, loss_fn: calibration batches and a loss for gradient importances (``taylor``,
            ``hessian``): before each scoring the gradients of ``loss_fn(model(x), y)`` are
            accumulated over ``data`` (an iterable of ``(x, y)``; ``x`` a tensor or a tuple of
            inputs), in eval mode, and the model's own ``.grad`` are restored afterwards.
        head_ratio: the fraction of attention heads to remove (groups whose units are heads,
            see :meth:`DependencyGraph.head_groups`), instead of ``ratio``.
        head_channels: prune the channels inside attention heads (the same ones in every head:
            GAT's per-head channels) instead of whole heads (see :func:`structprune.trace`).
        prune_normalized_dims: also prune dims that LayerNorm normalises (transformer residual
            streams), which cannot be exact; the pruner then measures the output deviation
            from the masked original (``Pruner.deviation``) instead of guaranteeing equality.
        rules: extra op rules for this model; leaf_modules: modules not to trace into.

    Example:
        >>> import torch, torch.nn as nn, structprune as sp
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> pruner = sp.Pruner(m, torch.randn(1, 3, 8, 8), ratio=0.5)
        >>> plan = pruner.plan()
        >>> pruner.apply(plan)[0].out_channels
        4
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs,
                 ratio: Optional[RatioSpec] = None, importance: Any = "l2",
                 ignore: Iterable[nn.Module] = (), global_: bool = False,
                 target_macs: Optional[float] = None, round_to: Optional[int] = None,
                 max_ratio: Optional[float] = None, iterative_steps: int = 1,
                 rules: Optional[dict] = None, leaf_modules: Iterable[Any] = (),
                 data: Optional[Iterable[Any]] = None, loss_fn: Optional[Callable] = None,
                 prune_normalized_dims: bool = False, head_ratio: Optional[float] = None,
                 head_channels: bool = False) -> None:
        check_model(model)
        if ratio is not None and target_macs is not None:
            warnings.warn(f"both ratio={ratio!r} and target_macs={target_macs!r} given: "
                          f"target_macs decides how much is pruned and ratio is ignored",
                          StructpruneWarning, stacklevel=3)
        if ratio is None:
            ratio = 0.5
        ratio_paths: dict[str, float] = {}
        if isinstance(ratio, Mapping):
            ratio_paths = _ratio_paths(model, ratio)
            ratio = dict(ratio_paths)
        if prune_normalized_dims:
            from .ops.norm import normalized_dims_rules

            rules = {**normalized_dims_rules(), **(rules or {})}
        self.config = PruneConfig(ratio, importance, tuple(ignore), global_, target_macs,
                                  round_to, max_ratio, iterative_steps, rules, tuple(leaf_modules),
                                  head_channels)
        self.importance = importance_mod.resolve(importance)
        self._ratio_paths = ratio_paths
        if head_ratio is not None:
            PruneConfig(ratio=head_ratio)  # validates it like ratio
            if global_ or target_macs is not None:
                raise PlanError("head_ratio works with the uniform allocator (not with global_ "
                                "or target_macs)")
        self.head_ratio = head_ratio
        self.data, self.loss_fn = data, loss_fn
        self._check_gradient_source()
        self.example_inputs = example_inputs
        self._inputs = normalize_inputs(example_inputs)
        self.original = model
        self.model = model
        self.steps_done = 0
        self._graph: Optional[DependencyGraph] = None
        self._ignore_paths = resolve_ignore(model, self.config.ignore)
        self.base_macs: Optional[int] = None
        self._orig_sizes: dict = {}
        self._first_graph: Optional[DependencyGraph] = None
        self._warned_mode = False
        #: Parameter elements in the groups asked to shrink (set by the first :meth:`plan`).
        self.targeted_params: Optional[int] = None
        #: How the last :meth:`apply` returned its model (own class or graph) and why.
        self.applied: Optional[Applied] = None
        #: Largest relative deviation of the pruned output from the masked original, measured
        #: after each step when an approximate rule (``prune_normalized_dims``) was used.
        self.deviation: Optional[float] = None
        #: Where the model could not be captured whole and :meth:`run` pruned it in parts: the
        #: parts pruned, the submodules kept and why (:class:`structprune.partial.PartsResult`).
        self.parts: Any = None

    def _check_gradient_source(self) -> None:
        needs = getattr(self.importance, "needs_grad", False)
        if self.data is not None and self.loss_fn is None:
            raise PlanError("data= needs loss_fn= (called as loss_fn(model(x), y) per batch)")
        if needs and self.data is None and self.config.iterative_steps > 1:
            raise PlanError(f"importance {self.config.importance!r} with iterative_steps="
                            f"{self.config.iterative_steps} needs data= and loss_fn=: every step "
                            f"re-scores a freshly pruned model, which has no gradients of its own")

    # --- the graph of the current model ---------------------------------------------------------
    @property
    def graph(self) -> DependencyGraph:
        if self._graph is None:
            mods = dict(self.model.named_modules())
            ignore = [mods[p] for p in self._ignore_paths if p in mods]
            self._graph = trace(self.model, self.example_inputs, rules=self.config.rules,
                                leaf_modules=self.config.leaf_modules, ignore=ignore,
                                head_channels=self.config.head_channels)
            if not self._orig_sizes:
                self._orig_sizes = {s: n for s, n in self._graph.table.size.items() if s.is_param}
        return self._graph

    def _group_ratio(self, g: Any) -> float:
        """The asked ratio of group ``g``: ``head_ratio`` for head groups, else the number, or
        the most specific module's in a dict."""
        if self.head_ratio is not None and g.id in self.graph.head_groups():
            return float(self.head_ratio)
        if not self._ratio_paths:
            return float(self.config.ratio)
        mods = [m.module for m in g.params if m.role == "out"] or [m.module for m in g.params]
        best, best_len = 0.0, -1
        for path, r in self._ratio_paths.items():
            if any(path == "" or mod == path or mod.startswith(path + ".") for mod in mods):
                if len(path) > best_len:
                    best, best_len = r, len(path)
        return best

    def _step_fraction(self, k: int) -> float:
        """Cumulative fraction pruned after step k of n, as a fraction of what remains before it."""
        n, r = self.config.iterative_steps, self.config.nominal_ratio
        before, after = 1 - r * (k - 1) / n, 1 - r * k / n
        return 1 - after / before

    def _step_ratios(self, k: int) -> dict[int, float]:
        """Per-group ratios for step k so that after step k each group keeps exactly what one-shot
        pruning at ``ratio * k / n`` of its original width would (no rounding drift)."""
        out = {}
        for g in self.graph.groups():
            cum = self._group_ratio(g) * k / self.config.iterative_steps
            sizes = [self._orig_sizes[m.space] for m in g.params if m.space in self._orig_sizes]
            cur = [self.graph.space_size(m.space) for m in g.params if m.space in self._orig_sizes]
            if not sizes:
                continue
            orig_units = round(g.num_units * sizes[0] / cur[0])
            keep = orig_units - int(cum * orig_units + 1e-9)
            out[g.id] = max(0.0, 1 - keep / g.num_units)
        return out

    def scores(self) -> dict[int, torch.Tensor]:
        """One score per unit for every group the importance can score."""
        out = {}
        with _CalibrationGradients(self):
            with scratch_space(), scoring_pass():
                groups = self.graph.groups()
                raw = [(g, self.importance(g, self.graph)) for g in groups]
        for g, s in raw:
            if s is not None:
                s = torch.as_tensor(s, dtype=torch.float64).flatten()
                if s.numel() != g.num_units:
                    raise PlanError(f"importance returned {s.numel()} scores for group {g.id} "
                                    f"with {g.num_units} units")
                out[g.id] = s
        return out

    def _note_targets(self, graph: DependencyGraph) -> None:
        """At the first plan: the graph of the model as given, and how many parameter elements
        the user asked to prune: all but those of ignored modules and, with a per-module ratio
        dict, of modules under no listed module with a ratio above 0 (what the no-op warning
        measures against; parts frozen for want of a rule count as asked)."""
        if self._first_graph is not None:
            return
        self._first_graph = graph

        def under(mod: str, path: str) -> bool:
            return path == "" or mod == path or mod.startswith(path + ".")

        def asked(qual: str) -> bool:
            mod = qual.rpartition(".")[0]
            if any(under(mod, p) for p in self._ignore_paths):
                return False
            if self._ratio_paths:
                best = max((p for p in self._ratio_paths if under(mod, p)), key=len, default=None)
                return best is not None and self._ratio_paths[best] > 0
            return True

        tensors = {id(t): t for q, t in self.original.named_parameters() if asked(q)}
        self.targeted_params = sum(t.numel() for t in tensors.values())

    def plan(self) -> Plan:
        """The plan of the next step (the whole pruning when ``iterative_steps == 1``)."""
        cfg = self.config
        graph = self.graph
        self._note_targets(graph)
        groups = graph.groups()
        scores = self.scores()
        max_ratio = cfg.max_ratio if cfg.max_ratio is not None else (0.9 if cfg.global_ else 1.0)

        def plan_for(ratio: float, ratio_of: Optional[dict] = None) -> dict[int, torch.Tensor]:
            if cfg.global_:
                return allocate.global_(groups, scores, ratio, cfg.round_to, max_ratio)
            return allocate.uniform(groups, scores, ratio, cfg.round_to, max_ratio, ratio_of)

        if cfg.target_macs is not None:
            n, k = cfg.iterative_steps, self.steps_done + 1
            if self.base_macs is None:
                self.base_macs = count_macs(graph)
            base = self.base_macs
            goal = 1 - (1 - cfg.target_macs) * k / n  # fraction of the original, after step k
            here = count_macs(graph)
            frac = min(1.0, goal * base / max(here, 1))
            drops = allocate.mac_target(plan_for, lambda d: count_macs(
                graph, Plan(graph, d).new_sizes()), here, frac)
        elif (cfg.iterative_steps > 1 or self._ratio_paths or self.head_ratio is not None
              ) and not cfg.global_:
            k = self.steps_done + 1
            drops = plan_for(self._step_fraction(k), self._step_ratios(k))
        else:
            drops = plan_for(self._step_fraction(self.steps_done + 1))
        return Plan(graph, drops)

    def apply(self, plan: Plan) -> nn.Module:
        """A new, smaller model with ``plan`` applied; the pruner's model is left as it is.

        Returns an object of the model's own class (a copy with smaller modules, custom methods
        and attributes kept) when the model's ``forward`` runs unchanged on the smaller modules,
        and an ``fx.GraphModule`` with the same parameter names where literals in the code had
        to change (``x.view(B, 64, -1)``) or the model was captured by ``torch.export``;
        :attr:`applied` says which and why. With nothing to drop, a copy of the model.
        """
        if plan.graph is not self.graph:
            raise PlanError("this plan was made on another graph; build it with this pruner")
        if plan.is_empty:
            self.applied = Applied(copy.deepcopy(self.model), not isinstance(
                self.model, fx.GraphModule), "nothing was dropped: a copy of the model")
            return self.applied.model
        self._warn_other_mode(plan)
        reference = self._masked_reference(plan)
        self.applied = apply_plan_copy(plan, self._inputs)
        target = self.applied.model
        target.train(self.model.training)
        _drop_grads(target)
        self._measure_deviation(reference, target)
        return target

    def _warn_other_mode(self, plan: Plan) -> None:
        """Say (once) that modules only the other training mode calls were not pruned along."""
        mods = plan.graph.other_mode_modules
        if not mods or self._warned_mode:
            return
        self._warned_mode = True
        here, other = (("training", "eval") if plan.graph.traced_training
                       else ("eval", "training"))
        warnings.warn(
            f"{type(self.original).__name__}: {', '.join(mods[:4])}"
            f"{' (+%d)' % (len(mods) - 4) if len(mods) > 4 else ''} run only in {other} mode, "
            f"which the {here}-mode trace does not see: they were not pruned with the layers "
            f"that feed them, so the pruned model runs in {here} mode only. To use it in "
            f"{other} mode (e.g. to fine-tune), prune the model in {other} mode "
            f"(model.{'train' if other == 'training' else 'eval'}()).",
            StructpruneWarning, stacklevel=4)

    def _masked_reference(self, plan: Plan) -> Any:
        """With an approximate rule in the graph (``prune_normalized_dims``), the masked
        original's output to measure the pruned model against; else None."""
        if all(getattr(r, "exact", True) for r in plan.graph.node_rules.values()):
            return None
        from .modes import eval_mode
        from .oracle import masked_output

        with eval_mode(plan.graph.graph_module), eval_mode(plan.graph.model):
            return masked_output(plan.graph, plan)

    def _measure_deviation(self, reference: Any, pruned: nn.Module) -> None:
        if reference is None:
            return
        from .modes import eval_mode
        from .oracle import max_rel_diff, run

        with eval_mode(pruned):
            dev = max_rel_diff(run(pruned, self.example_inputs), reference)
        self.deviation = max(self.deviation or 0.0, dev)

    def step(self) -> nn.Module:
        """Plan and apply the next step; the pruner continues from the result."""
        if self.steps_done >= self.config.iterative_steps:
            raise PlanError(f"all {self.config.iterative_steps} steps are done")
        pruned = self.apply(self.plan())
        self.steps_done += 1
        if pruned is not self.model:
            self.model = pruned
            self._graph = None
        return self.model

    def step_(self, optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
        """Plan the next step and apply it to the model itself (see :func:`prune_`)."""
        if self.model is not self.original:
            raise PlanError("this pruner already works on a pruned copy; use step()")
        if self.steps_done >= self.config.iterative_steps:
            raise PlanError(f"all {self.config.iterative_steps} steps are done")
        plan = self.plan()
        if not plan.is_empty:
            self._warn_other_mode(plan)
            reference = self._masked_reference(plan)
            apply_plan_(plan, self._inputs, optimizer)
            self._measure_deviation(reference, self.model)
            self._graph = None
        self.steps_done += 1
        return self.model

    def run(self) -> nn.Module:
        """Every remaining step; returns the final model (a copy if nothing was pruned)."""
        if self.steps_done >= self.config.iterative_steps:
            return self.model
        if self._graph is None and self.steps_done == 0:  # not capturable whole: in parts
            from .partial import capture_or_prune_in_parts

            in_parts = capture_or_prune_in_parts(self)
            if in_parts is not None:
                return in_parts
        before = count_params(self.model)
        while self.steps_done < self.config.iterative_steps:
            self.step()
        if self.model is self.original:
            self.model = copy.deepcopy(self.original)
        warn_if_little_pruned(self, before, count_params(self.model))
        _record(self.model, self)
        return self.model


#: What sp.prune knows about the models it returned (read by sp.report): measured deviation.
_RECORDS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _record(model: nn.Module, pruner: "Pruner") -> None:
    if pruner.deviation is not None:
        _RECORDS[model] = {"deviation": pruner.deviation}


def measured_deviation(model: nn.Module) -> Optional[float]:
    """The largest relative output deviation from the masked original that the pruning of
    ``model`` measured (only where approximate rules were used, ``prune_normalized_dims``)."""
    rec = _RECORDS.get(model)
    return None if rec is None else rec["deviation"]


def _ratio_paths(model: nn.Module, ratio: Mapping[Any, float]) -> dict[str, float]:
    """``{module path: ratio}`` from a ``{module (or path): ratio}`` dict; names a bad key."""
    by_id = {id(m): name for name, m in model.named_modules()}
    out: dict[str, float] = {}
    for key, r in ratio.items():
        if isinstance(key, nn.Module) and id(key) in by_id:
            out[by_id[id(key)]] = r
        elif isinstance(key, str) and key in dict(model.named_modules()):
            out[key] = r
        else:
            what = type(key).__name__ if isinstance(key, nn.Module) else repr(key)
            raise PlanError(f"ratio key {what} is not a submodule of {type(model).__name__}; "
                            f"key the dict by modules of the model (ratio={{model.layer4: 0.7}})")
    return out


def _drop_grads(model: nn.Module) -> None:
    """A pruned model's gradients would have the old shapes: drop them."""
    for p in model.parameters():
        p.grad = None


class _CalibrationGradients:
    """While scoring: the gradients of the pruner's ``loss_fn`` over ``data`` in ``.grad``
    (when the importance needs gradients and data was given); the model's own gradients are
    put back afterwards."""

    def __init__(self, pruner: "Pruner") -> None:
        self.pruner = pruner
        self.saved: Optional[list] = None

    def __enter__(self) -> None:
        pr = self.pruner
        if pr.data is None or not getattr(pr.importance, "needs_grad", False):
            return
        model = pr.model
        params = [p for p in model.parameters()]
        self.saved = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        try:
            self._accumulate(model, params)
        except BaseException:
            self.__exit__()
            raise

    def _accumulate(self, model: nn.Module, params: list) -> None:
        from .modes import eval_mode

        pr = self.pruner
        n = 0
        with torch.enable_grad(), eval_mode(model):
            for batch in pr.data:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise PlanError("each batch of data= must be a pair (inputs, target); inputs "
                                    "a tensor or a tuple of model inputs")
                x, y = batch
                out = model(*x) if isinstance(x, (tuple, list)) else model(x)
                loss = pr.loss_fn(out, y)
                loss.backward()
                n += 1
        if n == 0:
            raise PlanError("data= gave no batches")
        for p in params:
            if p.grad is not None:
                p.grad /= n

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            for p, g in self.saved:
                p.grad = g


def warn_if_little_pruned(pruner: Pruner, params_before: int, params_after: int) -> None:
    """Warn (:class:`NothingPrunedWarning`) when a prune removed nothing, or less than half of
    what was asked of the parts it was asked to prune (ignored modules and modules a
    per-module ratio leaves out do not count), naming the largest parts that stayed and why."""
    cfg = pruner.config
    asked = cfg.nominal_ratio if cfg.target_macs is None else 1 - float(cfg.target_macs)
    if asked <= 0:
        return
    removed = params_before - params_after
    targeted = max(pruner.targeted_params or 0, 1)
    if removed > 0 and (removed / targeted >= asked / 2 or removed / params_before >= asked / 2):
        return
    graph = pruner._first_graph or pruner.graph
    what = (f"ratio={cfg.ratio}" if cfg.target_macs is None else f"target_macs={cfg.target_macs}")
    head = ("removed nothing" if removed <= 0 else f"removed only {removed / params_before:.1%} "
            f"of the parameters ({removed / targeted:.1%} of those in the groups asked to shrink)")
    warnings.warn(f"{type(pruner.original).__name__}: {what} {head}. Largest parts that stayed: "
                  f"{frozen_summary(graph)}", NothingPrunedWarning, stacklevel=3)


def frozen_summary(graph: DependencyGraph, limit: int = 3) -> str:
    """The largest modules whose parameters no group can prune, with the reason for each."""
    pruned_spaces = {m.space for g in graph.groups() for m in g.params}
    sizes: dict[str, int] = {}
    for name, t in list(graph.graph_module.named_parameters()):
        if not any(Space.param(name, d) in pruned_spaces for d in range(t.dim())):
            mod = name.rpartition(".")[0]
            sizes[mod] = sizes.get(mod, 0) + t.numel()
    reasons: dict[str, str] = {}  # node name -> why it is frozen
    for e in graph.frozen():
        if e.reason:
            reasons.setdefault(e.node, e.reason)
    readers: dict[str, list[str]] = {}  # module path -> nodes that call it or read its tensors
    for n in graph.graph_module.graph.nodes:
        if n.op == "call_module":
            readers.setdefault(str(n.target), []).append(n.name)
        elif n.op == "get_attr":
            readers.setdefault(str(n.target).rpartition(".")[0], []).extend(
                u.name for u in n.users)
    parts = []
    for mod, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:limit]:
        owners = [mod] + [mod.rsplit(".", k)[0] for k in range(1, mod.count(".") + 1)]
        why = next((reasons[r] for o in owners for r in readers.get(o, []) if r in reasons),
                   "its dims are tied to frozen ops or to the model's inputs/outputs")
        parts.append(f"'{mod or '(top level)'}' ({n:,} parameters): {why}")
    return "; ".join(parts) if parts else "(no parameters)"


def prune(model: nn.Module, example_inputs: ExampleInputs, ratio: Optional[RatioSpec] = None,
          importance: Any = "l2", ignore: Iterable[nn.Module] = (), global_: bool = False,
          target_macs: Optional[float] = None, round_to: Optional[int] = None,
          iterative_steps: int = 1, **kwargs: Any) -> nn.Module:
    """Prune ``model`` and return a new, smaller model; ``model`` itself is not modified.

    See :class:`Pruner` for the arguments. The result is an object of the model's own class
    when its ``forward`` runs on the smaller modules, else an ``fx.GraphModule`` (see
    :meth:`Pruner.apply`). With nothing to remove (``ratio=0``) it is a copy of ``model``
    whose outputs are bit-identical. Warns with :class:`NothingPrunedWarning` when the prune
    removes nothing or much less than asked.
    """
    return Pruner(model, example_inputs, ratio=ratio, importance=importance, ignore=ignore,
                  global_=global_, target_macs=target_macs, round_to=round_to,
                  iterative_steps=iterative_steps, **kwargs).run()


def prune_(model: nn.Module, example_inputs: ExampleInputs,
           optimizer: Optional[torch.optim.Optimizer] = None, **kwargs: Any) -> nn.Module:
    """Prune ``model`` in place: its modules' attributes (``out_channels``, ...) are updated and
    every parameter and buffer that loses indices is sliced where it is, keeping its identity
    (tied weights stay tied, hooks and references stay valid); nothing is copied.

    An optimizer built before pruning keeps working: pass it as ``optimizer=`` and its
    per-parameter state (momentum buffers, Adam moments) is sliced along with the weights.
    The parameters' ``.grad`` are dropped (they had the old shapes).

    Works when the model's own ``forward`` still runs on the smaller modules, i.e. no literal
    size in its code has to change (``x.view(B, 64, -1)``); otherwise raises :class:`PlanError`
    and leaves the model (and the optimizer) as it was -- use :func:`prune`, which returns a
    model with the rewritten graph.
    """
    pruner = Pruner(model, example_inputs, **kwargs)
    before = count_params(model)
    if pruner.graph.graph_module.meta.get("structprune_capture") != "export":
        snap = Snapshot([model], optimizer=optimizer)  # all steps or none
        try:
            while pruner.steps_done < pruner.config.iterative_steps:
                pruner.step_(optimizer)
        except BaseException:
            snap.restore()
            raise
        if pruner.steps_done and count_params(model) != before:
            _drop_grads(model)
        warn_if_little_pruned(pruner, before, count_params(model))
        _record(model, pruner)
        return model
    # A torch.export graph does not run the model's modules: prune a copy, move its tensors.
    pruned = pruner.run()
    if not isinstance(pruned, fx.GraphModule):
        return model
    original_code = trace(model, example_inputs, rules=kwargs.get("rules"),
                          leaf_modules=kwargs.get("leaf_modules", ())).graph_module.code
    if pruned.code != original_code:
        raise literal_sizes_error(model)
    snap = Snapshot([model], optimizer=optimizer)
    try:
        _transplant(model, pruned, optimizer)
    except BaseException:
        snap.restore()
        raise
    _drop_grads(model)
    return model


def _transplant(model: nn.Module, pruned: nn.Module,
                optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Move the pruned leaves and tensors into ``model`` by qualified name; a parameter or
    buffer keeps its identity and takes the pruned data."""
    held = held_parameters(optimizer) if optimizer is not None else set()
    pruned_mods = dict(pruned.named_modules())
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for name, _ in list(model.named_modules()):
        if not name or name not in pruned_mods:
            continue
        new = pruned_mods[name]
        if type(new) is not nn.Module:  # a real leaf the graph calls, not a path holder
            mod = model.get_submodule(name)
            for k, v in vars(new).items():  # its attributes, not its tensors
                if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module)):
                    setattr(mod, k, v)
    changed: set[str] = set()
    for qual, t in list(pruned.named_parameters()) + list(pruned.named_buffers()):
        old = own.get(qual)
        if old is None or old is t or old.shape == t.shape:
            continue
        if id(old) in held:
            raise PlanError(f"cannot slice the optimizer state of '{qual}' for a model captured "
                            f"by torch.export; rebuild the optimizer after pruning")
        old.data = t.detach()
        old.grad = None
        changed.add(qual.rpartition(".")[0])
    _sync_module_attributes(model, changed, pruned)


class _ModuleOnly:
    """An apply context with only a module: enough for the module rules whose ``update`` reads
    nothing but the module's own (already sliced) tensors (conv, linear, batch norm, ...), and
    the pruned graph that calls its tensors (``path`` is the module's name in it)."""

    def __init__(self, module: nn.Module, path: str, graph: Optional[fx.GraphModule]) -> None:
        self.module = module
        self.node = None
        self.path = path
        self.graph = graph


def _sync_module_attributes(model: nn.Module, paths: set[str],
                            graph: Optional[fx.GraphModule] = None) -> None:
    """Bring the attributes of the modules under ``paths`` (``out_channels``, ``num_features``)
    in line with their sliced tensors, through each module's rule (an export graph does not call
    the modules, so the apply pass did not). Rules that need the graph leave theirs as is."""
    from .rules import module_rule, registry

    rules = registry()
    for path in paths:
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        rule = module_rule(mod, rules)
        if rule is not None:
            try:
                rule.update(_ModuleOnly(mod, path, graph))
            except Exception:  # the rule reads the graph (GroupNorm): its attributes stay
                pass
