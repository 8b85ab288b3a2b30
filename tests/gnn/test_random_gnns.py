"""Hypothesis draws random PyTorch Geometric GNNs: each is pruned exactly or refused clearly.

A drawn model has 1-3 message-passing layers from a pool of PyG convs (GAT-style convs with 1-3
heads, ``concat`` on or off), random widths, a norm and an activation per layer, residual adds
(direct or through a ``Linear``) or concatenations with the layer's input, optional
``JumpingKnowledge``, and either a node-level head or, for graph classification, a ``batch``
vector with global pooling and a ``Linear`` head. Each example, in float64:

- prunes at a random ratio with a random importance; the pruned model equals the original with the
  removed channels zeroed (the oracle), or structprune refuses with one of its own errors naming
  the culprit and leaves the model as it was;
- the pruned model also equals the masked original on a second random graph of another size
  (another number of nodes, edges and graphs);
- on a subsample, ``ratio=0`` gives a bit-identical model.

Across the run most examples must really prune something (a generator whose models all freeze
would make the property vacuous).

``MFConv`` (per-degree weights: its shape pass needs data-dependent ops) is not in the pool, to
keep the run short; tests/gnn/test_message_passing.py covers it. ``JumpingKnowledge(mode="lstm")``
prunes the features it reads (the LSTM's hidden units stay whole) and is drawn rarely.
``LayerNorm(mode="graph")`` is drawn everywhere: without a batch vector it reduces with
``aten.std(x, unbiased)``, whose second argument once crashed ``ReduceRule`` (found here).

About 60 s of CPU for the 100 examples (export capture dominates: ~0.4 s per node-level model,
~2 s per graph-level one, which captures twice).
"""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

pyg = pytest.importorskip("torch_geometric")
import torch_geometric.nn as gnn  # noqa: E402

import structprune as sp  # noqa: E402
from structprune.errors import StructpruneError  # noqa: E402
from structprune.oracle import masked_output, max_rel_diff, run  # noqa: E402
from structprune.testing import assert_oracle, assert_zero_ratio_identity  # noqa: E402

TOL = 1e-8


def _mlp(i, o):
    return nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, o))


# name -> (factory(in, out_per_head, heads, concat), takes heads). Each conv here prunes and keeps
# the oracle in a 2-layer net at ratio 0.5.
CONVS = {
    "GCNConv": lambda i, o, h, c: gnn.GCNConv(i, o),
    "SAGEConv_mean": lambda i, o, h, c: gnn.SAGEConv(i, o),
    "SAGEConv_max": lambda i, o, h, c: gnn.SAGEConv(i, o, aggr="max"),
    "GraphConv": lambda i, o, h, c: gnn.GraphConv(i, o),
    "GINConv": lambda i, o, h, c: gnn.GINConv(_mlp(i, o)),
    "GATConv": lambda i, o, h, c: gnn.GATConv(i, o, heads=h, concat=c),
    "GATv2Conv": lambda i, o, h, c: gnn.GATv2Conv(i, o, heads=h, concat=c),
    "TransformerConv": lambda i, o, h, c: gnn.TransformerConv(i, o, heads=h, concat=c),
    "ResGatedGraphConv": lambda i, o, h, c: gnn.ResGatedGraphConv(i, o),
    "LEConv": lambda i, o, h, c: gnn.LEConv(i, o),
    "ClusterGCNConv": lambda i, o, h, c: gnn.ClusterGCNConv(i, o),
    "TAGConv": lambda i, o, h, c: gnn.TAGConv(i, o, K=2),
    "SGConv": lambda i, o, h, c: gnn.SGConv(i, o, K=2),
    "ChebConv": lambda i, o, h, c: gnn.ChebConv(i, o, K=2),
    "GENConv": lambda i, o, h, c: gnn.GENConv(i, o),
    "GeneralConv": lambda i, o, h, c: gnn.GeneralConv(i, o),
}
HEADED = {"GATConv", "GATv2Conv", "TransformerConv"}

# name -> (factory(channels), takes the batch vector)
NORMS = {
    "BatchNorm": (lambda c: gnn.BatchNorm(c), False),
    "LayerNorm_node": (lambda c: gnn.LayerNorm(c, mode="node"), True),
    "LayerNorm_graph": (lambda c: gnn.LayerNorm(c, mode="graph"), True),
    "GraphNorm": (lambda c: gnn.GraphNorm(c), True),
    "InstanceNorm": (lambda c: gnn.InstanceNorm(c, affine=True), True),
    "PairNorm": (lambda c: gnn.PairNorm(), True),
    "nn.LayerNorm": (lambda c: nn.LayerNorm(c), False),
}
ACTS = {"relu": F.relu, "elu": F.elu, "tanh": torch.tanh, "leaky_relu": F.leaky_relu,
        "gelu": F.gelu, "none": lambda t: t}
POOLS = {"add": gnn.global_add_pool, "mean": gnn.global_mean_pool, "max": gnn.global_max_pool}


class RandomGNN(nn.Module):
    """Interprets a spec drawn by :func:`gnns`.

    ``layers``: one dict per message-passing layer with ``conv``, ``width`` (per head),
    ``heads``, ``concat``, ``norm``, ``act`` and ``skip`` (``none``, ``add``: ``h + h_prev``,
    ``linear``: ``h + Linear(h_prev)``, ``cat``: ``[h, h_prev]``).
    """

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.convs, self.norms, self.projs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = spec["in_feats"]
        outs = []
        for layer in spec["layers"]:
            o = layer["width"] * (layer["heads"] if layer["concat"] else 1)
            self.convs.append(CONVS[layer["conv"]](c, layer["width"], layer["heads"],
                                                   layer["concat"]))
            self.norms.append(NORMS[layer["norm"]][0](o) if layer["norm"] else nn.Identity())
            self.projs.append(nn.Linear(c, o) if layer["skip"] == "linear" else nn.Identity())
            c = o + c if layer["skip"] == "cat" else o
            outs.append(c)
        self.jk = None
        if spec["jk"] == "cat":
            self.jk = gnn.JumpingKnowledge("cat")
            c = sum(outs)
        elif spec["jk"] == "max":
            self.jk = gnn.JumpingKnowledge("max")
        elif spec["jk"] == "lstm":
            self.jk = gnn.JumpingKnowledge("lstm", channels=c, num_layers=len(outs))
        self.head = nn.Linear(c, spec["n_out"])

    def forward(self, x, edge_index, batch=None):
        h, hs = x, []
        for layer, conv, norm, proj in zip(self.spec["layers"], self.convs, self.norms,
                                           self.projs):
            y = conv(h, edge_index)
            if layer["norm"]:
                y = norm(y, batch) if NORMS[layer["norm"]][1] else norm(y)
            y = ACTS[layer["act"]](y)
            if layer["skip"] == "add":
                y = y + h
            elif layer["skip"] == "linear":
                y = y + proj(h)
            elif layer["skip"] == "cat":
                y = torch.cat([y, h], dim=-1)
            hs.append(y)
            h = y
        if self.jk is not None:
            h = self.jk(hs)
        if self.spec["pool"] is not None:
            h = POOLS[self.spec["pool"]](h, batch)
        return self.head(h)


@st.composite
def gnns(draw):
    """A spec for :class:`RandomGNN`: 1-3 layers, widths 4-24, heads 1-3."""
    # Graph-level models cost two captures (non-strict export meets ``int(batch.max()) + 1``,
    # strict export takes it): about a quarter of the examples. (Not ``== 0``: hypothesis
    # draws the smallest integer far more often than the others.)
    graph_level = draw(st.integers(0, 3)) == 3
    jk = draw(st.sampled_from([None, None, None, None, "cat", "cat", "max", "max", "lstm"]))
    same = jk in ("max", "lstm")  # every layer's output must have the same size
    if jk == "lstm":  # frozen as a whole (see the module docstring): keep the model small
        n_layers = 2
    else:
        n_layers = draw(st.sampled_from([1, 2, 2, 3]))
    in_feats = draw(st.integers(3, 8))
    shared_width = draw(st.integers(4, 24))
    norms = sorted(NORMS)
    layers, c = [], in_feats
    for _ in range(n_layers):
        conv = draw(st.sampled_from(sorted(CONVS)))
        heads = draw(st.integers(1, 3)) if conv in HEADED else 1
        concat = draw(st.booleans()) if conv in HEADED and not same else False
        width = shared_width if same else draw(st.integers(4, 24))
        o = width * (heads if concat else 1)
        skips = ["none", "none", "linear"] + (["add"] if o == c else []) + \
            ([] if same else ["cat"])
        layers.append(dict(conv=conv, width=width, heads=heads, concat=concat,
                           norm=draw(st.sampled_from([None, None] + norms)),
                           act=draw(st.sampled_from(sorted(ACTS))),
                           skip=draw(st.sampled_from(skips))))
        c = o + c if layers[-1]["skip"] == "cat" else o
    pool = draw(st.sampled_from(sorted(POOLS))) if graph_level else None
    return dict(in_feats=in_feats, layers=layers, jk=jk, pool=pool,
                n_out=draw(st.integers(2, 5)))


def random_graph(sizes, feats, seed):
    """Disjoint random graphs of ``sizes`` nodes, ``1-3x`` as many edges each (float64 x)."""
    g = torch.Generator().manual_seed(seed)
    xs, eis, bs, off = [], [], [], 0
    for k, n in enumerate(sizes):
        e = int(torch.randint(n, 3 * n + 1, (1,), generator=g))
        xs.append(torch.randn(n, feats, generator=g, dtype=torch.float64))
        eis.append(torch.randint(0, n, (2, e), generator=g) + off)
        bs.append(torch.full((n,), k))
        off += n
    return torch.cat(xs), torch.cat(eis, 1), torch.cat(bs)


@st.composite
def graphs(draw, graph_level):
    """Example inputs and a second graph of another size (other node, edge and graph counts)."""
    n_graphs = draw(st.integers(1, 4)) if graph_level else 1
    sizes = draw(st.lists(st.integers(5, 20), min_size=n_graphs, max_size=n_graphs))
    other_graphs = draw(st.integers(1, 4)) if graph_level else 1
    other = draw(st.lists(st.integers(5, 20), min_size=other_graphs, max_size=other_graphs)
                 .filter(lambda s: sum(s) != sum(sizes)))
    return sizes, other, draw(st.integers(0, 2 ** 16))


def build(spec, seed):
    """The model, float64, eval mode, with every parameter perturbed (no zero biases, no
    identity norms that would hide a wrongly sliced tensor)."""
    torch.manual_seed(seed)
    model = RandomGNN(spec).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            rv = getattr(m, "running_var", None)
            if isinstance(rv, torch.Tensor):
                m.running_mean.copy_(torch.randn(rv.shape, generator=g, dtype=rv.dtype))
                rv.copy_(torch.rand(rv.shape, generator=g, dtype=rv.dtype) + 0.5)
    return model


def inputs_of(spec, tensors):
    x, ei, batch = tensors
    return (x, ei, batch) if spec["pool"] is not None else (x, ei)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _names_a_culprit(message, model):
    """An error message names a module of the model, a layer class or an op."""
    names = {n for n, _ in model.named_modules() if n} | \
        {type(m).__name__ for m in model.modules()}
    return any(re.search(rf"\b{re.escape(n)}\b", message) for n in names) or \
        re.search(r"\baten\.|\btorch\.|\bop\b", message) is not None


def check_one(spec, sizes, other_sizes, seed, ratio, importance, identity):
    """The properties of one drawn model; returns ``"pruned"``, ``"frozen"`` or ``"refused"``."""
    model = build(spec, seed)
    feats = spec["in_feats"]
    inputs = inputs_of(spec, random_graph(sizes, feats, seed))
    other = inputs_of(spec, random_graph(other_sizes, feats, seed + 1))
    run(model, other)  # the original runs on the other graph: a failure there is the generator's
    before = _state(model)
    try:
        if identity:
            assert_zero_ratio_identity(model, inputs)
        torch.manual_seed(seed)  # "random" importance draws from torch's generator
        pruner = sp.Pruner(model, inputs, ratio=ratio, importance=importance)
        plan = pruner.plan()
        if plan.is_empty:
            # Nothing to drop: no group has a unit to give at this ratio, and every frozen op
            # says why it is frozen.
            groups = pruner.graph.groups()
            assert all(math.floor(g.num_units * ratio + 1e-9) == 0 for g in groups), \
                f"an empty plan at ratio {ratio} with groups of {[g.num_units for g in groups]}"
            assert all(e.reason for e in pruner.graph.frozen()), "a frozen op without a reason"
            return "frozen"
        pruned = assert_oracle(pruner, plan, tol=TOL)
    except StructpruneError as e:
        # In strict mode (the test suite's) a rule that crashes is reported as an error: that is
        # a bug in the rule, not a refusal.
        assert not str(e).startswith("strict mode:"), f"a rule crashed: {e}"
        assert _names_a_culprit(str(e), model), f"error names no module or op: {e}"
        after = _state(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                     for k in before), "a refusal changed the model"
        return "refused"
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before), "pruning changed the input model"
    d = max_rel_diff(run(pruned, other), masked_output(pruner.graph, plan, other))
    assert d <= TOL, f"on a graph of {sum(other_sizes)} nodes the pruned model differs " \
        f"from the masked original by {d:.3e}"
    return "pruned"


EXAMPLES = 100


def test_random_gnns_prune_exactly_on_any_graph():
    outcomes = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(data=st.data(), ratio=st.floats(0.2, 0.7),
           importance=st.sampled_from(["l1", "l2", "random"]), seed=st.integers(0, 2 ** 16),
           identity=st.integers(0, 7))
    def prop(data, ratio, importance, seed, identity):
        spec = data.draw(gnns(), label="spec")
        sizes, other_sizes, gseed = data.draw(graphs(spec["pool"] is not None), label="graphs")
        outcomes.append((check_one(spec, sizes, other_sizes, seed ^ gseed, ratio, importance,
                                   identity == 7), spec))

    prop()
    pruned = sum(1 for o, _ in outcomes if o == "pruned")
    assert len(outcomes) >= EXAMPLES
    # A generator whose models all freeze or all raise would make the property vacuous.
    assert pruned > 0.6 * len(outcomes), \
        f"only {pruned} of {len(outcomes)} drawn GNNs pruned anything " \
        f"({sum(1 for o, _ in outcomes if o == 'refused')} refused, the rest frozen)"
    graph_level = [o for o, s in outcomes if s["pool"] is not None]
    assert sum(1 for o in graph_level if o == "pruned") > 0.3 * len(graph_level)
