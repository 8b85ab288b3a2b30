"""UGS (unified graph lottery tickets) on Planetoid vs random pruning at the same sparsities.

GCN of the UGS paper (``models/gnn_ugs.py``, 512 hidden, aggregate-then-transform, bias-free,
source-degree normalisation) with the official hyperparameters (``../shared/ALGORITHMS.md`` §2.6),
``sp.gnn.find_ticket`` for the tickets. Per seed: the dense network trained from θ0 (the fixed-mask
stage with nothing pruned), then ``--rounds`` UGS rounds; and at each round's exact edge / weight
counts a random ticket (random survivors, global over the weights, the same θ0, the same
fixed-mask training). Writes ``benchmarks/results/ugs_<dataset>.json`` and ``.md`` (and a ``.png``
when matplotlib is installed).

``--model gin|gat``: UGS's GIN / GAT (``gnn_ugs.ugs_gin`` / ``ugs_gat``, ALGORITHMS.md §2.5) with
their official hyperparameters (§2.6; seed 666); the GAT's graph gets one self-loop per node
appended (``gnn_ugs.with_self_loops``) so its edge mask has the official length E + N; GIN's
weight masks sit on its two GIN linears only (``model.ugs_weights``). Outputs then go to
``ugs_<dataset>_<model>``. Both get ``set_full_graph(data.edge_index)``, so the fixed-mask
stages (which ``find_ticket`` runs on the graph without the pruned edges) keep the pruned edges as
zero-masked edges, as the official binary masks do (GIN's mean still counts them, GAT's quirk
still gives them logit 0). ``--fast``: the same models computed transform-first with a sparse
CSR ``x``, sparse-matrix aggregation and ``torch.rand`` dropout (``models/gnn_ugs.py``; equal up
to rounding, a different dropout stream); outputs get a ``_fast`` suffix.

    .venv/bin/python benchmarks/ugs_planetoid.py --dataset cora --rounds 5 --seeds 1 --threads 1
    .venv/bin/python benchmarks/ugs_planetoid.py --dataset cora --rounds 20 --threads 2 --fast
    .venv/bin/python benchmarks/ugs_planetoid.py --model gin --rounds 6 --threads 1 --fast
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structprune as sp  # noqa: E402
from models import gnn_ugs, planetoid  # noqa: E402
from structprune.gnn.masks import count_macs, prune_lowest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# ALGORITHMS.md §2.3 / §2.6: official seed, lr, weight decay, s1, s2 (GCN, node classification)
OFFICIAL = {
    "cora": dict(seed=2377, lr=0.008, weight_decay=8e-5, s1=1e-2, s2=1e-2),
    "citeseer": dict(seed=4428, lr=0.01, weight_decay=5e-4, s1=1e-2, s2=1e-2),
    "pubmed": dict(seed=3333, lr=0.01, weight_decay=5e-4, s1=1e-6, s2=1e-3),
}
# ALGORITHMS.md §2.6: GIN / GAT (main_gingat_imp.py, default seed 666)
OFFICIAL_GINGAT = {
    "gin": {"cora": dict(seed=666, lr=0.008, weight_decay=8e-5, s1=1e-3, s2=1e-3),
            "citeseer": dict(seed=666, lr=0.01, weight_decay=5e-4, s1=1e-5, s2=1e-5),
            "pubmed": dict(seed=666, lr=0.01, weight_decay=5e-4, s1=1e-5, s2=1e-5)},
    "gat": {"cora": dict(seed=666, lr=0.008, weight_decay=8e-5, s1=1e-3, s2=1e-3),
            "citeseer": dict(seed=666, lr=0.01, weight_decay=5e-4, s1=1e-7, s2=1e-3),
            "pubmed": dict(seed=666, lr=0.01, weight_decay=5e-4, s1=1e-2, s2=1e-2)},
}
MODELS = ("gcn", "gin", "gat")


def hyperparameters(model: str, dataset: str) -> dict:
    """The official seed, lr, weight decay, s1, s2 of ``model`` on ``dataset`` (§2.3, §2.6)."""
    return OFFICIAL[dataset] if model == "gcn" else OFFICIAL_GINGAT[model][dataset]


def build_model(model: str, num_features: int, num_classes: int, fast: bool):
    """The UGS paper's ``model`` (gcn / gin / gat) for ``num_features`` -> ``num_classes``."""
    if model == "gcn":
        return (gnn_ugs.build_fast if fast else gnn_ugs.build)(num_features, num_classes, hidden=512)
    kw = dict(aggregation="spmm", fast_dropout=True) if fast else {}
    if model == "gin":
        return gnn_ugs.ugs_gin(num_features, num_classes, hidden=512, order="transform" if fast else "aggregate", **kw)
    return gnn_ugs.ugs_gat(num_features, num_classes, hidden=512, heads=8, self_loops="given", **kw)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ALGORITHMS.md §2.8 (read off the paper's Fig. 1, ±0.2): round -> (UGS, random)
TARGETS = {"cora": {0: (80.7, None), 4: (80.8, 78.9), 9: (79.3, 76.3)},
           "citeseer": {0: (70.8, None), 8: (72.0, 68.4), 13: (71.1, 61.5), 17: (70.3, 44.1)}}


def random_masks(model, names, counts_g, counts_w, num_edges, generator):
    """Random survivors with the given kept counts, pruned round by round like UGS."""
    named = dict(model.named_parameters())
    alive_g = torch.ones(num_edges, dtype=torch.bool)
    alive_w = torch.ones(sum(named[n].numel() for n in names), dtype=torch.bool)
    out = []
    for kg, kw in zip(counts_g, counts_w):
        while int(alive_g.sum()) > kg:
            alive_g = prune_lowest(torch.rand(num_edges, generator=generator), alive_g,
                                   (int(alive_g.sum()) - kg - 1) / int(alive_g.sum()) + 1e-12)
        while int(alive_w.sum()) > kw:
            alive_w = prune_lowest(torch.rand(alive_w.numel(), generator=generator), alive_w,
                                   (int(alive_w.sum()) - kw - 1) / int(alive_w.sum()) + 1e-12)
        sizes = [named[n].numel() for n in names]
        out.append((alive_g.clone(), {n: f.view_as(named[n]) for n, f in zip(names, alive_w.split(sizes))}))
    return out


def run(dataset: str, rounds: int, seeds: int, epochs: int, progress: bool, root: str | None = None,
        device: str = "cpu", save=None, model_name: str = "gcn", fast: bool = False) -> dict:
    data = planetoid.load(dataset, root=root)
    if model_name == "gat":
        data = gnn_ugs.with_self_loops(data)  # the official GAT masks E + N entries, self-loops too
    if fast:
        data.x = gnn_ugs.sparse_features(data.x)
    data = data.to(device)
    hp = hyperparameters(model_name, dataset)
    result = {"dataset": dataset, "model": model_name, "fast": fast, "rounds": rounds, "epochs": epochs,
              "threads": torch.get_num_threads(), "hyperparameters": hp, "seeds": [],
              "targets": TARGETS.get(dataset, {}) if model_name == "gcn" else {}, "device": str(device),
              "torch": torch.__version__, "loadavg_start": loadavg()}
    wall = time.perf_counter()
    for i in range(seeds):
        seed = hp["seed"] + i
        torch.manual_seed(seed)
        model = build_model(model_name, data.num_features, int(data.y.max()) + 1, fast).to(device)
        if model_name != "gcn":  # fixed-mask stages: pruned edges masked to 0 on the full graph, as official
            model.set_full_graph(data.edge_index)
        theta0 = {k: v.clone() for k, v in model.state_dict().items()}
        names = list(getattr(model, "ugs_weights", [n for n, p in model.named_parameters() if p.dim() >= 2]))
        ones_w = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in names}
        ones_g = torch.ones(data.edge_index.size(1), dtype=torch.bool, device=device)
        t = time.perf_counter()
        _, dense_test, state = sp.gnn.train_ticket(model, data, ones_g, ones_w, theta0, epochs, hp["lr"],
                                                   hp["weight_decay"], seed)
        model.load_state_dict(state)
        dense = {"test_acc": dense_test, "seconds": time.perf_counter() - t,
                 "macs": count_macs(model, data.x, data.edge_index)}
        model.load_state_dict(theta0)
        t = time.perf_counter()
        ticket = sp.gnn.find_ticket(model, data, rounds=rounds, epochs=epochs, lr=hp["lr"],
                                    weight_decay=hp["weight_decay"], s1=hp["s1"], s2=hp["s2"], seed=seed,
                                    progress=progress, weights=names)
        ugs_seconds = time.perf_counter() - t
        randoms = random_masks(model, names, [h["edges_kept"] for h in ticket.history],
                               [h["weights_kept"] for h in ticket.history], ones_g.numel(),
                               torch.Generator().manual_seed(seed))
        rand_rows = []
        for (mg, mw) in randoms:
            mg, mw = mg.to(device), {n: m.to(device) for n, m in mw.items()}
            _, test, _ = sp.gnn.train_ticket(model, data, mg, mw, theta0, epochs, hp["lr"], hp["weight_decay"], seed)
            rand_rows.append({"test_acc": test, "edges_kept": int(mg.sum()),
                              "weights_kept": int(sum(int(m.sum()) for m in mw.values()))})
        result["seeds"].append({"seed": seed, "dense": dense, "ugs": ticket.history, "random": rand_rows,
                                "ugs_seconds": ugs_seconds})
        result["wall_seconds"] = time.perf_counter() - wall
        result["loadavg_end"] = loadavg()
        if save is not None:
            save(result)
        print(f"seed {seed}: dense {100 * dense_test:.2f}; UGS {ugs_seconds:.0f} s for {rounds} rounds", flush=True)
    return result


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    targets = {int(k): v for k, v in result["targets"].items()}
    model = result.get("model", "gcn")
    title = {"gcn": "GCN, ugs_gcn", "gin": "GIN, ugs_gin", "gat": "GAT, ugs_gat"}[model]
    if result.get("fast"):
        title += ", fast layout"
    lines = [f"# UGS on {result['dataset']} ({title}), {len(seeds)} seed(s), {result['epochs']} epochs per stage, "
             f"{result['threads']} thread(s)", "",
             "Test accuracy (%) at the best validation epoch of the fixed-mask retraining from θ0; "
             "random = random survivors at the same edge / weight counts, same θ0 and training. "
             "Targets: ALGORITHMS.md §2.8 (paper Fig. 1, ±0.2).", "",
             "| round | graph sp. % | weight sp. % | edges kept | weights kept | UGS | random | UGS − random "
             "| target UGS / random | MACs (M) | s / round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = [100 * s["dense"]["test_acc"] for s in seeds]
    t0 = targets.get(0, (None, None))[0]
    lines.append(f"| 0 (dense) | 0 | 0 | – | – | {mean(dense):.2f} ± {sd(dense):.2f} | – | – | "
                 f"{t0 if t0 else '–'} | {seeds[0]['dense']['macs'] / 1e6:.0f} | – |")
    for k in range(result["rounds"]):
        h = seeds[0]["ugs"][k]
        ugs = [100 * s["ugs"][k]["test_acc"] for s in seeds]
        rnd = [100 * s["random"][k]["test_acc"] for s in seeds]
        tgt = targets.get(k + 1)
        tgt_s = f"{tgt[0]} / {tgt[1]}" if tgt else "–"
        secs = mean([s["ugs"][k]["seconds"] for s in seeds])
        lines.append(f"| {k + 1} | {100 * h['graph_sparsity']:.2f} | {100 * h['weight_sparsity']:.2f} | "
                     f"{h['edges_kept']} | {h['weights_kept']} | {mean(ugs):.2f} ± {sd(ugs):.2f} | "
                     f"{mean(rnd):.2f} ± {sd(rnd):.2f} | {mean(ugs) - mean(rnd):+.2f} | {tgt_s} | "
                     f"{h['macs'] / 1e6:.0f} | {secs:.0f} |")
    total = mean([s["ugs_seconds"] for s in seeds])
    lines += ["", f"UGS search: {total:.0f} s for {result['rounds']} rounds ({total / result['rounds']:.0f} s per "
              f"round of 2 x {result['epochs']} epochs) with {result['threads']} thread(s)."]
    if "wall_seconds" in result:
        lines.append(f"Whole run (dense + UGS + random baselines): {result['wall_seconds']:.0f} s; load average "
                     f"{result.get('loadavg_start')} at the start, {result.get('loadavg_end')} at the end "
                     f"({result.get('device', 'cpu')}).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON and markdown are written)")
        return
    seeds = result["seeds"]
    xs = [100 * h["graph_sparsity"] for h in seeds[0]["ugs"]]
    ugs = [statistics.mean(100 * s["ugs"][k]["test_acc"] for s in seeds) for k in range(len(xs))]
    rnd = [statistics.mean(100 * s["random"][k]["test_acc"] for s in seeds) for k in range(len(xs))]
    dense = statistics.mean(100 * s["dense"]["test_acc"] for s in seeds)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ugs, "o-", label="UGS")
    ax.plot(xs, rnd, "s--", label="random")
    ax.axhline(dense, color="gray", ls=":", label="dense")
    ax.set_xlabel("graph sparsity (%)  [weight sparsity on the top axis]")
    ax.set_ylabel("test accuracy (%)")
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs, [f"{100 * h['weight_sparsity']:.0f}" for h in seeds[0]["ugs"]])
    ax.legend()
    ax.set_title(f"UGS vs random, {result.get('model', 'gcn').upper()} on {result['dataset']}")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cora", choices=sorted(OFFICIAL))
    parser.add_argument("--model", default="gcn", choices=MODELS)
    parser.add_argument("--fast", action="store_true", help="transform-first, sparse x, spmm, rand dropout")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds: official seed, +1, ...")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=None, help="folder holding <Name>/raw/ (default ../shared/data/planetoid)")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/ugs_<dataset>)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = ("" if args.model == "gcn" else f"_{args.model}") + ("_fast" if args.fast else "")
    stem = Path(args.out) if args.out else RESULTS / f"ugs_{args.dataset}{suffix}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:  # after every seed, so a cut-short run keeps what it finished
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(markdown(result))

    result = run(args.dataset, args.rounds, args.seeds, args.epochs, not args.no_progress, args.root,
                 args.device, save, args.model, args.fast)
    md = markdown(result)
    print(md)
    plot(result, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
