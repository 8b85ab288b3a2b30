"""structprune: structured pruning that makes PyTorch models genuinely smaller."""
from . import ops as ops  # noqa: F401  (fills the rule registry)
from .graph.depgraph import DependencyGraph as DependencyGraph, trace as trace
from .graph.group import Group as Group, Member as Member, Unit as Unit
from .errors import (ModelError as ModelError, PlanError as PlanError,
                     StructpruneError as StructpruneError, StructpruneWarning as StructpruneWarning,
                     NothingPrunedWarning as NothingPrunedWarning,
                     TraceError as TraceError, UnsupportedOpError as UnsupportedOpError)
from .plan import Plan as Plan

__version__ = "0.1.0"
from .pruner import Pruner as Pruner, prune as prune, prune_ as prune_
from . import importance as importance, allocate as allocate
from .io import load as load, save as save
from .export.onnx import export_onnx as export_onnx
from .report import Report as Report, report as report
from . import gnn as gnn  # sp.gnn.find_ticket (graph lottery tickets; imports torch_geometric lazily)
