"""Coverage of structprune on PyTorch Geometric: every conv class and PyG's ready models.

Cases (issue 11, "What it must show"):

* every class of ``torch_geometric.nn.conv.__all__`` in a 2-layer net
  ``conv(in, hidden) -> relu -> conv(hidden, out)`` with default arguments where possible;
  :data:`CONVS` supplies what a class cannot default (``ChebConv`` ``K``, ``GINConv``'s ``nn``,
  ``NNConv``'s edge network, ``PNAConv``'s aggregators/scalers/degree histogram, two heads for
  the attention layers, ``edge_dim`` where a layer needs edge features) and the extra forward
  inputs (``edge_attr``, ``edge_type``, pseudo coordinates, ``pos``, ``batch``, ...). Layers that
  keep the channel count (``GCN2Conv``, ``APPNP``, ``LGConv``, ...) sit between a ``Linear``
  encoder and a ``Linear`` head so that the net has a hidden width to prune. Classes that cannot
  run in such a net are listed in :data:`SKIP` with the reason; a case whose *unpruned* net does
  not run here (a missing optional package such as ``torch-cluster``) is reported as skipped
  with the error, never dropped;
* ``torch_geometric.nn.models`` ``GCN``, ``GraphSAGE``, ``GIN``, ``GAT``, ``PNA``, ``EdgeCNN``
  plain and with ``norm=`` / ``jk=`` variants, and a graph-classification GIN with ``GraphNorm``,
  global add pooling and a ``Linear`` head.

Each case, in this process (each in try/except, with a per-case timeout): ``sp.Pruner`` at ratio
0.5 by L2 magnitude, ignoring the module that produces the output (the second conv, the ``Linear``
head or the model's ``lin``), on a random graph of 20 nodes and 60 edges with 8 features, float64,
random norm statistics and random values for constant-initialised parameters (zero biases would
hide a wrongly sliced bias). Recorded: the error if a stage raises; groups, parameters and MACs
before/after; the oracle (the pruned model against the traced original with the dropped
activations zeroed, ``structprune.testing.masked_output``) on the example graph and, where the
captured graph runs on it, on a larger graph (37 nodes, 131 edges); whether the pruned model runs
on the larger graph at all; ONNX parity (``sp.export_onnx`` with per-input dynamic node/edge axes,
checked by onnxruntime on the example graph, then run on the larger graph and compared with torch);
and the frozen entries (op and reason). Torch-Pruning (``tp.pruner.MetaPruner``, L2 magnitude,
ratio 0.5, same ignored module) runs side by side on an identical copy: whether it raises, what
parameters it removes from which modules, and whether the pruned model still runs and gives the
original output shapes on both graphs (Torch-Pruning has no numerical check).

Status per case: ``pruned`` (parameters removed, oracle equal), ``frozen`` (nothing removed; the
graph names frozen ops with reasons), ``nothing-pruned`` (nothing removed and no reason),
``failed`` (structprune raised), ``SILENTLY-WRONG`` (an oracle mismatch with no error: the one
outcome structprune promises never happens), ``skipped`` (the case cannot run here; reason given).

Usage::

    python benchmarks/gnn_coverage.py                       # everything
    python benchmarks/gnn_coverage.py --only GCNConv,GAT --no-tp
    python benchmarks/gnn_coverage.py --json out.json --md out.md --timeout 60

Results: ``benchmarks/results/gnn_coverage.md`` and ``benchmarks/results/gnn_coverage.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

IN, HIDDEN, OUT = 8, 16, 8          # EGConv needs out_channels divisible by its 8 heads
EDGE_DIM, RELATIONS = 3, 3
SMALL = (20, 60, 0)                 # nodes, edges, seed: the graph the model is pruned on
BIG = (37, 131, 1)                  # another graph size for the any-size torch and ONNX checks
RATIO = 0.5
TP_TIMEOUT = 30.0                   # seconds for Torch-Pruning on one case

# How each graph tensor scales with the graph: node-level (dim 0 = nodes), edge-level (dim 0 =
# edges), an index pair list (dim 1 = edges); used for the ONNX dynamic axes.
INPUT_AXES = {"x": {0: "nodes"}, "pos": {0: "nodes"}, "normal": {0: "nodes"},
              "batch": {0: "nodes"}, "node_type": {0: "nodes"},
              "edge_index": {1: "edges"}, "neg_edge_index": {1: "edges"},
              "edge_weight": {0: "edges"}, "edge_attr": {0: "edges"}, "edge_type": {0: "edges"},
              "pseudo": {0: "edges"}}


# ------------------------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------------------------
def make_graph(num_nodes: int, num_edges: int, seed: int) -> dict[str, torch.Tensor]:
    """A random graph with every input a case may need (fixed seed). Two graphs in ``batch``."""
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    half = num_nodes // 2
    return {
        "x": torch.randn(num_nodes, IN, generator=g),
        "edge_index": ei,
        "neg_edge_index": torch.randint(0, num_nodes, (2, num_edges), generator=g),
        "edge_weight": torch.rand(num_edges, generator=g) + 0.1,
        "edge_attr": torch.randn(num_edges, EDGE_DIM, generator=g),
        "edge_type": torch.randint(0, RELATIONS, (num_edges,), generator=g),
        "pseudo": torch.rand(num_edges, 3, generator=g),
        "pos": torch.randn(num_nodes, 3, generator=g),
        "normal": torch.nn.functional.normalize(torch.randn(num_nodes, 3, generator=g), dim=-1),
        "node_type": torch.randint(0, 2, (num_nodes,), generator=g),
        "batch": torch.cat([torch.zeros(half, dtype=torch.long),
                            torch.ones(num_nodes - half, dtype=torch.long)]),
    }


def graph_inputs(graph: dict[str, torch.Tensor], names: tuple[str, ...],
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    return tuple(graph[n].to(dtype) if graph[n].is_floating_point() else graph[n] for n in names)


def _degree_histogram() -> torch.Tensor:
    from torch_geometric.utils import degree

    ei = make_graph(*SMALL)["edge_index"]
    d = degree(ei[1], num_nodes=SMALL[0], dtype=torch.long)
    return torch.bincount(d)


# ------------------------------------------------------------------------------------------------
# the 2-layer net
# ------------------------------------------------------------------------------------------------
def _first(out: Any) -> Any:
    """Layers that return ``(out, extras)`` (PANConv, attention weights) give their output."""
    return out[0] if isinstance(out, tuple) else out


class _TwoLayer(nn.Module):
    """``[lin_in ->] conv1 -> relu -> conv2 [-> lin_out]``; each conv is called with the graph
    tensors named in ``call`` (``"x"`` is the current features, ``"x0"`` the first hidden
    features, for GCN2Conv/FAConv)."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, inputs: tuple[str, ...],
                 call: tuple[str, ...], lin_in: Optional[nn.Module] = None,
                 lin_out: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.inputs, self.call = inputs, call
        self.lin_in, self.conv1, self.conv2, self.lin_out = lin_in, conv1, conv2, lin_out

    def body(self, *args: torch.Tensor) -> torch.Tensor:
        env = dict(zip(self.inputs, args))
        h = env["x"]
        if self.lin_in is not None:
            h = self.lin_in(h)
        env["x0"] = h
        for k, conv in enumerate((self.conv1, self.conv2)):
            h = _first(conv(*[h if n == "x" else env[n] for n in self.call]))
            if k == 0:
                h = h.relu()
        if self.lin_out is not None:
            h = self.lin_out(h)
        return h


# One forward signature per arity, so that fx sees named tensor placeholders (not *args).
class Net2(_TwoLayer):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.body(a, b)


class Net3(_TwoLayer):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.body(a, b, c)


class Net4(_TwoLayer):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                d: torch.Tensor) -> torch.Tensor:
        return self.body(a, b, c, d)


class Net5(_TwoLayer):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                e: torch.Tensor) -> torch.Tensor:
        return self.body(a, b, c, d, e)


NETS = {2: Net2, 3: Net3, 4: Net4, 5: Net5}


class GraphClassifier(nn.Module):
    """Graph classification: a GIN with GraphNorm, global add pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        from torch_geometric.nn.models import GIN

        self.gnn = GIN(IN, HIDDEN, num_layers=3, norm="graph_norm")
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor,
                batch: torch.Tensor) -> torch.Tensor:
        from torch_geometric.nn import global_add_pool

        h = self.gnn(x, edge_index, batch=batch)
        return self.head(global_add_pool(h, batch))


def mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, o))


# ------------------------------------------------------------------------------------------------
# the case table
# ------------------------------------------------------------------------------------------------
@dataclass
class ConvSpec:
    """How to put one conv class in the 2-layer net.

    ``make(cls, in, out, layer)`` builds a layer (default ``cls(in, out, **kwargs)``); ``call``
    is the layer's positional inputs (graph tensor names); ``wrap`` puts the layers between
    ``Linear(IN, HIDDEN)`` and ``Linear(HIDDEN, OUT)`` (layers that keep the width or take no
    sizes); ``mult`` is the layer's output width per ``out`` channel (concatenated heads)."""

    kwargs: dict = field(default_factory=dict)
    call: tuple[str, ...] = ("x", "edge_index")
    make: Optional[Callable[..., nn.Module]] = None
    wrap: bool = False
    mult: int = 1
    note: str = ""


E_ATTR = ("x", "edge_index", "edge_attr")
E_TYPE = ("x", "edge_index", "edge_type")

CONVS: dict[str, ConvSpec] = {
    "SimpleConv": ConvSpec(make=lambda c, i, o, k: c(), wrap=True),
    "GCNConv": ConvSpec(),
    "ChebConv": ConvSpec(kwargs={"K": 2}),
    "SAGEConv": ConvSpec(),
    "GraphConv": ConvSpec(),
    "GravNetConv": ConvSpec(kwargs=dict(space_dimensions=2, propagate_dimensions=4, k=4),
                            call=("x", "batch")),
    "GatedGraphConv": ConvSpec(make=lambda c, i, o, k: c(o, num_layers=2), wrap=True),
    "ResGatedGraphConv": ConvSpec(),
    "GATConv": ConvSpec(kwargs={"heads": 2}, mult=2),
    "GATv2Conv": ConvSpec(kwargs={"heads": 2}, mult=2),
    "TransformerConv": ConvSpec(kwargs={"heads": 2}, mult=2),
    "AGNNConv": ConvSpec(make=lambda c, i, o, k: c(), wrap=True),
    "TAGConv": ConvSpec(),
    "GINConv": ConvSpec(make=lambda c, i, o, k: c(mlp(i, o))),
    "GINEConv": ConvSpec(make=lambda c, i, o, k: c(mlp(i, o), edge_dim=EDGE_DIM), call=E_ATTR),
    "ARMAConv": ConvSpec(),
    "SGConv": ConvSpec(),
    "SSGConv": ConvSpec(kwargs={"alpha": 0.1}),
    "APPNP": ConvSpec(make=lambda c, i, o, k: c(K=2, alpha=0.1), wrap=True),
    "MFConv": ConvSpec(),
    "RGCNConv": ConvSpec(kwargs={"num_relations": RELATIONS}, call=E_TYPE),
    "FastRGCNConv": ConvSpec(kwargs={"num_relations": RELATIONS}, call=E_TYPE),
    "RGATConv": ConvSpec(kwargs={"num_relations": RELATIONS}, call=E_TYPE),
    # Layer 1 outputs [positive | negative] halves (2 * out); layer 2 takes in_channels = hidden.
    "SignedConv": ConvSpec(make=lambda c, i, o, k: c(i if k == 0 else i // 2, o,
                                                     first_aggr=(k == 0)),
                           call=("x", "edge_index", "neg_edge_index"), mult=2),
    "PointNetConv": ConvSpec(make=lambda c, i, o, k: c(local_nn=mlp(i + 3, o)),
                             call=("x", "pos", "edge_index")),
    "GMMConv": ConvSpec(kwargs={"dim": 3, "kernel_size": 2}, call=("x", "edge_index", "pseudo")),
    "SplineConv": ConvSpec(kwargs={"dim": 3, "kernel_size": 3},
                           call=("x", "edge_index", "pseudo")),
    "NNConv": ConvSpec(make=lambda c, i, o, k: c(i, o, nn=nn.Sequential(
        nn.Linear(EDGE_DIM, 8), nn.ReLU(), nn.Linear(8, i * o))), call=E_ATTR),
    "CGConv": ConvSpec(make=lambda c, i, o, k: c(o, dim=EDGE_DIM), call=E_ATTR, wrap=True),
    "EdgeConv": ConvSpec(make=lambda c, i, o, k: c(mlp(2 * i, o))),
    "DynamicEdgeConv": ConvSpec(make=lambda c, i, o, k: c(mlp(2 * i, o), k=4),
                                call=("x", "batch")),
    "XConv": ConvSpec(kwargs={"dim": 3, "kernel_size": 4}, call=("x", "pos", "batch")),
    "PPFConv": ConvSpec(make=lambda c, i, o, k: c(local_nn=mlp(i + 4, o)),
                        call=("x", "pos", "normal", "edge_index")),
    "FeaStConv": ConvSpec(),
    "PointTransformerConv": ConvSpec(call=("x", "pos", "edge_index")),
    "HypergraphConv": ConvSpec(note="edge_index read as (node, hyperedge) incidence"),
    "LEConv": ConvSpec(),
    "PNAConv": ConvSpec(make=lambda c, i, o, k: c(
        i, o, aggregators=["mean", "min", "max", "std"],
        scalers=["identity", "amplification", "attenuation"], deg=_degree_histogram())),
    "ClusterGCNConv": ConvSpec(),
    "GENConv": ConvSpec(),
    "GCN2Conv": ConvSpec(make=lambda c, i, o, k: c(o, alpha=0.1),
                         call=("x", "x0", "edge_index"), wrap=True),
    "PANConv": ConvSpec(kwargs={"filter_size": 2}),
    "WLConvContinuous": ConvSpec(make=lambda c, i, o, k: c(), wrap=True),
    "FiLMConv": ConvSpec(),
    "SuperGATConv": ConvSpec(kwargs={"heads": 2}, mult=2),
    "FAConv": ConvSpec(make=lambda c, i, o, k: c(o), call=("x", "x0", "edge_index"), wrap=True),
    "EGConv": ConvSpec(),
    "PDNConv": ConvSpec(kwargs={"edge_dim": EDGE_DIM, "hidden_channels": 8}, call=E_ATTR),
    "GeneralConv": ConvSpec(),
    "HEATConv": ConvSpec(kwargs=dict(num_node_types=2, num_edge_types=RELATIONS,
                                     edge_type_emb_dim=4, edge_dim=EDGE_DIM,
                                     edge_attr_emb_dim=4),
                         call=("x", "edge_index", "node_type", "edge_type", "edge_attr")),
    "LGConv": ConvSpec(make=lambda c, i, o, k: c(), wrap=True),
    "PointGNNConv": ConvSpec(make=lambda c, i, o, k: c(mlp_h=mlp(o, 3), mlp_f=mlp(o + 3, o),
                                                       mlp_g=mlp(o, o)),
                             call=("x", "pos", "edge_index"), wrap=True),
    "GPSConv": ConvSpec(make=lambda c, i, o, k: c(o, conv=_pyg("GINConv")(mlp(o, o))),
                        call=("x", "edge_index", "batch"), wrap=True,
                        note="conv=GINConv(MLP), one attention head"),
    "AntiSymmetricConv": ConvSpec(make=lambda c, i, o, k: c(o), wrap=True),
    "DirGNNConv": ConvSpec(make=lambda c, i, o, k: c(_pyg("GCNConv")(i, o)),
                           note="conv=GCNConv"),
    "MixHopConv": ConvSpec(mult=3),
}

SKIP: dict[str, str] = {
    "MessagePassing": "the base class of every conv, not a layer",
    "CuGraphSAGEConv": "needs pylibcugraphops and CUDA (cuGraph CSC graphs)",
    "CuGraphGATConv": "needs pylibcugraphops and CUDA (cuGraph CSC graphs)",
    "CuGraphRGCNConv": "needs pylibcugraphops and CUDA (cuGraph CSC graphs)",
    "FusedGATConv": "needs dgNN's fused CUDA kernel and CSR/CSC/permutation inputs",
    "DNAConv": "takes a [nodes, layers, channels] stack of all earlier layers' outputs, not "
               "node features (a jumping-knowledge net, not conv -> relu -> conv)",
    "WLConv": "relabels integer colours (hashing, no parameters, no float features)",
    "HGTConv": "heterogeneous: takes dicts of node and edge types",
    "HANConv": "heterogeneous: takes dicts of node and edge types",
    "HeteroConv": "heterogeneous: a dict of per-edge-type convs over dicts of inputs",
    "MeshCNNConv": "operates on mesh edges (one feature row per mesh edge, each linked to its "
                   "4 mesh neighbours), not on a node graph",
}


def _pyg(name: str) -> Any:
    import torch_geometric.nn.conv as conv

    return getattr(conv, name)


@dataclass
class Case:
    name: str
    kind: str                                   # "conv" or "model"
    build: Callable[[], nn.Module]
    inputs: tuple[str, ...]
    output: Callable[[nn.Module], nn.Module]    # the module whose output must keep its shape
    note: str = ""


def _conv_case(name: str, spec: ConvSpec) -> Case:
    inputs = ("x", "edge_index") + tuple(
        n for n in spec.call if n not in ("x", "x0", "edge_index"))

    def build() -> nn.Module:
        cls = _pyg(name)
        make = spec.make or (lambda c, i, o, k: c(i, o, **spec.kwargs))
        if spec.wrap:
            lin_in, lin_out = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN * spec.mult, OUT)
            c1, c2 = make(cls, HIDDEN, HIDDEN, 0), make(cls, HIDDEN * spec.mult, HIDDEN, 1)
        else:
            lin_in = lin_out = None
            c1, c2 = make(cls, IN, HIDDEN, 0), make(cls, HIDDEN * spec.mult, OUT, 1)
        return NETS[len(inputs)](c1, c2, inputs, spec.call, lin_in, lin_out)

    def output(net: nn.Module) -> nn.Module:
        return net.lin_out if net.lin_out is not None else net.conv2

    note = ("Linear -> conv -> relu -> conv -> Linear" if spec.wrap else "") + (
        f"; {spec.note}" if spec.note and spec.wrap else spec.note)
    return Case(name, "conv", build, inputs, output, note)


def _model_output(m: nn.Module) -> nn.Module:
    lin = getattr(m, "lin", None)
    return lin if isinstance(lin, nn.Module) else m.convs[-1]


def _model_case(name: str, cls_name: str, inputs: tuple[str, ...] = ("x", "edge_index"),
                **kwargs: Any) -> Case:
    def build() -> nn.Module:
        import torch_geometric.nn.models as models

        kw = dict(kwargs)
        if cls_name == "PNA":
            kw.update(aggregators=["mean", "min", "max", "std"],
                      scalers=["identity", "amplification", "attenuation"],
                      deg=_degree_histogram())
        return getattr(models, cls_name)(IN, HIDDEN, out_channels=OUT, **kw)

    return Case(name, "model", build, inputs, _model_output,
                ", ".join(f"{k}={v}" for k, v in kwargs.items()))


def model_cases() -> list[Case]:
    c = _model_case
    return [
        c("GCN", "GCN", num_layers=2),
        c("GCN[norm=batch_norm]", "GCN", num_layers=3, norm="batch_norm"),
        c("GCN[jk=cat]", "GCN", num_layers=3, jk="cat"),
        c("GraphSAGE", "GraphSAGE", num_layers=2),
        c("GraphSAGE[norm=layer_norm+jk=max]", "GraphSAGE", num_layers=3, norm="layer_norm",
          jk="max"),
        c("GraphSAGE[norm=layer_norm(node)]", "GraphSAGE", num_layers=3, norm="layer_norm",
          norm_kwargs={"mode": "node"}),
        c("GIN", "GIN", num_layers=2),
        c("GIN[norm=batch_norm+jk=cat]", "GIN", num_layers=3, norm="batch_norm", jk="cat"),
        c("GAT[heads=2]", "GAT", num_layers=2, heads=2),
        c("GAT[v2+heads=2+jk=lstm]", "GAT", num_layers=3, v2=True, heads=2, jk="lstm"),
        c("PNA", "PNA", num_layers=2),
        c("PNA[norm=graph_norm+jk=cat]", "PNA", num_layers=3, norm="graph_norm", jk="cat"),
        c("EdgeCNN", "EdgeCNN", num_layers=2),
        c("EdgeCNN[norm=instance_norm+jk=cat]", "EdgeCNN", num_layers=3, norm="instance_norm",
          jk="cat"),
        Case("GIN-graph-classifier[GraphNorm+add-pool]", "model", GraphClassifier,
             ("x", "edge_index", "batch"), lambda m: m.head,
             "GIN(3 layers, norm=graph_norm) -> global_add_pool -> Linear"),
    ]


def all_cases() -> tuple[list[Case], dict[str, str]]:
    """The cases to run and ``{name: reason}`` for the conv classes that are skipped."""
    import torch_geometric.nn.conv as conv

    cases, skipped = [], {}
    for name in conv.__all__:
        if name in SKIP:
            skipped[name] = SKIP[name]
        elif name in CONVS:
            cases.append(_conv_case(name, CONVS[name]))
        else:
            skipped[name] = ("new in this PyG version: no entry in the benchmark's case table "
                             "(add one to CONVS or SKIP)")
    return cases + model_cases(), skipped


def build_net(case: Case) -> nn.Module:
    """The case's model, deterministic: float64, eval mode, random norm statistics, and random
    values for parameters initialised to a constant (zero biases hide a wrongly sliced bias)."""
    from structprune.testing import randomize_

    torch.manual_seed(0)
    net = case.build().double().eval()
    randomize_(net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                base = 1.0 if (p.dim() == 1 and float(p.flatten()[0]) != 0.0) else 0.0
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 + base)
    return net


# ------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------
class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Raise :class:`CaseTimeout` after ``seconds`` (SIGALRM; main thread on Unix only)."""
    usable = (seconds and hasattr(signal, "SIGALRM")
              and __import__("threading").current_thread() is __import__("threading").main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case timed out after {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _err(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/structprune/" in f.filename]
    where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name}" \
        if ours else None
    return {"type": type(exc).__name__, "message": str(exc)[:1500], "where": where,
            "traceback_tail": traceback.format_exception(
                type(exc), exc, exc.__traceback__)[-4:]}


def _short(e: Optional[dict], lines: int = 1) -> str:
    """``Type: message`` from its first ``lines`` lines (joined by `` / ``), cut to 300/line."""
    if not e:
        return ""
    text = re.sub(r"\S*/site-packages/", "", e.get("message") or "")
    msg = [m.strip()[:300] for m in text.strip().splitlines()[:lines]]
    return f"{e['type']}: {' / '.join(m for m in msg if m)}"


def _implied(reason: str) -> bool:
    """Frozen entries any pruning with an ignored output layer has."""
    return reason == "ignored by the user" or "model output keeps its shape" in reason


def _about_input(reason: str, inputs: set[str]) -> bool:
    """``the size of dim K of %x is used as a value by ...`` with ``x`` a model input."""
    m = re.match(r"the size of dim \d+ of %(\w+) is used", reason)
    return bool(m and m.group(1) in inputs)


def _norm_reason(reason: str) -> str:
    """A reason without the node names it mentions, to group equal reasons across cases."""
    return re.sub(r"%[\w.]+", "%_", reason)


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _out_shapes(out: Any) -> list[list[int]]:
    from structprune.oracle import flatten_outputs

    return [list(t.shape) for t in flatten_outputs(out)]


def run_case(case: Case, tol: float = 1e-6, onnx: bool = True, tp: bool = True,
             timeout: Optional[float] = 120.0) -> dict[str, Any]:
    """Run one case; never raises. Returns the row (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_case(case, tol, onnx, tp, timeout)


def _run_case(case: Case, tol: float, onnx: bool, tp: bool,
              timeout: Optional[float]) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": case.name, "kind": case.kind, "note": case.note,
                           "inputs": list(case.inputs), "status": "failed", "stage": None}
    t0 = time.perf_counter()
    try:
        with time_limit(timeout):
            _run_structprune(case, rec, tol, onnx)
    except Exception as e:  # one case never stops the run
        rec["status"] = "failed"
        rec["error"] = _err(e)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if tp and rec["status"] != "skipped":
        t1 = time.perf_counter()
        try:
            # Shorter: Torch-Pruning can loop while its memory grows (NNConv: ~4.5 GB in 60 s).
            with time_limit(min(timeout, TP_TIMEOUT) if timeout else TP_TIMEOUT):
                rec["tp"] = run_torch_pruning(case)
        except Exception as e:
            rec["tp"] = {"status": "timeout" if isinstance(e, CaseTimeout) else "raised",
                         "error": _err(e)}
        rec["tp"]["seconds"] = round(time.perf_counter() - t1, 2)
    return rec


def _run_structprune(case: Case, rec: dict[str, Any], tol: float, onnx: bool) -> None:
    import structprune as sp
    from structprune.graph.shapes import placeholder_values
    from structprune.oracle import MaskedInterpreter, masked_output, max_rel_diff
    from structprune.plan import count_macs

    small, big = make_graph(*SMALL), make_graph(*BIG)
    args, big_args = graph_inputs(small, case.inputs), graph_inputs(big, case.inputs)

    rec["stage"] = "build"
    try:
        net = build_net(case)
        with torch.no_grad():
            want_small, want_big = net(*args), net(*big_args)
    except Exception as e:
        rec["status"] = "skipped"
        rec["skip_reason"] = f"the unpruned net does not run here: {_short(_err(e))}"
        rec["stage"] = None
        return
    rec["out_shape"] = _out_shapes(want_small)
    rec["params_before"] = _nparams(net)

    rec["stage"] = "trace"
    pruner = sp.Pruner(net, args, ratio=RATIO, importance="l2", ignore=[case.output(net)])
    graph = pruner.graph
    gm = graph.graph_module
    rec["capture"] = "export" if any(
        n.op == "call_function" and str(n.target).startswith("aten.")
        for n in gm.graph.nodes) else "fx"
    frozen = graph.frozen()
    rec["groups"] = len(graph.groups())
    rec["units"] = int(sum(g.num_units for g in graph.groups()))
    # Entries about the size of a model input's dims (nodes, edges, input features, checked by
    # PyG's asserts or used by arange) explain nothing: model inputs are never pruned.
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    own = [e for e in frozen if not _implied(e.reason) and not _about_input(e.reason, inputs)]
    rec["frozen"] = [{"node": e.node, "op": e.op, "reason": e.reason} for e in own]
    rec["frozen_input_dim_entries"] = sum(1 for e in frozen if _about_input(e.reason, inputs))
    rec["frozen_ops"] = sorted({e.op for e in own})

    rec["stage"] = "plan"
    plan = pruner.plan()
    rec["units_dropped"] = int(plan.num_dropped())
    macs_before = count_macs(plan.graph)
    macs_after = count_macs(plan.graph, plan.new_sizes())
    rec["macs_before"], rec["macs_after"] = int(macs_before), int(macs_after)

    rec["stage"] = "apply"
    pruned = pruner.apply(plan)
    rec["params_after"] = _nparams(pruned)
    rec["returned"] = ("GraphModule" if isinstance(pruned, torch.fx.GraphModule)
                       else type(pruned).__name__)

    rec["stage"] = "oracle"
    with torch.no_grad():
        got = pruned(*args)
    want = masked_output(plan.graph, plan)
    rec["oracle_max_rel_diff"] = max_rel_diff(got, want)
    rec["oracle_equal"] = bool(rec["oracle_max_rel_diff"] <= tol)

    # Another graph size: does the pruned model run, and does it still equal the masked
    # original there (the captured graph run on the larger graph, when it can)?
    rec["stage"] = "any-size"
    try:
        with torch.no_grad():
            got_big = pruned(*big_args)
        rec["big_graph_runs"] = True
        rec["big_graph_shape_ok"] = _out_shapes(got_big) == _out_shapes(want_big)
    except Exception as e:
        rec["big_graph_runs"] = False
        rec["big_graph_error"] = _err(e)
        got_big = None
    if got_big is not None:
        try:
            interp = MaskedInterpreter(gm, plan.activation_masks_all())
            with torch.no_grad():
                ref_big = interp.run(*placeholder_values(gm, big_args, {}))
            rec["oracle_big_max_rel_diff"] = max_rel_diff(got_big, ref_big)
            rec["oracle_big_equal"] = bool(rec["oracle_big_max_rel_diff"] <= tol)
        except Exception as e:  # the captured original is specialised to the example graph
            rec["oracle_big"] = f"n/a: {_short(_err(e))}"
        if plan.is_empty:  # nothing pruned: the result must equal the model itself
            d = max_rel_diff(got_big, want_big)
            rec["oracle_big_max_rel_diff"] = max(d, rec.get("oracle_big_max_rel_diff") or 0.0)
            rec["oracle_big_equal"] = bool(rec["oracle_big_max_rel_diff"] <= tol)

    removed = rec["params_after"] < rec["params_before"]
    wrong = (not rec["oracle_equal"]) or rec.get("oracle_big_equal") is False \
        or rec.get("big_graph_shape_ok") is False
    if wrong:
        rec["status"] = "SILENTLY-WRONG"
    elif removed:
        rec["status"] = "pruned"
    else:
        rec["status"] = "frozen" if own else "nothing-pruned"

    if onnx:
        # On a float32 pruning of the same net: an export-captured graph bakes the example
        # inputs' dtype into ops such as aten.ones(dtype=float64), so ``.float()`` on the float64
        # result would measure that, not the export of message passing.
        rec["stage"] = "onnx"
        net32 = build_net(case).float()
        a32, b32 = (graph_inputs(small, case.inputs, torch.float32),
                    graph_inputs(big, case.inputs, torch.float32))
        with _quiet():
            pruned32 = sp.prune(net32, a32, ratio=RATIO, importance="l2",
                                ignore=[case.output(net32)])
            rec["onnx"] = onnx_check(pruned32, case.inputs, a32, b32)
            if rec["onnx"].get("exporter") != "dynamo" and rec["onnx"].get("big") != "pass":
                # "auto" exports with TorchScript first, whose tracer turns the sizes a captured
                # graph reads into constants; does the dynamo exporter keep them symbolic?
                o = onnx_check(pruned32, case.inputs, a32, b32, exporter="dynamo")
                rec["onnx"]["dynamo"] = _onnx_cell(o) + (
                    f" ({o.get('error') or o.get('big_error') or o.get('small_error')})"
                    if _onnx_cell(o) != "pass/pass" else "")
            if "pass" != rec["onnx"].get("big") or "pass" != rec["onnx"].get("small"):
                # Does the unpruned net fail the same way? Then capture/export is at fault,
                # not the pruning.
                o = onnx_check(net32, case.inputs, a32, b32)
                rec["onnx"]["unpruned"] = f"{_onnx_cell(o)}" + (
                    f" ({o.get('error') or o.get('big_error') or o.get('small_error')})"
                    if _onnx_cell(o) != "pass/pass" else "")
    rec["stage"] = None


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence stdout/stderr, including C++ writers (the ONNX exporters and onnxruntime print)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def onnx_check(model: nn.Module, names: tuple[str, ...], args: tuple, big_args: tuple,
               rtol: float = 1e-3, atol: float = 1e-4, exporter: str = "auto") -> dict[str, Any]:
    """Export with dynamic node/edge axes (``sp.export_onnx``, checked on the example graph),
    then run onnxruntime on the larger graph and compare with torch there."""
    import numpy as np

    from structprune import export_onnx

    out: dict[str, Any] = {"export": None, "small": None, "big": None}
    axes = {i: INPUT_AXES[n] for i, n in enumerate(names)}
    f32 = lambda a: tuple(t.float() if t.is_floating_point() else t for t in a)  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        try:
            res = export_onnx(model, f32(args), path, check=True, dynamic_axes=axes,
                              exporter=exporter)
            out.update(export="ok", exporter=res.exporter, small="pass",
                       small_max_abs_diff=res.max_abs_diff)
        except Exception as e:
            msg = str(e)
            if os.path.exists(path) and "onnxruntime" in msg:
                out.update(export="ok", small="fail", small_error=_short(_err(e)))
            else:
                out.update(export="fail", error=_short(_err(e)))
                return out
        try:
            import onnxruntime as ort

            from structprune.oracle import flatten_outputs

            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), f32(big_args))}
            got = sess.run(None, feeds)
            m = copy.deepcopy(model).float().eval()
            with torch.no_grad():
                want = [t.numpy() for t in flatten_outputs(m(*f32(big_args)))]
            if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
                out.update(big="fail", big_error=f"shapes: onnxruntime "
                           f"{[g.shape for g in got]}, torch {[w.shape for w in want]}")
            else:
                worst = max((float(np.abs(g - w).max()) for g, w in zip(got, want) if w.size),
                            default=0.0)
                scale = max((float(np.abs(w).max()) for w in want if w.size), default=0.0)
                out["big_max_abs_diff"] = worst
                out["big"] = "pass" if worst <= atol + rtol * scale else "fail"
        except Exception as e:
            out.update(big="fail", big_error=_short(_err(e)))
    return out


# ------------------------------------------------------------------------------------------------
# Torch-Pruning side by side
# ------------------------------------------------------------------------------------------------
def torch_pruning_version() -> Optional[str]:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return getattr(tp, "__version__", "?")


def run_torch_pruning(case: Case) -> dict[str, Any]:
    """``tp.pruner.MetaPruner`` (L2 magnitude, ratio 0.5, the same output module ignored) on an
    identical copy; what it removes and whether the result still runs with the original output
    shapes on the example graph and on the larger one."""
    try:
        import torch_pruning as tp
    except ImportError:
        return {"status": "not-installed"}
    small, big = make_graph(*SMALL), make_graph(*BIG)
    args, big_args = graph_inputs(small, case.inputs), graph_inputs(big, case.inputs)
    net = build_net(case)
    with torch.no_grad():
        shapes_small, shapes_big = _out_shapes(net(*args)), _out_shapes(net(*big_args))
    before = {k: tuple(p.shape) for k, p in net.named_parameters()}
    rec: dict[str, Any] = {"params_before": _nparams(net)}
    try:
        pruner = tp.pruner.MetaPruner(
            net, example_inputs=args, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=RATIO, ignored_layers=[case.output(net)])
        pruner.step()
    except CaseTimeout:
        raise
    except Exception as e:
        rec.update(status="raised", error=_err(e))
        return rec
    rec["params_after"] = _nparams(net)
    after = {k: tuple(p.shape) for k, p in net.named_parameters()}
    rec["changed"] = {k: [list(before[k]), list(v)] for k, v in after.items()
                      if k in before and before[k] != v}
    for label, a, shapes in (("small", args, shapes_small), ("big", big_args, shapes_big)):
        try:
            with torch.no_grad():
                ok = _out_shapes(net(*a)) == shapes
            rec[f"{label}_shape_ok"] = ok
        except Exception as e:
            rec[f"{label}_shape_ok"] = False
            rec[f"{label}_error"] = _short(_err(e))
    removed = rec["params_after"] < rec["params_before"]
    runs = rec["small_shape_ok"] and rec["big_shape_ok"]
    rec["status"] = ("pruned" if removed and runs else "broken" if removed
                     else "nothing-pruned" if runs else "broken")
    return rec


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _pct(a: Optional[int], b: Optional[int]) -> str:
    return "-" if a is None or not b else f"{100.0 * a / b:.0f}%"


def _fmt_diff(d: Optional[float]) -> str:
    return "-" if d is None else f"{d:.0e}"


def _onnx_cell(o: Optional[dict]) -> str:
    if not o:
        return "-"
    cell = ("export fail" if o.get("export") != "ok"
            else f"{o.get('small', '-')}/{o.get('big', '-')}")
    if o.get("dynamo"):
        cell += f"; dynamo {o['dynamo'].split(' ')[0]}"
    if o.get("unpruned"):
        cell += f"; unpruned {o['unpruned'].split(' ')[0]}"
    return cell


def _note(r: dict[str, Any]) -> str:
    if r["status"] == "skipped":
        return r.get("skip_reason", "")
    if r.get("error"):
        return f"[{r.get('stage')}] {_short(r['error'], 3)}"
    bits = []
    if r.get("big_graph_runs") is False:
        bits.append(f"bigger graph: {_short(r.get('big_graph_error'))[:110]}")
    o = r.get("onnx") or {}
    if o.get("export") == "fail":
        bits.append(f"onnx: {o.get('error', '')[:110]}")
    elif o.get("big") == "fail":
        bits.append(f"onnx bigger graph: {str(o.get('big_error', 'values differ'))[:110]}")
    if r.get("frozen_ops"):
        bits.append("frozen: " + ", ".join(r["frozen_ops"][:6])
                    + (" ..." if len(r["frozen_ops"]) > 6 else ""))
    return "; ".join(bits)


def _tp_cells(t: Optional[dict]) -> tuple[str, str, str]:
    if not t:
        return "-", "-", "-"
    if t["status"] in ("raised", "timeout", "not-installed"):
        return t["status"], "-", "-"
    shp = "yes" if t.get("small_shape_ok") and t.get("big_shape_ok") else (
        "small only" if t.get("small_shape_ok") else "no")
    return t["status"], _pct(t.get("params_after"), t.get("params_before")), shp


def _esc(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def summarize(rows: list[dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    ran = [r for r in rows if r["status"] != "skipped"]
    st = Counter(r["status"] for r in rows)
    pruned = [r for r in ran if r["status"] == "pruned"]
    pr = [100.0 * (1 - r["params_after"] / r["params_before"]) for r in pruned]
    mr = [100.0 * (1 - r["macs_after"] / r["macs_before"]) for r in pruned if r.get("macs_before")]
    onnx_ok = lambda r: (r.get("onnx") or {}).get("small") == "pass"  # noqa: E731
    onnx_big = lambda r: (r.get("onnx") or {}).get("big") == "pass"  # noqa: E731
    tp = [r["tp"] for r in ran if "tp" in r]
    tps = Counter(t["status"] for t in tp)
    n_conv = sum(1 for r in rows if r["kind"] == "conv") + len(skipped)
    return {
        "conv_classes": n_conv,
        "conv_classes_skipped_by_table": len(skipped),
        "cases": len(rows),
        "cases_run": len(ran),
        "skipped_at_run_time": st["skipped"],
        "pruned": len(pruned),
        "pruned_pct_of_run": round(100.0 * len(pruned) / len(ran), 1) if ran else 0.0,
        "oracle_equal": sum(1 for r in ran if r.get("oracle_equal")),
        "oracle_equal_bigger_graph": sum(1 for r in ran if r.get("oracle_big_equal")),
        "runs_on_bigger_graph": sum(1 for r in ran if r.get("big_graph_runs")),
        "onnx_equal": sum(1 for r in ran if onnx_ok(r)),
        "onnx_equal_bigger_graph": sum(1 for r in ran if onnx_big(r)),
        "onnx_equal_pruned": sum(1 for r in pruned if onnx_ok(r) and onnx_big(r)),
        "onnx_equal_bigger_graph_with_dynamo_retry": sum(
            1 for r in ran if onnx_big(r) or (r.get("onnx") or {}).get("dynamo") == "pass/pass"),
        "frozen_with_reason": st["frozen"],
        "nothing_pruned_no_reason": st["nothing-pruned"],
        "failed": st["failed"],
        "SILENTLY_WRONG": st["SILENTLY-WRONG"],
        "SILENTLY_WRONG_cases": [r["name"] for r in rows if r["status"] == "SILENTLY-WRONG"],
        "param_reduction_pct_median": round(statistics.median(pr), 1) if pr else None,
        "mac_reduction_pct_median": round(statistics.median(mr), 1) if mr else None,
        "torch_pruning": dict(tps),
        "torch_pruning_shapes_survive": sum(1 for t in tp if t.get("small_shape_ok")
                                            and t.get("big_shape_ok")),
        "torch_pruning_removed_params": sum(1 for t in tp if t.get("params_after") is not None
                                            and t["params_after"] < t["params_before"]),
    }


def frozen_by_op(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{op, reason, cases}]``: the distinct frozen reasons, by op, with the cases naming them."""
    agg: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        for e in r.get("frozen", []):
            agg.setdefault((e["op"], _norm_reason(e["reason"])), set()).add(r["name"])
    stuck = {r["name"] for r in rows if r["status"] in ("frozen", "nothing-pruned")}
    out = [{"op": op, "reason": reason, "cases": sorted(names),
            "cases_pruning_nothing": sorted(names & stuck)}
           for (op, reason), names in agg.items()]
    return sorted(out, key=lambda d: (-len(d["cases_pruning_nothing"]), -len(d["cases"]),
                                      d["op"]))


def errors_by_kind(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Structprune errors and any-size / ONNX failures, grouped by their first line."""
    agg: dict[tuple[str, str], set[str]] = {}

    def add(kind: str, msg: str, name: str) -> None:
        msg = re.sub(r"/tmp/\S+", "FILE", msg)
        msg = re.sub(r"\d+", "N", msg)[:600]
        agg.setdefault((kind, msg), set()).add(name)

    for r in rows:
        if r.get("error"):
            add(f"structprune [{r.get('stage')}]", _short(r["error"], 4), r["name"])
        if r.get("big_graph_error"):
            add("pruned model on a bigger graph", _short(r["big_graph_error"]), r["name"])
        o = r.get("onnx") or {}
        if o.get("export") == "fail":
            add("onnx export", o.get("error", ""), r["name"])
        if o.get("small") == "fail":
            add("onnx on the example graph", o.get("small_error", ""), r["name"])
        if o.get("big") == "fail":
            add("onnx on a bigger graph", o.get("big_error", "values differ"), r["name"])
    return sorted(({"kind": k, "message": m, "cases": sorted(v)} for (k, m), v in agg.items()),
                  key=lambda d: (d["kind"], -len(d["cases"])))


def markdown(data: dict[str, Any]) -> str:
    rows, s = data["results"], data["summary"]
    lines = [
        "# structprune on PyTorch Geometric: coverage",
        "",
        f"torch {data['torch']}, torch_geometric {data['torch_geometric']}, structprune "
        f"{data['structprune_rev']}, Torch-Pruning {data['torch_pruning'] or 'not installed'}. "
        f"Ratio {RATIO}, L2 magnitude, output layer ignored; pruned on a random graph of "
        f"{SMALL[0]} nodes / {SMALL[1]} edges / {IN} features, checked again on {BIG[0]} nodes / "
        f"{BIG[1]} edges. Generated by `python benchmarks/gnn_coverage.py`.",
        "",
        "## Summary",
        "",
        f"- conv classes in `torch_geometric.nn.conv.__all__`: {s['conv_classes']} "
        f"({s['conv_classes_skipped_by_table']} skipped by the case table, reasons below); "
        f"cases run: {s['cases_run']} of {s['cases']} ({s['skipped_at_run_time']} skipped at run "
        f"time: the unpruned net does not run here)",
        f"- **pruned: {s['pruned']}** ({s['pruned_pct_of_run']}% of the cases run) | "
        f"frozen with reason: {s['frozen_with_reason']} | nothing pruned, no reason: "
        f"{s['nothing_pruned_no_reason']} | failed: {s['failed']} | "
        f"**SILENTLY WRONG: {s['SILENTLY_WRONG']}**"
        + (f" ({', '.join(s['SILENTLY_WRONG_cases'])})" if s["SILENTLY_WRONG_cases"] else ""),
        f"- oracle-equal: {s['oracle_equal']} on the example graph, "
        f"{s['oracle_equal_bigger_graph']} on the bigger graph; the result runs on the bigger "
        f"graph: {s['runs_on_bigger_graph']}",
        f"- ONNX-equal (onnxruntime vs torch): {s['onnx_equal']} on the example graph, "
        f"{s['onnx_equal_bigger_graph']} on the bigger graph; pruned and ONNX-equal on both: "
        f"{s['onnx_equal_pruned']}; on the bigger graph when a failure is retried with "
        f"`exporter=\"dynamo\"`: {s['onnx_equal_bigger_graph_with_dynamo_retry']}",
        f"- pruned cases: median parameter reduction {s['param_reduction_pct_median']}%, "
        f"median MAC reduction {s['mac_reduction_pct_median']}%",
        f"- Torch-Pruning: {s['torch_pruning']}; removed parameters in "
        f"{s['torch_pruning_removed_params']}, output shapes survive (both graphs) in "
        f"{s['torch_pruning_shapes_survive']}",
        "",
        "Columns: *params* / *MACs* kept = after / before; *oracle* = max relative difference from "
        "the masked original (example graph / bigger graph); *ONNX* = onnxruntime parity on the "
        "example graph / on the bigger graph (export_onnx's default exporter, TorchScript first; "
        "*dynamo* = the same with `exporter=\"dynamo\"` where that failed; *unpruned* = the "
        "unpruned net with the default exporter); TP = Torch-Pruning, *shapes* = its pruned model "
        "runs with the original output shapes on both graphs.",
        "",
        "| case | status | groups | params kept | MACs kept | oracle | ONNX | note | "
        "TP | TP params kept | TP shapes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        st = f"**{r['status']}**" if r["status"] == "SILENTLY-WRONG" else r["status"]
        orc = "-" if r.get("oracle_max_rel_diff") is None else (
            f"{_fmt_diff(r['oracle_max_rel_diff'])} / "
            f"{_fmt_diff(r.get('oracle_big_max_rel_diff'))}")
        lines.append("| " + " | ".join([
            r["name"], st, str(r.get("groups", "-")),
            _pct(r.get("params_after"), r.get("params_before")),
            _pct(r.get("macs_after"), r.get("macs_before")), orc, _onnx_cell(r.get("onnx")),
            _esc(_note(r))[:400], *_tp_cells(r.get("tp"))]) + " |")
    lines += ["", "## Skipped by the case table", ""]
    lines += [f"- `{k}`: {v}" for k, v in data["skipped"].items()]
    lines += ["", "## Frozen reasons by op (what needs a rule next)", "",
              "Every distinct (op, reason) of the frozen entries, node names removed (entries "
              "about "
              "the sizes of the model's inputs - node, edge and input-feature counts read by PyG's "
              "asserts or by arange - are left out: inputs are never pruned). *stuck* = "
              "cases that prune nothing and name it (sorted by these); *all* = every case naming "
              "it, pruned or not (the node/edge-count dims of a pruned net are frozen too).", "",
              "| op | reason | stuck | all | stuck cases |", "| --- | --- | --- | --- | --- |"]
    for d in data["frozen_by_op"]:
        st = d["cases_pruning_nothing"]
        lines.append(f"| `{d['op']}` | {_esc(d['reason'])[:200]} | {len(st)} | "
                     f"{len(d['cases'])} | {', '.join(st[:10])}{' ...' if len(st) > 10 else ''} |")
    lines += ["", "## Errors and failed checks", "", "| where | message | cases |",
              "| --- | --- | --- |"]
    for d in data["errors"]:
        lines.append(f"| {d['kind']} | {_esc(d['message'])} | {len(d['cases'])}: "
                     f"{', '.join(d['cases'][:8])}{' ...' if len(d['cases']) > 8 else ''} |")
    tp_rows = [r for r in rows if (r.get("tp") or {}).get("changed")]
    if tp_rows:
        lines += ["", "## What Torch-Pruning removed", ""]
        for r in tp_rows:
            ch = r["tp"]["changed"]
            lines.append(f"- {r['name']}: " + ", ".join(
                f"`{k}` {tuple(a)}->{tuple(b)}" for k, (a, b) in list(ch.items())[:6])
                + (f" (+{len(ch) - 6} more)" if len(ch) > 6 else ""))
    return "\n".join(lines) + "\n"


def _git_rev() -> str:
    sys.path.insert(0, HERE)
    from _common import git_rev

    return git_rev()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Prune every torch_geometric.nn.conv class in a "
                                 "2-layer net and PyG's ready models by 50%; oracle, ONNX on "
                                 "another graph size, frozen reasons, Torch-Pruning side by side.")
    ap.add_argument("--only", default=None, help="comma-separated case names (e.g. GCNConv,GAT)")
    ap.add_argument("--no-tp", action="store_true", help="do not run Torch-Pruning")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX checks")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help=f"seconds per case for structprune (default 120; Torch-Pruning gets "
                         f"at most {TP_TIMEOUT:.0f})")
    ap.add_argument("--tol", type=float, default=1e-6, help="oracle tolerance (float64)")
    ap.add_argument("--json", "--out", dest="json",
                    default=os.path.join(RESULTS, "gnn_coverage.json"),
                    help="JSON output path (default benchmarks/results/gnn_coverage.json)")
    ap.add_argument("--md", default=os.path.join(RESULTS, "gnn_coverage.md"),
                    help="markdown output path (default benchmarks/results/gnn_coverage.md)")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    import torch_geometric

    torch.set_num_threads(1)
    cases, skipped = all_cases()
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in {c.name for c in cases} and n not in skipped]
        if unknown:
            ap.error(f"unknown case(s): {', '.join(unknown)}; cases are: "
                     f"{', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in want]
        skipped = {k: v for k, v in skipped.items() if k in want}
    tpv = None if args.no_tp else torch_pruning_version()
    if not args.no_tp and tpv is None:
        print("torch_pruning not installed (pip install torch-pruning --no-deps): "
              "running structprune only", file=sys.stderr)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows = []
    it = tqdm(cases, unit="case", file=sys.stderr) if tqdm else cases
    for case in it:
        if tqdm:
            it.set_postfix_str(case.name[:30])
        row = run_case(case, tol=args.tol, onnx=not args.no_onnx,
                       tp=not args.no_tp and tpv is not None, timeout=args.timeout)
        if row["status"] == "SILENTLY-WRONG":
            msg = (f"!!! SILENTLY WRONG: {case.name}: oracle max rel diff "
                   f"{row.get('oracle_max_rel_diff')} (bigger graph "
                   f"{row.get('oracle_big_max_rel_diff')})")
            (it.write if tqdm else print)(msg)
        rows.append(row)
    data = {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
            "torch_pruning": tpv, "structprune_rev": _git_rev(), "ratio": RATIO,
            "importance": "l2", "graph": {"small": SMALL, "big": BIG, "features": IN},
            "summary": summarize(rows, skipped), "skipped": skipped,
            "frozen_by_op": frozen_by_op(rows), "errors": errors_by_kind(rows), "results": rows}
    for path, text in ((args.json, json.dumps(data, indent=1, default=str)),
                       (args.md, markdown(data))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    s = data["summary"]
    print(f"\nSUMMARY: {s['cases_run']}/{s['cases']} cases run | pruned {s['pruned']} | "
          f"oracle-equal {s['oracle_equal']} | ONNX-equal {s['onnx_equal']} (bigger graph "
          f"{s['onnx_equal_bigger_graph']}) | frozen-with-reason {s['frozen_with_reason']} | "
          f"nothing-pruned {s['nothing_pruned_no_reason']} | failed {s['failed']} | "
          f"SILENTLY WRONG {s['SILENTLY_WRONG']} | skipped {s['skipped_at_run_time']} + "
          f"{s['conv_classes_skipped_by_table']} by table | TP {s['torch_pruning']}")
    if s["SILENTLY_WRONG"]:
        print(f"!!! SILENTLY WRONG: {', '.join(s['SILENTLY_WRONG_cases'])}")
    print(f"wrote {args.json} and {args.md}")
    return 1 if s["SILENTLY_WRONG"] else 0


if __name__ == "__main__":
    sys.exit(main())
