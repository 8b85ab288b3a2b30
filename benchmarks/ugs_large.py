"""UGS tickets on a graph of over a million directed edges: mini-batch (neighbour-sampled) rounds
vs the memory a full-batch round needs.

The graph is generated (no download): ``--nodes`` nodes in ``--classes`` balanced communities,
undirected edges drawn with one end uniform and the other in the same community with probability
``--homophily`` (else uniform), both directions kept (``~ nodes * avg_degree`` directed edges);
features ``signal * centroid[class] + N(0, 1)`` so that the graph helps; 10% / 5% / 10% of the
nodes for train / val / test. Model: the UGS GCN of ``models/gnn_ugs.py`` (edge mask as
``edge_weight``, source-degree normalisation), ``--hidden`` wide.

Each measurement runs in its own child process (``torch.set_num_threads(--threads)``), so its
peak resident memory is its own: ``ru_maxrss`` of the child (whole process, including torch and
the graph) and the peak *after* the graph was built (``VmHWM`` reset through
``/proc/self/clear_refs`` once the graph is in memory; the training's own working memory).

1. mini-batch: ``sp.gnn.find_ticket(..., num_neighbors=--neighbors, batch_size=--batch-size)``,
   ``--rounds`` rounds of ``--epochs`` epochs per stage on the full graph;
2. full-batch: ``sp.gnn.find_ticket`` (no sampling), 1 round of ``--full-epochs`` epochs per
   stage, on graphs of ``--full-nodes`` nodes (same generator and degree), the largest normally
   the full graph: measured, not estimated; a least-squares line through the measurements
   against the edge count gives the memory a full-batch round needs per million edges;
3. mini-batch again on ``--scale-nodes`` graphs (1 round, 1 epoch per stage): its memory against
   the full-batch memory that line extrapolates to (an estimate, marked as such).

Writes ``benchmarks/results/ugs_large.json`` and ``.md``.

    .venv/bin/python benchmarks/ugs_large.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"


def make_graph(num_nodes: int, avg_degree: float, classes: int, features: int, homophily: float, signal: float,
               seed: int):
    """A community graph with a class signal in the features and train / val / test masks."""
    from torch_geometric.data import Data
    from torch_geometric.utils import coalesce, remove_self_loops

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_nodes) % classes
    y = y[torch.randperm(num_nodes, generator=g)]
    by_class = [torch.nonzero(y == c).squeeze(1) for c in range(classes)]
    num_und = int(num_nodes * avg_degree / 2)
    src = torch.randint(num_nodes, (num_und,), generator=g)
    same = torch.rand(num_und, generator=g) < homophily
    dst = torch.randint(num_nodes, (num_und,), generator=g)
    sizes = torch.tensor([b.numel() for b in by_class])
    pick = (torch.rand(num_und, generator=g) * sizes[y[src]]).long()
    starts = torch.cumsum(sizes, 0) - sizes
    flat = torch.cat(by_class)
    dst = torch.where(same, flat[starts[y[src]] + pick], dst)
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    edge_index, _ = remove_self_loops(edge_index)
    edge_index = coalesce(edge_index, num_nodes=num_nodes)
    centroid = torch.randn(classes, features, generator=g)
    x = signal * centroid[y] + torch.randn(num_nodes, features, generator=g)
    perm = torch.randperm(num_nodes, generator=g)
    cut = [int(num_nodes * f) for f in (0.10, 0.15, 0.25)]
    masks = []
    for lo, hi in ((0, cut[0]), (cut[0], cut[1]), (cut[1], cut[2])):
        m = torch.zeros(num_nodes, dtype=torch.bool)
        m[perm[lo:hi]] = True
        masks.append(m)
    return Data(x=x, y=y, edge_index=edge_index, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> dict:
    """One measurement (runs in a child process); returns what it measured."""
    import structprune as sp
    from models import gnn_ugs
    from structprune.gnn import minibatch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = make_graph(args.nodes, args.avg_degree, args.classes, args.features, args.homophily, args.signal, args.seed)
    build_s = time.perf_counter() - start
    rss_graph = _status("VmRSS")
    reset = _reset_peak()
    torch.manual_seed(args.seed)
    model = gnn_ugs.build(args.features, args.classes, hidden=args.hidden)
    common = dict(lr=args.lr, weight_decay=args.weight_decay, s1=args.s1, s2=args.s2, seed=args.seed,
                  progress=False)
    start = time.perf_counter()
    if args.mode == "minibatch":
        ticket = sp.gnn.find_ticket(model, data, rounds=args.rounds, epochs=args.epochs,
                                    num_neighbors=args.neighbors, batch_size=args.batch_size, **common)
    else:
        ticket = sp.gnn.find_ticket(model, data, rounds=1, epochs=args.full_epochs, **common)
    total_s = time.perf_counter() - start
    peak = _status("VmHWM") / 1024 if reset else None
    batches = None
    if args.mode == "minibatch":  # the size of a training batch's sampled subgraph (after the measurement)
        sizes = [(b.num_nodes, b.edge_index.size(1)) for b in minibatch.neighbor_loader(
            data, args.neighbors, data.train_mask, args.batch_size, shuffle=True, seed=args.seed)]
        batches = {"count": len(sizes), "mean_nodes": sum(n for n, _ in sizes) / len(sizes),
                   "max_nodes": max(n for n, _ in sizes), "mean_edges": sum(e for _, e in sizes) / len(sizes),
                   "max_edges": max(e for _, e in sizes)}
    return {
        "mode": args.mode,
        "nodes": args.nodes,
        "edges": int(data.edge_index.size(1)),
        "graph_build_s": build_s,
        "rss_after_graph_mib": rss_graph / 1024,
        "peak_after_graph_mib": peak,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": total_s,
        "history": ticket.history,
        "train_batches": batches,
    }


def run_child(mode: str, nodes: int, args, **override) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--nodes", str(nodes)]
    for key in ("avg_degree", "classes", "features", "homophily", "signal", "seed", "hidden", "rounds", "epochs",
                "full_epochs", "batch_size", "threads", "lr", "weight_decay", "s1", "s2"):
        argv += ["--" + key.replace("_", "-"), str(override.get(key, getattr(args, key)))]
    argv += ["--neighbors", *map(str, args.neighbors)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {nodes} nodes failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    return my - b * mx, b


def markdown(result: dict) -> str:
    a = result["args"]
    mb = result["minibatch"]
    lines = [
        f"# UGS on a generated graph: {mb['nodes']:,} nodes, {mb['edges']:,} directed edges",
        "",
        f"UGS GCN (models/gnn_ugs.py, {a['features']}-{a['hidden']}-{a['classes']}), {a['threads']} thread(s), "
        f"lr {a['lr']}, wd {a['weight_decay']}, s1 {a['s1']}, s2 {a['s2']}, seed {a['seed']}; "
        f"train / val / test = 10 / 5 / 10 % of the nodes. Load average before / after: "
        f"{result['loadavg_before']} / {result['loadavg_after']}. Commit {result['git']}.",
        "",
        f"## Mini-batch: num_neighbors={a['neighbors']}, batch_size={a['batch_size']}, "
        f"{a['epochs']} epochs per stage",
        "",
        "| round | graph sp. % | weight sp. % | edges kept | edges sampled in the mask stage | val acc % | test acc % "
        "| s / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in mb["history"]:
        lines.append(f"| {h['round']} | {100 * h['graph_sparsity']:.2f} | {100 * h['weight_sparsity']:.2f} | "
                     f"{h['edges_kept']:,} | {h['edges_sampled']:,} | {100 * h['val_acc']:.2f} | "
                     f"{100 * h['test_acc']:.2f} | {h['seconds']:.1f} |")
    peak = mb["peak_after_graph_mib"]
    tb = mb.get("train_batches")
    if tb:
        lines += ["", f"A training batch ({tb['count']} per epoch) samples {tb['mean_nodes']:,.0f} nodes and "
                      f"{tb['mean_edges']:,.0f} edges on average (max {tb['max_nodes']:,} / {tb['max_edges']:,}): "
                      f"{100 * tb['mean_nodes'] / mb['nodes']:.0f}% of the graph's nodes (the model runs on all of "
                      f"them, the loss on the batch's seeds). Each stage also evaluates the validation nodes every "
                      f"epoch (and the test nodes at a new best) in batches."]
    lines += [
        "",
        f"Peak resident memory of the mini-batch process: {mb['ru_maxrss_mib']:.0f} MiB (ru_maxrss, whole process: "
        f"torch, the graph, training); {mb['rss_after_graph_mib']:.0f} MiB once the graph was built; peak after "
        f"that: {peak:.0f} MiB, so training added {peak - mb['rss_after_graph_mib']:.0f} MiB." if peak else
        f"Peak resident memory of the mini-batch process: {mb['ru_maxrss_mib']:.0f} MiB (ru_maxrss).",
        "",
        f"## Full-batch: 1 round, {a['full_epochs']} epochs per stage (measured)",
        "",
        "| nodes | directed edges | ru_maxrss MiB | RSS with the graph MiB | peak after the graph MiB | training adds MiB "
        "| s / round |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in result["fullbatch"]:
        p = f["peak_after_graph_mib"]
        lines.append(f"| {f['nodes']:,} | {f['edges']:,} | {f['ru_maxrss_mib']:.0f} | {f['rss_after_graph_mib']:.0f} | "
                     f"{p:.0f} | {p - f['rss_after_graph_mib']:.0f} | {f['seconds']:.1f} |" if p else
                     f"| {f['nodes']:,} | {f['edges']:,} | {f['ru_maxrss_mib']:.0f} | – | – | – | {f['seconds']:.1f} |")
    if result.get("fit"):
        a0, b = result["fit"]
        lines += ["", f"Full-batch training memory (peak after the graph minus RSS with it) ≈ {a0:.0f} MiB + "
                      f"{b * 1e6:.0f} MiB per million directed edges (least squares over the rows above), at hidden "
                      f"{a['hidden']}: memory grows with the edges, mini-batch memory with the batch's sampled "
                      f"subgraph."]
    if result.get("scale"):
        lines += ["", "## Mini-batch memory against graph size", "",
                  "First row: the run above; the others 1 round of 1 epoch per stage (seconds are per round).", "",
                  "| nodes | directed edges | mini-batch: ru_maxrss MiB | training adds MiB | rounds x epochs | s / round "
                  "| full-batch training would add MiB (line above, extrapolated) |",
                  "|---|---|---|---|---|---|---|"]
        for f in [mb] + result["scale"]:
            p = f["peak_after_graph_mib"]
            est = f"{result['fit'][0] + result['fit'][1] * f['edges']:.0f}" if result.get("fit") else "–"
            add = f"{p - f['rss_after_graph_mib']:.0f}" if p else "–"
            shape = f"{len(f['history'])} x {a['epochs'] if f is mb else 1}"
            secs = sum(h["seconds"] for h in f["history"]) / len(f["history"])
            lines.append(f"| {f['nodes']:,} | {f['edges']:,} | {f['ru_maxrss_mib']:.0f} | {add} | {shape} | "
                         f"{secs:.1f} | {est} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--avg-degree", type=float, default=11.0, help="directed edges per node (before dedup)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--homophily", type=float, default=0.5)
    parser.add_argument("--signal", type=float, default=0.2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--full-epochs", type=int, default=4)
    parser.add_argument("--full-nodes", type=int, nargs="*", default=[25_000, 50_000, 100_000])
    parser.add_argument("--scale-nodes", type=int, nargs="*", default=[300_000],
                        help="larger graphs for a mini-batch memory point each (1 round, 1 epoch per stage)")
    parser.add_argument("--neighbors", type=int, nargs="+", default=[15, 10])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--s1", type=float, default=1e-2)
    parser.add_argument("--s2", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["minibatch", "fullbatch"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "ugs_large"), help="output stem")
    args = parser.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return 0

    from _common import git_rev

    loadavg = lambda: open("/proc/loadavg").read().split()[:3]  # noqa: E731
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "out")}, "git": git_rev(),
              "loadavg_before": " ".join(loadavg())}
    print("load average:", result["loadavg_before"], flush=True)
    result["minibatch"] = run_child("minibatch", args.nodes, args)
    print(f"mini-batch: {result['minibatch']['seconds']:.0f} s, ru_maxrss {result['minibatch']['ru_maxrss_mib']:.0f} MiB,"
          f" load {' '.join(loadavg())}", flush=True)
    result["fullbatch"] = []
    for n in args.full_nodes:
        result["fullbatch"].append(run_child("fullbatch", n, args))
        f = result["fullbatch"][-1]
        print(f"full-batch {n} nodes / {f['edges']} edges: {f['seconds']:.0f} s, ru_maxrss {f['ru_maxrss_mib']:.0f} MiB,"
              f" load {' '.join(loadavg())}", flush=True)
    pts = [(f["edges"], f["peak_after_graph_mib"] - f["rss_after_graph_mib"]) for f in result["fullbatch"]
           if f["peak_after_graph_mib"]]
    result["fit"] = fit(pts) if len(pts) >= 2 else None
    result["scale"] = []
    for n in args.scale_nodes:
        result["scale"].append(run_child("minibatch", n, args, rounds=1, epochs=1))
        f = result["scale"][-1]
        print(f"mini-batch {n} nodes / {f['edges']} edges: {f['seconds']:.0f} s, ru_maxrss {f['ru_maxrss_mib']:.0f} MiB,"
              f" load {' '.join(loadavg())}", flush=True)
    result["loadavg_after"] = " ".join(loadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
