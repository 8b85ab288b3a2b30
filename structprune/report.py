"""Before/after report: parameters, MACs, and what every group kept.

``sp.report(model, pruned, x)`` traces both models, counts parameters and MACs (every op: rule
formulas where a plan can change the shapes, torch's FlopCounterMode elsewhere, see
:mod:`structprune.macs`), and matches each group of the original to the pruned model by
parameter name, so it works for any pruned model whose parameter names were kept (as structprune's
are). ``str(report)`` is a table; ``report.to_dict()`` is the same for ``--json``.

MACs are per forward pass on the example inputs as given, not per sample: a batch of 2 reports
twice the MACs of a batch of 1. The report keeps the input shapes and says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

import torch.fx as fx

from .graph.depgraph import resolve_ignore, trace
from .pruner import measured_deviation
from .graph.capture import ExampleInputs
from .plan import count_macs


@dataclass
class GroupRow:
    group: int
    modules: list[str]
    units_before: int
    units_after: int
    width: int
    ignored: bool = False  # a module of the group was ignored by the user: nothing was asked

    @property
    def kept(self) -> float:
        return self.units_after / max(self.units_before, 1)


@dataclass
class Report:
    """Parameters and MACs before and after, and what every group kept.

    ``macs_before``/``macs_after`` are multiply-accumulates of one forward pass on the example
    inputs as given (the whole batch, not per sample); ``input_shapes`` are those inputs' shapes.
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[GroupRow] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: What the pruned model is (its own class, or a rewritten fx.GraphModule) and why.
    returned: str = ""
    #: With approximate rules (``prune_normalized_dims=True``): the largest relative deviation
    #: of the pruned output from the masked original, measured on the example inputs. None:
    #: every rule was exact (the pruned model equals the masked original).
    deviation: Optional[float] = None
    #: ``{reason: [node, ...]}`` over the frozen entries, in first-seen order.
    frozen_reasons: dict[str, list[str]] = field(default_factory=dict)
    #: For a model pruned in parts (it cannot be captured whole): one line per part pruned and
    #: per submodule kept as it was, with the reason (empty otherwise).
    parts: list[str] = field(default_factory=list)

    @property
    def params_kept(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_kept(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"params": {"before": self.params_before, "after": self.params_after,
                           "kept": round(self.params_kept, 6)},
                "macs": {"before": self.macs_before, "after": self.macs_after,
                         "kept": round(self.macs_kept, 6),
                         "per": "forward pass on the example inputs",
                         "input_shapes": [list(s) for s in self.input_shapes]},
                "groups": [{"group": g.group, "modules": g.modules, "units_before": g.units_before,
                            "units_after": g.units_after, "unit_width": g.width,
                            "ignored": g.ignored}
                           for g in self.groups],
                "frozen": self.frozen, "frozen_reasons": self.frozen_reasons,
                "returned": self.returned, "deviation": self.deviation, "parts": self.parts}

    def table(self, max_groups: int = 40) -> str:
        def num(n: int) -> str:
            return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)

        lines = [f"{'':10s}{'before':>12s}{'after':>12s}{'kept':>8s}",
                 f"{'params':10s}{num(self.params_before):>12s}{num(self.params_after):>12s}"
                 f"{self.params_kept:>8.1%}",
                 f"{'MACs':10s}{num(self.macs_before):>12s}{num(self.macs_after):>12s}"
                 f"{self.macs_kept:>8.1%}"]
        if self.input_shapes:
            shapes = ", ".join(str(tuple(s)) for s in self.input_shapes)
            lines.append(f"MACs: one forward pass on the example batch as given, inputs {shapes}")
        if self.parts:
            lines.append("MACs: torch.utils.flop_counter over the whole eager forward (ops it "
                         "does not know, e.g. roi_align and nms, count 0); after = before less "
                         "what the pruned parts save on the inputs the original parts received")
            lines += self.parts
        lines.append("")
        if self.groups:
            lines.append(f"{'group':>5s}  {'units':>11s}  {'kept':>6s}  modules")
            for g in self.groups[:max_groups]:
                mods = ", ".join(g.modules[:3]) + (f" (+{len(g.modules) - 3})"
                                                  if len(g.modules) > 3 else "")
                lines.append(f"{g.group:>5d}  {g.units_before:>5d}->{g.units_after:<5d}"
                             f"{g.kept:>6.0%}  {mods}{'  (ignored)' if g.ignored else ''}")
            if len(self.groups) > max_groups:
                lines.append(f"  ... {len(self.groups) - max_groups} more groups")
        if self.frozen:
            lines.append(f"frozen ({len(self.frozen)} nodes), by reason:")
            for reason, nodes in self.frozen_reasons.items():
                more = f", +{len(nodes) - 3}" if len(nodes) > 3 else ""
                lines.append(f"  {reason}  [{', '.join(nodes[:3])}{more}]")
        if self.returned:
            lines.append(f"returned: {self.returned}")
        if self.deviation is not None:
            lines.append(f"approximate: normalised dims were pruned; the output deviates from "
                         f"the masked original by {self.deviation:.2e} (relative, measured)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def report(model: nn.Module, pruned: Optional[nn.Module], example_inputs: ExampleInputs,
           ignore: Iterable[nn.Module] = ()) -> Report:
    """Compare ``model`` with ``pruned`` (or describe ``model`` alone when ``pruned`` is None).

    ``ignore``: the modules the prune was told to ignore; their groups are shown as ignored.
    """
    from .partial import parts_of

    if pruned is not None and parts_of(pruned) is not None:
        return _parts_report(model, pruned, example_inputs, ignore)
    g0 = trace(model, example_inputs)
    ignored = set(resolve_ignore(model, ignore))
    pruned = pruned if pruned is not None else model
    g1 = g0 if pruned is model else trace(pruned, example_inputs)
    after = dict(pruned.named_parameters())
    before = dict(g0.graph_module.named_parameters())
    rows = [_group_row(grp, before, after, ignored) for grp in g0.groups()]
    return Report(sum(p.numel() for p in model.parameters()),
                  sum(p.numel() for p in pruned.parameters()),
                  count_macs(g0), count_macs(g1), rows, [repr(e) for e in g0.frozen()],
                  _input_shapes(g0.args, g0.kwargs), _returned(model, pruned),
                  measured_deviation(pruned), _by_reason(g0.frozen()))


def _group_row(grp: Any, before: dict, after: dict, ignored: set) -> GroupRow:
    """What group ``grp`` kept, read from the parameter shapes before and after.

    A parameter dim can be shared by several groups (a conv whose output is split by ``chunk``
    into two halves, each its own group): the drops seen on such a dim are the sum of every
    group's. So the member read is one whose dim belongs to this group alone (its indices cover
    the whole dim), preferring the ``out``/``in``/``norm`` roles; only where every member's dim
    is shared is the drop split in proportion to the indices (marked ``shared``).
    """
    members = [m for m in grp.params if m.role in ("out", "in", "norm")] or list(grp.params)
    members += [m for m in grp.params if m not in members]

    def whole(m: Any) -> bool:
        t = before.get(m.qualname)
        return t is not None and int(m.index.numel()) == t.shape[m.dim]

    m = next((x for x in members if whole(x) and x.qualname in after), None)
    shared = m is None
    if shared:
        m = next((x for x in members if x.qualname in after and x.qualname in before),
                 members[0])
    t = after.get(m.qualname)
    before_idx = int(m.index.numel())
    per_unit = max(before_idx // max(grp.num_units, 1), 1)
    if t is None or m.qualname not in before:
        kept_idx = before_idx
    else:
        dim_size = before[m.qualname].shape[m.dim]
        dropped = dim_size - t.shape[m.dim]
        if shared:  # this group's share of the dim's drops, in proportion to its indices
            dropped = round(dropped * before_idx / max(dim_size, 1))
        kept_idx = before_idx - dropped
    mods = sorted({x.module for x in grp.params})
    is_ignored = any(x.module in ignored for x in grp.params if x.role == "out")
    return GroupRow(grp.id, mods, grp.num_units, max(kept_idx // per_unit, 0), grp.width,
                    is_ignored)


def _parts_report(model: nn.Module, pruned: nn.Module, example_inputs: ExampleInputs,
                  ignore: Iterable[nn.Module]) -> Report:
    """The report of a model pruned in parts (:mod:`structprune.partial`): each pruned part
    compared with the original part on the inputs it receives in one forward of the model (its
    groups listed under the part's path); MACs of the whole eager forward, before and after."""
    from .graph.capture import normalize_inputs
    from .partial import parts_macs, parts_of, record_calls

    info = parts_of(pruned)
    assert info is not None
    args, kwargs = normalize_inputs(example_inputs)
    paths = [p.path for p in info.parts if p.pruned]
    calls = record_calls(model, args, kwargs, paths)
    ignore_ids = {id(m) for m in ignore}
    rows: list[GroupRow] = []
    frozen: list[str] = []
    reasons: dict[str, list[str]] = {}
    for path in paths:
        part, new = model.get_submodule(path), pruned.get_submodule(path)
        from .partial import _as_example

        sub = report(part, new, _as_example(part, calls[path][0]),
                     [m for m in part.modules() if id(m) in ignore_ids])
        for g in sub.groups:
            rows.append(GroupRow(len(rows), [f"{path}.{x}" if x else path for x in g.modules],
                                 g.units_before, g.units_after, g.width, g.ignored))
        frozen += [f"{path}: {e}" for e in sub.frozen]
        for why, nodes in sub.frozen_reasons.items():
            reasons.setdefault(why, []).extend(f"{path}.{n}" for n in nodes)
    for path, cls, why in info.kept:
        frozen.append(f"{path} ({cls}): {why}")
        reasons.setdefault(why, []).append(path)
    return Report(sum(p.numel() for p in model.parameters()),
                  sum(p.numel() for p in pruned.parameters()),
                  *parts_macs(model, pruned, example_inputs), rows, frozen,
                  _input_shapes(args, kwargs),
                  f"a {type(pruned).__name__} (the model's own class) with each pruned part put "
                  f"in place", None, reasons, info.summary().splitlines())


def _by_reason(entries: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in entries:
        out.setdefault(e.reason or "frozen", []).append(e.node)
    return out


def _returned(model: nn.Module, pruned: nn.Module) -> str:
    """What kind of model ``pruned`` is, and why (``sp.prune`` records the reason)."""
    if pruned is model:
        return ""
    if isinstance(pruned, fx.GraphModule) and not isinstance(model, fx.GraphModule):
        why = pruned.meta.get("structprune_returned", "the rewritten graph")
        return f"an fx.GraphModule: {why}"
    return f"a {type(pruned).__name__} (the model's own class): its forward runs on the pruned modules"


def _input_shapes(args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    """Shapes of the tensors among the example inputs, positional first (for the MACs note)."""
    return [tuple(v.shape) for v in list(args) + list(kwargs.values())
            if isinstance(v, torch.Tensor)]
