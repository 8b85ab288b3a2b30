# ---
# jupytext:
#   text_representation:
#     format_name: percent
# ---
# %% [markdown]
# # Structured pruning of a GNN, and export to ONNX
#
# Train a GAT (8 heads x 8 channels) on Cora, prune half its MACs two ways (whole attention
# heads, or the same channels inside every head), check each against the masked-activation
# oracle on a graph of another size, fine-tune, and export to ONNX with open node and edge
# counts; prune the graph's edges together with the heads (`sp.gnn.prune`) and run the ONNX
# file on the pruned graph; then sweep the pruning ratio and plot parameters, MACs and
# measured latency (torch and onnxruntime) against it. Cora comes from
# `../shared/data/planetoid` when it is there; otherwise (and with `SP_TINY=1`, as the tests
# run it) a generated 3-community graph stands in. The plot goes to `tutorials/out/` (or to
# the folder given as first argument or in `SP_OUT`).

# %%
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's models/
import models  # noqa: E402
import structprune as sp  # noqa: E402
from structprune.oracle import masked_output, max_rel_diff  # noqa: E402

tiny = os.environ.get("SP_TINY") == "1"
torch.manual_seed(0)
torch.set_num_threads(1)


def output_dir() -> Path:
    """`SP_OUT`, else the first argument, else tutorials/out/ (git-ignored by its own .gitignore)."""
    arg = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    out = Path(os.environ.get("SP_OUT") or arg or Path(__file__).resolve().parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    if out.name == "out" and not (out / ".gitignore").exists():
        (out / ".gitignore").write_text("*\n")
    return out


def community_graph(n=90, k=3, p_in=0.15, p_out=0.01, f=40, seed=0):
    """A stochastic block model: class = community, features = noisy one-hot of the class."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    same = y[:, None] == y[None, :]
    a = torch.rand(n, n, generator=g) < torch.where(same, p_in, p_out)
    a = torch.triu(a, 1)
    a = a | a.T
    x = torch.randn(n, f, generator=g) * 0.8
    x[torch.arange(n), y] += 1.0
    masks = torch.rand(n, generator=g)
    return Data(x=x, edge_index=a.nonzero().T.contiguous(), y=y, train_mask=masks < 0.3,
                val_mask=(masks >= 0.3) & (masks < 0.5), test_mask=masks >= 0.5)


def load():
    if not tiny:
        try:
            from models import planetoid

            return planetoid.load("Cora"), "Cora"
        except FileNotFoundError:
            pass
    return community_graph(), "a generated 3-community graph"


data, name = load()
num_classes = int(data.y.max()) + 1
print(f"{name}: {data.num_nodes} nodes, {data.edge_index.shape[1]} edges, "
      f"{data.num_features} features, {num_classes} classes")

# %% [markdown]
# ## Train the dense GAT

# %%
def train(model, epochs, lr=0.005):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
    return accuracy(model)


@torch.no_grad()
def accuracy(model, graph=None):
    graph = data if graph is None else graph
    model.eval()
    pred = model(graph.x, graph.edge_index).argmax(-1)
    return float((pred[graph.test_mask] == graph.y[graph.test_mask]).float().mean())


gat = models.get("gat", num_features=data.num_features, num_classes=num_classes)
dense_acc = train(gat, 20 if tiny else 200)
print(f"dense GAT: test accuracy {dense_acc:.3f}")
inputs = (data.x, data.edge_index)

# %% [markdown]
# ## Prune half the MACs: whole heads, or the channels inside every head
#
# A GAT layer writes its heads as a `[N, H*D] -> [N, H, D]` view; structprune ties the view's
# flat dim to the heads by default, and to the channels inside each head with
# `head_channels=True`. Either way the pruned model must equal the original with the removed
# units zeroed, on this graph and on any other.

# %%
gat.eval()
other = community_graph(n=57, f=data.num_features, seed=1)
results = {}
for how, kwargs in [("heads", {}), ("channels in every head", {"head_channels": True})]:
    pruner = sp.Pruner(gat, inputs, target_macs=0.5, **kwargs)
    plan = pruner.plan()
    pruned = pruner.apply(plan)
    with torch.no_grad():
        diff = max(max_rel_diff(pruned(*inputs), masked_output(plan.graph, plan)),
                   max_rel_diff(pruned(other.x, other.edge_index),
                                masked_output(plan.graph, plan, (other.x, other.edge_index))))
    rep = sp.report(gat, pruned, inputs)
    w = dict(pruned.named_parameters())["conv1.att_src"].shape
    print(f"{how}: att_src {tuple(w)} ([1, heads, channels]); params kept {rep.params_kept:.2f}, "
          f"MACs kept {rep.macs_kept:.2f}; accuracy before fine-tuning {accuracy(pruned):.3f}; "
          f"oracle max rel diff {diff:.1e} (on two graph sizes)")
    results[how] = (pruned, rep, diff)

# %% [markdown]
# ## Fine-tune, then export to ONNX with open node and edge counts

# %%
pruned, rep, diff = results["heads"]
tuned_acc = train(pruned, 5 if tiny else 50)
print(f"pruned GAT after fine-tuning: test accuracy {tuned_acc:.3f} (dense {dense_acc:.3f})")

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "gat_pruned.onnx")
    res = sp.export_onnx(pruned, inputs, path, check_inputs=[(other.x, other.edge_index)])
    print(f"ONNX ({res.exporter} exporter): onnxruntime max |diff| {res.max_abs_diff:.1e}, "
          f"also on a {other.num_nodes}-node graph")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {"input_0": data.x.numpy(), "input_1": data.edge_index.numpy()}
    t = []
    for _ in range(5 if tiny else 30):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        t.append(time.perf_counter() - t0)
    print(f"onnxruntime, pruned GAT on {name}: median {sorted(t)[len(t) // 2] * 1e3:.2f} ms")

# %% [markdown]
# ## Prune the graph too: edges with the heads
#
# `sp.gnn.prune` prunes heads and channels as `sp.Pruner` does and, with `edge_ratio`, drops
# the graph's least important edges in the same call (scored by default by `|dL/dm|`, the
# gradient of the training loss with respect to a mask of ones on the edges; `undirected=True`
# drops an edge's two directions together). It returns the pruned model with the pruned graph,
# and only after checking that the one on the other equals the original GAT on the graph
# without those edges, with the pruned heads zeroed. The ONNX file takes the pruned graph as
# its input: the edge count is an open size like the node count.

# %%
result = sp.gnn.prune(gat, data, ratio=0.5, edge_ratio=0.3, undirected=True)
small_gat, small_data = result
heads = dict(small_gat.named_parameters())["conv1.att_src"].shape[1]
print(f"sp.gnn.prune: {heads} of 8 heads, edges {data.edge_index.shape[1]} -> "
      f"{small_data.edge_index.shape[1]}; test accuracy on the pruned graph "
      f"{accuracy(small_gat, small_data):.3f} before fine-tuning (dense {dense_acc:.3f})")
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "gat_and_graph_pruned.onnx")
    res_graph = sp.export_onnx(small_gat, (small_data.x, small_data.edge_index), path)
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input_0": small_data.x.numpy(), "input_1": small_data.edge_index.numpy()})[0]
onnx_acc = float((torch.from_numpy(logits).argmax(-1) == small_data.y)[small_data.test_mask].float().mean())
print(f"ONNX ({res_graph.exporter}) of the pruned GAT on the pruned graph: max |diff| "
      f"{res_graph.max_abs_diff:.1e}, test accuracy {onnx_acc:.3f}")

# %% [markdown]
# ## Size and speed against the pruning ratio
#
# Prune the trained dense GAT at several ratios (whole heads: `ratio=0.25` keeps 6 of the 8),
# and measure what each pruned model costs: parameters, MACs (structprune's count: the
# multiply-adds of the linear layers), and the latency of one forward over the whole graph in
# torch and in onnxruntime (1 thread, the fastest of interleaved runs: other jobs on the
# machine only ever add time, so the minimum is the steadiest figure). Ratio 0 is the dense
# GAT as structprune captured it (`sp.trace(gat, inputs).graph_module`), the same program the
# pruned models are sliced copies of, and every ONNX file comes from the same exporter: each
# point differs from the others only in what was pruned.

# %%
import onnxruntime as ort  # noqa: E402

ratios = (0.0, 0.5) if tiny else (0.0, 0.25, 0.5, 0.75)
runs = 5 if tiny else 30
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sweep, calls = [], []
with tempfile.TemporaryDirectory() as d:
    for ratio in ratios:
        if ratio:
            pruner = sp.Pruner(gat, inputs, ratio=ratio)
            model = pruner.apply(pruner.plan())
        else:  # the dense GAT as structprune captured it: the program the pruned ones slice
            model = sp.trace(gat, inputs).graph_module
        rep_r = sp.report(gat, model, inputs)
        path = os.path.join(d, f"gat_{ratio}.onnx")
        sp.export_onnx(model, inputs, path, exporter="dynamo")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feeds = {"input_0": data.x.numpy(), "input_1": data.edge_index.numpy()}
        heads = dict(model.named_parameters())["conv1.att_src"].shape[1]
        sweep.append({"ratio": ratio, "heads": heads, "params": rep_r.params_kept, "macs": rep_r.macs_kept,
                      "torch": [], "onnxruntime": []})
        calls.append((sweep[-1], (lambda m=model: m(*inputs)), (lambda s=sess, f=feeds: s.run(None, f))))
    with torch.no_grad():
        for step in range(runs + 2):  # interleaved, so the machine's noise hits every model alike
            for row, torch_call, ort_call in calls:
                for key, call in (("torch", torch_call), ("onnxruntime", ort_call)):
                    t0 = time.perf_counter()
                    call()
                    if step >= 2:  # the first two are warm-up
                        row[key].append(1e3 * (time.perf_counter() - t0))
for row in sweep:
    for key in ("torch", "onnxruntime"):
        row[key] = min(row[key])
    print(f"ratio {row['ratio']:.2f}: {row['heads']} heads, params kept {row['params']:.2f}, "
          f"MACs kept {row['macs']:.2f}; latency: torch {row['torch']:.2f} ms, "
          f"onnxruntime {row['onnxruntime']:.2f} ms")

# %% [markdown]
# Read the plot left to right: parameters and MACs fall in step with the ratio (the heads'
# weights are most of the model), and latency falls with them but not as far, since part of
# the time goes to work that does not shrink with the heads (the gathers and scatters over
# the edges, and the fixed cost of each operator call). On the tiny graph that fixed cost is
# almost all there is. `benchmarks/gnn_latency.py` measures dense against pruned more
# carefully (medians and spreads of many runs).

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

xs = [100 * row["ratio"] for row in sweep]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
left.plot(xs, [100 * row["params"] for row in sweep], "o-", ms=9, label="parameters")
left.plot(xs, [100 * row["macs"] for row in sweep], "s--", mfc="none", ms=12, label="MACs")
left.set_ylabel("kept (% of the dense GAT)")
left.set_title("size")
right.plot(xs, [row["torch"] for row in sweep], "o-", label="torch")
right.plot(xs, [row["onnxruntime"] for row in sweep], "s--", label="onnxruntime")
right.set_ylabel(f"latency (ms, best of {runs}, 1 thread)")
right.set_title(f"speed: one forward over all {data.num_nodes} nodes")
for ax in (left, right):
    ax.set_ylim(bottom=0)
    ax.set_xlabel("pruning ratio (% of the attention heads removed)")
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle(f"Structured pruning of a GAT on {name}: size and speed")
fig.tight_layout()
plot = output_dir() / "gnn_pruning_ratio.png"
fig.savefig(plot, dpi=110)
print(f"plot: {plot}")

assert all(r[2] < 1e-4 for r in results.values())
assert rep.macs_kept <= 0.55 and res.max_abs_diff < 1e-3
assert all(a["macs"] > b["macs"] for a, b in zip(sweep, sweep[1:]))
assert small_data.edge_index.shape[1] < data.edge_index.shape[1] and res_graph.max_abs_diff < 1e-3
