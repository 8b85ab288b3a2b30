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
# counts. Cora comes from `../shared/data/planetoid` when it is there; otherwise (and with
# `SP_TINY=1`, as the tests run it) a generated 3-community graph stands in.

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
def accuracy(model):
    model.eval()
    pred = model(data.x, data.edge_index).argmax(-1)
    return float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())


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

assert all(r[2] < 1e-4 for r in results.values())
assert rep.macs_kept <= 0.55 and res.max_abs_diff < 1e-3
