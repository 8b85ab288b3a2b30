# ---
# jupytext:
#   text_representation:
#     format_name: percent
# ---
# %% [markdown]
# # GNN sparsification with graph lottery tickets
#
# A *graph lottery ticket* is a subgraph plus a subset of the weights that, trained from the
# same initial weights θ0, classifies about as well as the dense GNN on the whole graph. UGS
# (Chen et al., "A Unified Lottery Ticket Hypothesis for GNNs", ICML 2021) finds one in rounds:
#
# 1. put a trainable soft mask on every directed edge and every weight, train weights and masks
#    together with an L1 penalty on the masks (which pushes unneeded entries towards 0);
# 2. prune the kept edges and weights with the smallest mask values (here 10% of the edges and
#    30% of the weights per round);
# 3. rewind the weights to θ0 and train the sparse network with the masks fixed: that
#    round's ticket and its test accuracy.
#
# `sp.gnn.find_ticket` runs it on sparse edge lists. Here a GCN on Cora (from
# `../shared/data/planetoid` when it is there; otherwise a generated stochastic block model, and
# with `SP_TINY=1`, as the tests run it, a small one with few epochs) is pruned for a few
# rounds, and each ticket is compared with *random* pruning at exactly the same edge and weight
# counts, trained the same way from the same θ0. The plot goes to `tutorials/out/` (or to the
# folder given as first argument or in `SP_OUT`).

# %%
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's models/
import models  # noqa: E402
import structprune as sp  # noqa: E402
from structprune.gnn.masks import count_macs  # noqa: E402

tiny = os.environ.get("SP_TINY") == "1"
torch.manual_seed(0)
torch.set_num_threads(1)
start = time.perf_counter()


def output_dir() -> Path:
    """`SP_OUT`, else the first argument, else tutorials/out/ (git-ignored by its own .gitignore)."""
    arg = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    out = Path(os.environ.get("SP_OUT") or arg or Path(__file__).resolve().parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    if out.name == "out" and not (out / ".gitignore").exists():
        (out / ".gitignore").write_text("*\n")
    return out


def sbm_graph(block_sizes, p_in, p_out, f, signal, seed=0):
    """A stochastic block model: class = block; features = Gaussian noise plus `signal` on the
    class's own coordinate, weak enough that the neighbours' features are needed."""
    from torch_geometric.data import Data
    from torch_geometric.utils import stochastic_blockmodel_graph

    torch.manual_seed(seed)
    k = len(block_sizes)
    probs = [[p_in if i == j else p_out for j in range(k)] for i in range(k)]
    edge_index = stochastic_blockmodel_graph(block_sizes, probs)  # both directions of each edge
    y = torch.cat([torch.full((s,), c) for c, s in enumerate(block_sizes)])
    x = torch.randn(len(y), f)
    x[torch.arange(len(y)), y] += signal
    split = torch.rand(len(y))
    return Data(x=x, edge_index=edge_index, y=y, train_mask=split < 0.2,
                val_mask=(split >= 0.2) & (split < 0.4), test_mask=split >= 0.4)


def load():
    if not tiny:
        try:
            from models import planetoid

            return planetoid.load("Cora"), "Cora"
        except FileNotFoundError:
            return sbm_graph([200] * 5, 0.03, 0.004, 64, 1.0), "a generated 5-block graph"
    return sbm_graph([40] * 3, 0.12, 0.02, 16, 1.0), "a small generated 3-block graph"


data, name = load()
num_classes = int(data.y.max()) + 1
print(f"{name}: {data.num_nodes} nodes, {data.edge_index.shape[1]} directed edges, "
      f"{data.num_features} features, {num_classes} classes")

# UGS's loop is 2 x `epochs` training steps per round; these settings keep the whole tutorial
# to about 2 minutes on one CPU thread on Cora.
rounds, epochs = (2, 30) if tiny else (5, 100)
graph_rate, weight_rate = 0.1, 0.3  # the paper uses 0.05 / 0.2 over 20 rounds
hp = dict(lr=0.01, weight_decay=5e-4)  # Kipf & Welling's GCN settings

# %% [markdown]
# ## The dense baseline
#
# A two-layer GCN (PyG `GCNConv`, hidden 64; `forward(x, edge_index, edge_weight)`: the edge
# mask reaches the normalisation as `edge_weight`). θ0 is its initial state; the dense
# baseline is the same fixed-mask training with nothing pruned.

# %%
model = models.get("gcn", num_features=data.num_features, num_classes=num_classes, hidden=64)
theta0 = {k: v.clone() for k, v in model.state_dict().items()}
names = [n for n, p in model.named_parameters() if p.dim() >= 2]  # what UGS masks: not biases
all_edges = torch.ones(data.edge_index.shape[1], dtype=torch.bool)
all_weights = {n: torch.ones_like(dict(model.named_parameters())[n], dtype=torch.bool) for n in names}
_, dense_acc, dense_state = sp.gnn.train_ticket(model, data, all_edges, all_weights, theta0, epochs, **hp)
model.load_state_dict(dense_state)
dense_macs = count_macs(model, data.x, data.edge_index)
dense_params = sum(p.numel() for p in model.parameters())


def mega(n):
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


print(f"dense GCN: test accuracy {dense_acc:.3f}, {dense_params} params, {mega(dense_macs)} MACs")

# %% [markdown]
# ## A few UGS rounds
#
# `find_ticket` starts from the model's current weights (θ0) and leaves the model there; each
# round's record says how much of the graph and of the weights is gone and what the retrained
# ticket scores (test accuracy at its best validation epoch).

# %%
model.load_state_dict(theta0)
ticket = sp.gnn.find_ticket(model, data, rounds=rounds, graph_rate=graph_rate, weight_rate=weight_rate,
                            epochs=epochs, progress=False, **hp)
for h in ticket.history:
    print(f"round {h['round']}: graph sparsity {h['graph_sparsity']:.1%}, weight sparsity "
          f"{h['weight_sparsity']:.1%}, test accuracy {h['test_acc']:.3f} ({h['seconds']:.0f} s)")

# %% [markdown]
# ## Random pruning at the same sparsities
#
# The control: keep exactly as many edges and weights as each UGS round did, but chosen at
# random (weights ranked globally, as UGS does), and train with `sp.gnn.train_ticket` from the
# same θ0. If UGS's choice matters, its curve stays above this one as sparsity grows.

# %%
gen = torch.Generator().manual_seed(0)


def random_masks(edges_kept, weights_kept):
    edge_mask = torch.zeros_like(all_edges)
    edge_mask[torch.randperm(edge_mask.numel(), generator=gen)[:edges_kept]] = True
    sizes = [all_weights[n].numel() for n in names]
    flat = torch.zeros(sum(sizes), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=gen)[:weights_kept]] = True
    return edge_mask, {n: f.view_as(all_weights[n]) for n, f in zip(names, flat.split(sizes))}


random_acc = []
for h in ticket.history:
    edge_mask, weight_masks = random_masks(h["edges_kept"], h["weights_kept"])
    _, acc, _ = sp.gnn.train_ticket(model, data, edge_mask, weight_masks, theta0, epochs, **hp)
    random_acc.append(acc)
    print(f"random at round {h['round']}'s sparsity: test accuracy {acc:.3f} "
          f"(UGS {h['test_acc']:.3f}, dense {dense_acc:.3f})")

# %% [markdown]
# ## The ticket: a smaller graph and zeroed weights
#
# `ticket.data` is a copy of the graph with the pruned edges gone from `edge_index` (not just
# weighted 0), and `ticket.model` holds the last round's weights with the pruned ones at 0, so
# `ticket.model(ticket.data.x, ticket.data.edge_index)` is the ticket as reported. UGS's weight
# sparsity is unstructured: the tensors keep their shapes, and the MACs below count only the
# nonzero weights (what a sparse kernel would do); the next section shrinks the tensors.

# %%
last = ticket.history[-1]
with torch.no_grad():
    pred = ticket.model(ticket.data.x, ticket.data.edge_index).argmax(-1)
acc = float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())
nonzero = sum(int(torch.count_nonzero(p)) for n, p in ticket.model.named_parameters() if n in names)
params_left = nonzero + sum(p.numel() for n, p in ticket.model.named_parameters() if n not in names)
print(f"edges: {data.edge_index.shape[1]} -> {ticket.data.edge_index.shape[1]} "
      f"(edge_mask keeps {int(ticket.edge_mask.sum())})")
print(f"nonzero params: {dense_params} -> {params_left}; MACs {mega(dense_macs)} -> {mega(last['macs'])} "
      f"(nonzero weights only)")
print(f"ticket.model on ticket.data: test accuracy {acc:.3f} (reported {last['test_acc']:.3f})")

# %% [markdown]
# ## A structured ticket: whole channels instead of single weights
#
# With `structured=True` (not in the UGS paper) `find_ticket` puts one mask on each coupled
# channel unit that structprune's engine finds (the groups of tutorials 01 and 02) instead of
# one per weight, and prunes `weight_rate` of the kept units per round. Edges, rewinding and
# retraining are as before, and `ticket.model` comes back physically smaller: here the hidden
# layer loses channels, so its MACs fall on any runtime, not only with sparse kernels. On Cora,
# two rounds left `conv1` 30 of its 64 channels (53% of the parameters gone, 250.5M -> 117.4M
# MACs) at 80.5% test accuracy, against 81.5% for per-weight UGS at about the same sparsity,
# whose zeros a dense runtime still multiplies. Random channels may do as well: on the paper's
# 512-wide GCN, `benchmarks/ugs_structured.py` found UGS's channel choice no better than random
# channels at the same counts (`benchmarks/results/ugs_structured_notes.md`).

# %%
model.load_state_dict(theta0)  # the random baselines trained it; find_ticket starts from θ0 again
structured = sp.gnn.find_ticket(model, data, rounds=2, graph_rate=graph_rate, weight_rate=weight_rate,
                                epochs=epochs, progress=False, structured=True, **hp)
s_last = structured.history[-1]
with torch.no_grad():
    pred = structured.model(structured.data.x, structured.data.edge_index).argmax(-1)
s_acc = float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())
shape = tuple(dict(structured.model.named_parameters())["conv1.lin.weight"].shape)
dense_shape = tuple(model.conv1.lin.weight.shape)
print(f"structured ticket, {len(structured.history)} rounds: conv1.lin.weight {shape} (dense "
      f"{dense_shape}), {s_last['weights_kept']} params, "
      f"{mega(s_last['macs'])} MACs on {s_last['edges_kept']} edges; test accuracy {s_acc:.3f} "
      f"(reported {s_last['test_acc']:.3f}; per-weight UGS after 2 rounds "
      f"{ticket.history[1]['test_acc']:.3f})")

# %% [markdown]
# ## The plot: accuracy against graph and weight sparsity
#
# Both panels show the same runs: every point is one round, placed by how much of the graph
# (left) or of the weights (right) it removed. Read the gap between the curves at the same x:
# that is what UGS's choice is worth over a random one. In one run on Cora (5 rounds, up to 41%
# of the edges and 83% of the weights removed) the UGS ticket went from 82.3% (dense) to
# 78.6%, random pruning to 59.7%. One seed: differences under about a point are noise.
#
# The two sparsities grow together, so the plot does not say which choice earns the gap. To
# isolate the edges, run with `weight_rate=1e-9` (one weight per round): on Cora one round at
# `graph_rate=0.3` gave 79.0% for UGS's edges and 80.0% for random edges, which suggests that
# with this GCN the gap comes mostly from the weight masks (one seed, one round).

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, key, label in [(axes[0], "graph_sparsity", "graph sparsity (% of edges removed)"),
                       (axes[1], "weight_sparsity", "weight sparsity (% of weights removed)")]:
    xs = [0.0] + [100 * h[key] for h in ticket.history]
    ax.plot(xs, [100 * dense_acc] + [100 * h["test_acc"] for h in ticket.history], "o-",
            label="UGS ticket (single weights)")
    ax.plot(xs, [100 * dense_acc] + [100 * a for a in random_acc], "s--", label="random pruning")
    ax.plot([0.0] + [100 * h[key] for h in structured.history],
            [100 * dense_acc] + [100 * h["test_acc"] for h in structured.history], "^-.",
            label="structured UGS (channels)")
    ax.axhline(100 * dense_acc, color="gray", ls=":", label="dense")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("test accuracy (%)")
axes[0].legend()
fig.suptitle(f"Graph lottery tickets (UGS) vs random pruning: GCN on {name}")
fig.tight_layout()
plot = output_dir() / "graph_lottery_tickets.png"
fig.savefig(plot, dpi=110)
print(f"plot: {plot}")
print(f"total {time.perf_counter() - start:.0f} s")

assert abs(acc - last["test_acc"]) < 1e-6
assert ticket.data.edge_index.shape[1] == last["edges_kept"] < data.edge_index.shape[1]
assert nonzero <= last["weights_kept"]
assert abs(s_acc - s_last["test_acc"]) < 1e-6 and shape[0] < dense_shape[0]
