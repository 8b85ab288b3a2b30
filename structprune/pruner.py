"""The :class:`Pruner`: score, allocate, plan and apply, once or over several steps.

``sp.prune`` and ``sp.prune_`` are thin wrappers around it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from . import allocate, importance as importance_mod
from .apply import Snapshot, apply_plan, apply_plan_, literal_sizes_error
from .errors import PlanError
from .graph.depgraph import DependencyGraph, resolve_ignore, trace
from .graph.trace import ExampleInputs, check_model, normalize_inputs
from .importance.base import scoring_pass
from .scratch import scratch_space
from .plan import Plan, count_macs


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much; validated on construction."""

    ratio: float = 0.5
    importance: Any = "l2"
    ignore: tuple = ()
    global_: bool = False
    target_macs: Optional[float] = None
    round_to: Optional[int] = None
    max_ratio: Optional[float] = None
    iterative_steps: int = 1
    rules: Optional[dict] = None
    leaf_modules: tuple = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0.0 <= float(self.ratio) < 1.0):
            raise PlanError(f"ratio must be a number in [0, 1) (the fraction of units to remove "
                            f"per group), got {self.ratio!r}")
        if self.target_macs is not None and not (0.0 < float(self.target_macs) <= 1.0):
            raise PlanError(f"target_macs must be in (0, 1] (the fraction of MACs to keep), got "
                            f"{self.target_macs!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise PlanError(f"round_to must be a positive int, got {self.round_to!r}")
        if not isinstance(self.iterative_steps, int) or self.iterative_steps < 1:
            raise PlanError(f"iterative_steps must be an int >= 1, got {self.iterative_steps!r}")
        if self.max_ratio is not None and not (0.0 < self.max_ratio <= 1.0):
            raise PlanError(f"max_ratio must be in (0, 1], got {self.max_ratio!r}")


class Pruner:
    """Stateful structured pruner for one-shot and iterative schedules.

    Call tree::

        run()  +-- step() x iterative_steps
                     +-- plan()    trace -> score every group -> allocate -> Plan
                     +-- apply()   slice a copy of the traced model -> smaller GraphModule
        step_()    plan() and slice the model itself (what :func:`prune_` runs)

    Args:
        model: the model to prune; ``plan``/``apply``/``step``/``run`` never modify it
            (``apply`` works on a copy), ``step_`` prunes it in place.
        example_inputs: a tensor, tuple or dict the model runs on.
        ratio: fraction of each group's units to remove, in ``[0, 1)``. (default: ``0.5``)
        importance: a name (``"l2"``, ``"l1"``, ``"random"``, ``"bn_scale"``, ``"taylor"``,
            ``"hessian"``, ``"fpgm"``, ``"lamp"``) or an Importance. (default: ``"l2"``)
        ignore: modules whose output dims must stay (e.g. ``[model.fc]``).
        global_: rank units across groups instead of per group. (default: False)
        target_macs: keep this fraction of MACs instead of using ``ratio``.
        round_to: keep channel counts multiples of this (e.g. 8).
        max_ratio: the most any one group may lose (default: 1.0 uniform, 0.9 global); a
            group always keeps at least one unit.
        iterative_steps: prune in this many steps, re-scoring between them. (default: 1)
        rules: extra op rules for this model; leaf_modules: modules not to trace into.

    Example:
        >>> import torch, torch.nn as nn, structprune as sp
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> pruner = sp.Pruner(m, torch.randn(1, 3, 8, 8), ratio=0.5)
        >>> plan = pruner.plan()
        >>> pruner.apply(plan)[0].out_channels
        4
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, ratio: float = 0.5,
                 importance: Any = "l2", ignore: Iterable[nn.Module] = (), global_: bool = False,
                 target_macs: Optional[float] = None, round_to: Optional[int] = None,
                 max_ratio: Optional[float] = None, iterative_steps: int = 1,
                 rules: Optional[dict] = None, leaf_modules: Iterable[Any] = ()) -> None:
        check_model(model)
        self.config = PruneConfig(ratio, importance, tuple(ignore), global_, target_macs,
                                  round_to, max_ratio, iterative_steps, rules, tuple(leaf_modules))
        self.importance = importance_mod.resolve(importance)
        self.example_inputs = example_inputs
        self._inputs = normalize_inputs(example_inputs)
        self.original = model
        self.model = model
        self.steps_done = 0
        self._graph: Optional[DependencyGraph] = None
        self._ignore_paths = resolve_ignore(model, self.config.ignore)
        self.base_macs: Optional[int] = None
        self._orig_sizes: dict = {}

    # --- the graph of the current model ---------------------------------------------------------
    @property
    def graph(self) -> DependencyGraph:
        if self._graph is None:
            mods = dict(self.model.named_modules())
            ignore = [mods[p] for p in self._ignore_paths if p in mods]
            self._graph = trace(self.model, self.example_inputs, rules=self.config.rules,
                                leaf_modules=self.config.leaf_modules, ignore=ignore)
            if not self._orig_sizes:
                self._orig_sizes = {s: n for s, n in self._graph.table.size.items() if s.is_param}
        return self._graph

    def _step_fraction(self, k: int) -> float:
        """Cumulative fraction pruned after step k of n, as a fraction of what remains before it."""
        n, r = self.config.iterative_steps, float(self.config.ratio)
        before, after = 1 - r * (k - 1) / n, 1 - r * k / n
        return 1 - after / before

    def _step_ratios(self, k: int) -> dict[int, float]:
        """Per-group ratios for step k so that after step k each group keeps exactly what one-shot
        pruning at ``ratio * k / n`` of its original width would (no rounding drift)."""
        cum = float(self.config.ratio) * k / self.config.iterative_steps
        out = {}
        for g in self.graph.groups():
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

    def plan(self) -> Plan:
        """The plan of the next step (the whole pruning when ``iterative_steps == 1``)."""
        cfg = self.config
        graph = self.graph
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
        elif cfg.iterative_steps > 1 and not cfg.global_:
            k = self.steps_done + 1
            drops = plan_for(self._step_fraction(k), self._step_ratios(k))
        else:
            drops = plan_for(self._step_fraction(self.steps_done + 1))
        return Plan(graph, drops)

    def apply(self, plan: Plan) -> nn.Module:
        """A new, smaller model with ``plan`` applied; the pruner's model is left as it is.

        Returns a copy of the model itself when the plan drops nothing, else an
        ``fx.GraphModule`` with the same parameter names (minus the removed slices).
        """
        if plan.graph is not self.graph:
            raise PlanError("this plan was made on another graph; build it with this pruner")
        if plan.is_empty:
            return copy.deepcopy(self.model)
        target = apply_plan(plan, self._inputs)
        target.train(self.model.training)
        return target

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

    def step_(self) -> nn.Module:
        """Plan the next step and apply it to the model itself (see :func:`prune_`)."""
        if self.model is not self.original:
            raise PlanError("this pruner already works on a pruned copy; use step()")
        if self.steps_done >= self.config.iterative_steps:
            raise PlanError(f"all {self.config.iterative_steps} steps are done")
        plan = self.plan()
        if not plan.is_empty:
            apply_plan_(plan, self._inputs)
            self._graph = None
        self.steps_done += 1
        return self.model

    def run(self) -> nn.Module:
        """Every remaining step; returns the final model (a copy if nothing was pruned)."""
        if self.steps_done >= self.config.iterative_steps:
            return self.model
        while self.steps_done < self.config.iterative_steps:
            self.step()
        if self.model is self.original:
            return copy.deepcopy(self.original)
        return self.model


def prune(model: nn.Module, example_inputs: ExampleInputs, ratio: float = 0.5,
          importance: Any = "l2", ignore: Iterable[nn.Module] = (), global_: bool = False,
          target_macs: Optional[float] = None, round_to: Optional[int] = None,
          iterative_steps: int = 1, **kwargs: Any) -> nn.Module:
    """Prune ``model`` and return a new, smaller model; ``model`` itself is not modified.

    See :class:`Pruner` for the arguments. With nothing to remove (``ratio=0``) the result is a
    copy of ``model`` whose outputs are bit-identical.
    """
    return Pruner(model, example_inputs, ratio=ratio, importance=importance, ignore=ignore,
                  global_=global_, target_macs=target_macs, round_to=round_to,
                  iterative_steps=iterative_steps, **kwargs).run()


def prune_(model: nn.Module, example_inputs: ExampleInputs, **kwargs: Any) -> nn.Module:
    """Prune ``model`` in place: its parameters and buffers are replaced by smaller ones and its
    modules' attributes (``out_channels``, ...) updated; nothing is copied.

    Works when the model's own ``forward`` still runs on the smaller modules, i.e. no literal
    size in its code has to change (``x.view(B, 64, -1)``); otherwise raises :class:`PlanError`
    and leaves the model as it was -- use :func:`prune`, which returns a rewritten graph.
    """
    pruner = Pruner(model, example_inputs, **kwargs)
    if pruner.graph.graph_module.meta.get("structprune_capture") != "export":
        snap = Snapshot([model])  # all steps or none
        try:
            while pruner.steps_done < pruner.config.iterative_steps:
                pruner.step_()
        except BaseException:
            snap.restore()
            raise
        return model
    # A torch.export graph does not run the model's modules: prune a copy, move its tensors.
    pruned = pruner.run()
    if not isinstance(pruned, fx.GraphModule):
        return model
    original_code = trace(model, example_inputs, rules=kwargs.get("rules"),
                          leaf_modules=kwargs.get("leaf_modules", ())).graph_module.code
    if pruned.code != original_code:
        raise literal_sizes_error(model)
    _transplant(model, pruned)
    return model


def _transplant(model: nn.Module, pruned: nn.Module) -> None:
    """Move the pruned leaves and tensors into ``model`` by qualified name."""
    pruned_mods = dict(pruned.named_modules())
    for name, _ in list(model.named_modules()):
        if not name or name not in pruned_mods:
            continue
        new = pruned_mods[name]
        if type(new) is not nn.Module:  # a real leaf the graph calls, not a path holder
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    for qual, t in list(pruned.named_parameters()) + list(pruned.named_buffers()):
        parent, _, attr = qual.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            continue
        if getattr(owner, attr, None) is not t and getattr(owner, attr, None) is not None:
            if isinstance(t, nn.Parameter):
                setattr(owner, attr, t)
            else:
                owner._buffers[attr] = t
