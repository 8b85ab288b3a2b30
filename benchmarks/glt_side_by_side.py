"""PyG's contrib graph-lottery-ticket search (``GLTSearch``) side by side with ``sp.gnn.find_ticket``
(UGS) on Cora, in one process: per round the graph / weight sparsity each reached, the test
accuracy, the seconds, and how many edges leave ``edge_index``.

``GLTSearch`` is not in any PyG release (2.8.1 lacks it) nor on PyG's master: it lives only in the
unmerged pull request pyg-team/pytorch_geometric#6992 (head 059e58eeb796daa402dad8eb5b1177e42d7c1f90,
file blob 421082cd66484cc80945bdaa0f540de7a6d19fd4). This script does not ship that code; it loads
the file at run time from ``--glt-src`` (or from ``torch_geometric.contrib.nn`` if a PyG release
ever has it). Extract it from a clone that has the pull request's refs, e.g.::

    git --git-dir=<pyg clone>/.git fetch origin pull/6992/head   # (a mirror already has refs/pull/*)
    mkdir -p /tmp/glt && git --git-dir=<pyg clone>/.git show \\
        059e58eeb796daa402dad8eb5b1177e42d7c1f90:torch_geometric/contrib/nn/models/graph_lottery_ticket.py \\
        > /tmp/glt/graph_lottery_ticket.py
    .venv/bin/python benchmarks/glt_side_by_side.py --glt-src /tmp/glt/graph_lottery_ticket.py --rounds 4

Methods (same data: Cora, public split, ``NormalizeFeatures``; same hyperparameters,
ALGORITHMS.md §2.6: hidden 512, lr 0.008, weight decay 8e-5, 200 + 200 epochs per round, graph rate
0.05, weight rate 0.2, s1 = s2 = 1e-2, dropout 0.5, official Cora seed 2377):

- ``glt_pyg_gcn``: ``GLTSearch`` on PyG's ``GCN`` (``GCNConv``, 2 layers); it masks the biases too.
- ``ours_pyg_gcn``: ``find_ticket`` on the same ``GCN`` with the same θ0 (``edge_route="edge_weight"``),
  which separates method differences from model differences.
- ``ours_ugs_gcn``: ``find_ticket`` on ``models/gnn_ugs.py`` (the UGS paper's GCN), as in
  ``benchmarks/ugs_planetoid.py``.

Where ``GLTSearch`` cannot be used as is (all measured or read off its code; the full list is
``GLT_NOTES``, written into the JSON and the markdown): ``prune()`` fails on its second call (it
re-derives θ0 from the already wrapped module: ``AttributeError: ... 'bias_mask_orig'``), so each
round builds a fresh ``GLTSearch`` on a fresh model loaded with θ0 and hands it the previous round's
``GLTMask`` (``search.mask``), the state a working second call would use; ``ignore_keys`` fails in
``prune()`` whichever way the masks are built, so the biases are masked and pruned too (the weight
sparsity shown is over the weight matrices, as ours); ``sklearn`` (imported at module level, used
only for link prediction) is absent here, so a placeholder ``sklearn.metrics``
whose ``auc`` raises is put in place while the file is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import structprune as sp  # noqa: E402
from _common import git_rev  # noqa: E402
from ugs_planetoid import OFFICIAL  # noqa: E402
from models import gnn_ugs, planetoid  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PR = "pyg-team/pytorch_geometric#6992"
PR_HEAD = "059e58eeb796daa402dad8eb5b1177e42d7c1f90"
PR_BLOB = "421082cd66484cc80945bdaa0f540de7a6d19fd4"
METHODS = ("glt_pyg_gcn", "ours_pyg_gcn", "ours_ugs_gcn")


def load_glt(src: str | None) -> tuple[types.ModuleType, dict]:
    """The module defining ``GLTSearch``: ``torch_geometric.contrib.nn.models.graph_lottery_ticket``
    when the installed PyG has it, else the file ``src`` (see the module docstring)."""
    import torch_geometric  # first: torch._dynamo scans sys.modules and must not see the placeholder

    try:
        with warnings.catch_warnings():  # "contrib contains experimental code"
            warnings.simplefilter("ignore")
            from torch_geometric.contrib.nn.models import graph_lottery_ticket as mod  # type: ignore

        return mod, {"source": "torch_geometric.contrib", "pyg": torch_geometric.__version__}
    except ImportError:
        pass
    if src is None:
        raise SystemExit(f"glt_side_by_side: torch_geometric {torch_geometric.__version__} has no contrib "
                         f"GLTSearch; pass --glt-src <graph_lottery_ticket.py extracted from {PR}> "
                         f"(see this script's docstring)")
    path = Path(src)
    if not path.is_file():
        raise SystemExit(f"glt_side_by_side: --glt-src {src}: no such file")
    raw = path.read_bytes()
    info = {"source": str(path), "sha256": hashlib.sha256(raw).hexdigest(),
            "git_blob": hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest(), "pr": PR, "pr_head": PR_HEAD}
    info["is_pr_head_blob"] = info["git_blob"] == PR_BLOB
    placeholder = False
    try:
        import sklearn.metrics  # noqa: F401  (pyflakes: only probing)
    except ImportError:  # used only by score_link_prediction; node classification never calls it
        placeholder = True
        sk, metrics = types.ModuleType("sklearn"), types.ModuleType("sklearn.metrics")

        def auc(*args, **kwargs):
            raise RuntimeError("glt_side_by_side: scikit-learn is not installed; GLTSearch's link "
                               "prediction scoring needs it (node classification does not)")

        metrics.auc, sk.metrics = auc, metrics
        sys.modules["sklearn"], sys.modules["sklearn.metrics"] = sk, metrics
    try:
        spec = importlib.util.spec_from_file_location("pyg_pr6992_graph_lottery_ticket", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if placeholder:
            del sys.modules["sklearn"], sys.modules["sklearn.metrics"]
    info["sklearn_placeholder"] = placeholder
    return mod, info


def pyg_gcn(data, seed: int):
    """PyG's 2-layer ``GCN`` (``GCNConv``, hidden 512, dropout 0.5 after the hidden layer), seeded."""
    from torch_geometric.nn import GCN

    torch.manual_seed(seed)
    return GCN(data.num_features, 512, num_layers=2, out_channels=int(data.y.max()) + 1, dropout=0.5)


def make_recorder(glt):
    """A ``GLTSearch`` subclass that records, without changing what it computes, what its mask
    stage did (see ``diag`` below) and the edge_index width the model receives."""

    class Recorded(glt.GLTSearch):
        def train(self, ticket, ugs):
            widths = []
            handle = self.module.register_forward_pre_hook(
                lambda mod, args, kwargs: widths.append(int(args[1].size(1))), with_kwargs=True)
            before = {k: v.clone() for k, v in self.mask.weight_mask.items()}
            try:
                score, masks = super().train(ticket, ugs)
            finally:
                handle.remove()
            d = {"edge_index_width_seen": sorted(set(widths)), "test": score}
            if ugs:
                live = ticket.get_masks()
                # best_masks holds the live Parameters, so the ranking uses the last epoch's values
                d["masks_are_live_parameters"] = all(masks[k] is live[k] for k in masks)
                regrown = [(live[k][before[k] == 0] != 0) for k in before if k in live]
                d["pruned_weights_regrown_in_mask_stage"] = int(sum(int(r.sum()) for r in regrown))
                d["pruned_weights_before"] = int(sum(int((v == 0).sum()) for v in before.values()))
                vals = torch.cat([live[k].detach()[before[k] == 0].abs().flatten() for k in before if k in live])
                d["regrown_mask_abs_max"] = float(vals.max()) if vals.numel() else 0.0
                adj = live[glt.EDGE_MASK]
                d["edge_mask_negative"] = int((adj < 0).sum())
            self.diag.append(d)
            return score, masks

    return Recorded


def run_glt(glt, data, theta0, hp, rounds, epochs, seed, rows: list, save) -> None:
    """``rounds`` GLTSearch rounds (one fresh ``GLTSearch`` per round, carrying ``GLTMask``),
    appended to ``rows`` as they finish."""
    Recorded = make_recorder(glt)
    num_edges = data.edge_index.size(1)
    mask = None
    prev_g, prev_pool = num_edges, None
    for r in range(1, rounds + 1):
        module = pyg_gcn(data, seed)
        module.load_state_dict(theta0)
        search = Recorded(module=module, device=torch.device("cpu"), graph=data, lr=hp["lr"],
                          reg_graph=hp["s1"], reg_model=hp["s2"], task="node_classification",
                          optim_args={"weight_decay": hp["weight_decay"]}, prune_rate_model=0.2,
                          prune_rate_graph=0.05, max_train_epochs=epochs, seed=seed)
        search.diag = []
        if mask is not None:
            search.mask = mask
        start = time.perf_counter()
        _, mask_dict, res = search.prune()
        seconds = time.perf_counter() - start
        mask = search.mask
        kept_g = int(torch.count_nonzero(mask.graph_mask))
        # ours masks the weight matrices only; GLTSearch also masks (and prunes) the biases
        weights = {k: v for k, v in mask.weight_mask.items() if v.dim() >= 2}
        biases = {k: v for k, v in mask.weight_mask.items() if v.dim() < 2}
        kept_w = int(sum(int(torch.count_nonzero(v)) for v in weights.values()))
        total_w = sum(v.numel() for v in weights.values())
        # GLTSearch prunes floor(n·p) + 1 of the n survivors, plus every entry tied with the threshold
        pool = int(sum(int(torch.count_nonzero(v)) for v in mask.weight_mask.values()))
        prev_pool = prev_pool if prev_pool is not None else sum(v.numel() for v in mask.weight_mask.values())
        extra_g = (prev_g - int(prev_g * 0.05) - 1) - kept_g
        extra_w = (prev_pool - int(prev_pool * 0.2) - 1) - pool
        prev_g, prev_pool = kept_g, pool
        rows.append({
            "round": r, "graph_sparsity": 1 - kept_g / num_edges, "weight_sparsity": 1 - kept_w / total_w,
            "graph_sparsity_reported": res["graph_sparsity"], "weight_sparsity_reported": res["model_sparsity"],
            "edges_kept": kept_g, "weights_kept": kept_w, "weights_total": total_w,
            "biases_pruned": int(sum(int((v == 0).sum()) for v in biases.values())),
            "biases_total": int(sum(v.numel() for v in biases.values())),
            "edges_pruned_beyond_rate_by_ties": extra_g, "params_pruned_beyond_rate_by_ties": extra_w,
            "test_acc": res["fixed_test"], "unrewound_test_acc": res["unrewound_test"], "seconds": seconds,
            "edge_index_columns_after": int(search.graph.edge_index.size(1)),
            "edges_physically_removed": num_edges - int(search.graph.edge_index.size(1)),
            "edges_at_weight_zero": int((mask.graph_mask == 0).sum()),
            "mask_stage": search.diag[0], "fixed_stage": search.diag[1],
        })
        print(f"glt round {r}: graph {100 * rows[-1]['graph_sparsity']:.2f}% weights "
              f"{100 * rows[-1]['weight_sparsity']:.2f}% test {100 * res['fixed_test']:.2f} {seconds:.0f} s", flush=True)
        save()


def run_ours(model, data, hp, rounds, epochs, seed, progress) -> tuple[list[dict], dict]:
    """``find_ticket`` rounds; adds what leaves ``edge_index`` in ``Ticket.data``."""
    t = sp.gnn.find_ticket(model, data, rounds=rounds, epochs=epochs, lr=hp["lr"], weight_decay=hp["weight_decay"],
                           s1=hp["s1"], s2=hp["s2"], seed=seed, progress=progress, edge_route="edge_weight")
    cols = int(t.data.edge_index.size(1))
    # the ticket as returned must reproduce the last round's accuracy on its pruned graph
    with torch.no_grad():
        out = t.model(t.data.x, t.data.edge_index)
    reproduced = float((out[t.data.test_mask].argmax(-1) == t.data.y[t.data.test_mask]).float().mean())
    extra = {"edge_index_columns_after": cols, "edges_physically_removed": data.edge_index.size(1) - cols,
             "ticket_test_acc_reproduced": reproduced}
    return t.history, extra


def markdown(res: dict) -> str:
    m = res["methods"]
    lines = [f"# GLTSearch (PyG PR #6992) vs sp.gnn.find_ticket (UGS) on Cora, {res['epochs']} + {res['epochs']} "
             f"epochs per round, seed {res['seed']}, 1 thread", "",
             f"Command: `{res['command']}`  ", f"torch {res['torch']}, torch_geometric {res['pyg']}, "
             f"python {res['python']}, structprune {res['git_rev']}; GLTSearch from {res['glt']['source']} "
             f"(git blob {res['glt'].get('git_blob', '–')}, PR head {PR_HEAD[:9]}: "
             f"{res['glt'].get('is_pr_head_blob', '–')}).  ",
             f"Load average at start / end: {res['loadavg_start']} / {res.get('loadavg_end', '(run cut short)')} "
             f"(2 shared cores; timings are noisy).", "",
             "Test accuracy (%) at the best validation epoch of the fixed-mask retraining from θ0. "
             "Sparsity = fraction of the 10,556 directed edges / of the masked weights (the two GCNConv weight "
             "matrices, 737,280 entries) that each method actually reached (GLTSearch also masks the 519 biases, "
             "ranked in the same pool; see below). "
             "`removed` = columns that left `edge_index` (GLTSearch keeps pruned edges at weight 0).", "",
             "| round | GLT graph / weight sp. % | GLT acc | GLT s | GLT removed / at weight 0 | ours (PyG GCN) "
             "graph / weight sp. % | ours (PyG GCN) acc | ours s | ours removed | ours (UGS GCN) acc | "
             "ours (UGS GCN) s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = res.get("dense_pyg_gcn")
    if dense is not None:
        lines.append(f"| 0 (dense PyG GCN) | 0 / 0 | – | – | – | 0 / 0 | {100 * dense['test_acc']:.2f} | "
                     f"{dense['seconds']:.0f} | 0 | – | – |")
    n = max(len(v.get("rounds", [])) for v in m.values())
    for k in range(n):
        def get(name):
            rows = m.get(name, {}).get("rounds", [])
            return rows[k] if k < len(rows) else None
        g, o, u = get("glt_pyg_gcn"), get("ours_pyg_gcn"), get("ours_ugs_gcn")
        sp_ = lambda h: f"{100 * h['graph_sparsity']:.2f} / {100 * h['weight_sparsity']:.2f}" if h else "–"  # noqa
        acc = lambda h: f"{100 * h['test_acc']:.2f}" if h else "–"  # noqa: E731
        sec = lambda h: f"{h['seconds']:.0f}" if h else "–"  # noqa: E731
        g_rm = f"{g['edges_physically_removed']} / {g['edges_at_weight_zero']}" if g else "–"
        o_rm = (f"{10556 - o['edges_kept']}" + ("" if k + 1 < len(m['ours_pyg_gcn']['rounds']) else
                f" (edge_index {m['ours_pyg_gcn']['edge_index_columns_after']} cols)")) if o else "–"
        lines.append(f"| {k + 1} | {sp_(g)} | {acc(g)} | {sec(g)} | {g_rm} | {sp_(o)} | {acc(o)} | {sec(o)} | "
                     f"{o_rm} | {acc(u)} | {sec(u)} |")
    if "glt_pyg_gcn" in m and m["glt_pyg_gcn"].get("rounds"):
        lines += ["", "GLTSearch mask stage per round (recorded by a subclass, values unchanged):", "",
                  "| round | pruned params (weights + biases) before | of them non-zero again after the mask stage | max abs(mask) there "
                  "| masks ranked = last epoch's (live Parameters) | edge_index width the GCN saw | unrewound acc "
                  "| biases pruned | pruned beyond the rate by ties (edges / params) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for h in m["glt_pyg_gcn"]["rounds"]:
            d = h["mask_stage"]
            lines.append(f"| {h['round']} | {d['pruned_weights_before']} | {d['pruned_weights_regrown_in_mask_stage']} "
                         f"| {d['regrown_mask_abs_max']:.3f} | {d['masks_are_live_parameters']} | "
                         f"{d['edge_index_width_seen'] + h['fixed_stage']['edge_index_width_seen']} | "
                         f"{100 * h['unrewound_test_acc']:.2f} | {h['biases_pruned']} / {h['biases_total']} | "
                         f"{h['edges_pruned_beyond_rate_by_ties']} / {h['params_pruned_beyond_rate_by_ties']} |")
    lines += ["", "Notes:", ""] + [f"- {x}" for x in res["glt_notes"]]
    return "\n".join(lines) + "\n"


GLT_NOTES = [
    "GLTSearch.prune() is one UGS round; a second call on the same object fails (AttributeError: 'GCNConv' "
    "object has no attribute 'bias_mask_orig'), so each round is a fresh GLTSearch on a fresh GCN loaded "
    "with θ0, given the previous round's GLTMask.",
    "ignore_keys cannot be used with prune(): GLTModel.apply_mask demands masks for the ignored parameters too "
    "('Masks for [...bias] missing from mask_dict'), and GLTMask.load_and_binarize demands a model mask for "
    "every GLTMask entry ('Model has no masks for ... bias_mask'). So GLTSearch masks and prunes the 519 "
    "biases as well, ranked globally with the weights; the weight sparsity shown is over the 737,280 weight "
    "entries only (the JSON has GLTSearch's own figure over all 737,799 as weight_sparsity_reported).",
    "Rounds >= 2 of GLTSearch start the soft masks at the exact binary masks (no noise); round 1 at "
    "trunc_normal(mean 1, std 1, [1-1e-3, 1+1e-3]); ours U(1-1e-5, 1+1e-5) around the binary masks every round.",
    "GLTSearch's weight masks have no fixed binary factor: a pruned weight's mask gets gradient w·g and "
    "becomes non-zero in the next mask stage, so that stage trains with pruned weights back in (counted "
    "below); binarisation then keeps them pruned. The edge mask passes through relu, so pruned edges stay 0.",
    "GLTSearch's train() returns ticket.get_masks(), the live Parameters, as the 'best' masks, so it ranks the "
    "last epoch's mask values, not those of the best validation epoch (ours and the official code snapshot).",
    "GLTSearch ranks signed mask values (ours |m|) and prunes every entry tied with the threshold (ours breaks "
    "ties by position), so it can prune more than the rate: 'pruned beyond the rate by ties' counts entries "
    "beyond floor(n·p)+1. Ties appear only from round 2 on, when the soft masks restart at exactly 1.0 with no "
    "noise, consistent with many masks getting the same updates (L1 + weight decay only, zero loss gradient); "
    "that is why its weight sparsity runs ahead of 1 - 0.8^k.",
    "GLTSearch's edge mask enters the model through relu: a mask driven below 0 by the L1 term switches its "
    "edge off for the rest of the mask stage (edge_mask_negative in the JSON: edges with a negative mask at the "
    "end of the mask stage); ours passes the signed mask on, as the official code does.",
    "Its lr_mask_model / lr_mask_graph arguments are stored but never used (one optimizer, one lr).",
    "GLTSearch seeds once per GLTSearch object (ours re-seeds each stage), so dropout draws differ.",
    "Accuracy is measured the same way in both: test at the first epoch with the best validation accuracy "
    "of the fixed-mask stage (GLTSearch's fixed_test).",
    "GLTSearch clones the whole Data object on every forward (GLTModel.forward); that cost is in its seconds.",
    "Ours (find_ticket) trains the fixed-mask stage on the graph with pruned edges removed; for GCNConv "
    "(sum aggregation, edge-weighted normalisation) that equals weight 0.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glt-src", default=None, help="graph_lottery_ticket.py extracted from PR #6992")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense PyG GCN baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="folder holding Cora/raw/ (default ../shared/data/planetoid)")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/glt_cora)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--remake-md", action="store_true",
                        help="only rewrite <out>.md from <out>.json (with this script's current notes)")
    args = parser.parse_args(argv)
    stem = Path(args.out) if args.out else RESULTS / "glt_cora"
    if args.remake_md:
        res = json.loads(stem.with_suffix(".json").read_text())
        res["glt_notes"] = GLT_NOTES
        stem.with_suffix(".md").write_text(markdown(res))
        return 0
    methods = [x for x in args.methods.split(",") if x]
    bad = [x for x in methods if x not in METHODS]
    if bad:
        raise SystemExit(f"glt_side_by_side: --methods {bad} unknown; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    import torch_geometric

    glt, glt_info = load_glt(args.glt_src) if "glt_pyg_gcn" in methods else (None, {"source": "not run"})
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = planetoid.load("cora", root=args.root)
    hp = OFFICIAL["cora"]
    seed = hp["seed"]
    res = {"dataset": "cora", "rounds": args.rounds, "epochs": args.epochs, "seed": seed, "hyperparameters": hp,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "pyg": torch_geometric.__version__,
           "python": platform.python_version(), "git_rev": git_rev(), "glt": glt_info,
           "command": "python benchmarks/glt_side_by_side.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "methods": {}, "glt_notes": GLT_NOTES}

    def save() -> None:  # after every round / method, so a cut-short run keeps what it finished
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
        stem.with_suffix(".md").write_text(markdown(res))

    theta0 = {k: v.clone() for k, v in pyg_gcn(data, seed).state_dict().items()}
    if not args.no_dense:
        model = pyg_gcn(data, seed)
        ones_w = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() >= 2}
        t = time.perf_counter()
        _, test, _ = sp.gnn.train_ticket(model, data, torch.ones(data.edge_index.size(1), dtype=torch.bool), ones_w,
                                         theta0, args.epochs, hp["lr"], hp["weight_decay"], seed)
        res["dense_pyg_gcn"] = {"test_acc": test, "seconds": time.perf_counter() - t}
        print(f"dense PyG GCN: test {100 * test:.2f}", flush=True)
    for name in methods:
        res["methods"][name] = {"rounds": [], "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
        if name == "glt_pyg_gcn":
            run_glt(glt, data, theta0, hp, args.rounds, args.epochs, seed, res["methods"][name]["rounds"], save)
        else:
            if name == "ours_pyg_gcn":
                model = pyg_gcn(data, seed)
                model.load_state_dict(theta0)
            else:
                torch.manual_seed(seed)
                model = gnn_ugs.build(data.num_features, int(data.y.max()) + 1, hidden=512)
            history, extra = run_ours(model, data, hp, args.rounds, args.epochs, seed, args.progress)
            res["methods"][name]["rounds"] = history
            res["methods"][name].update(extra)
            for h in history:
                print(f"{name} round {h['round']}: graph {100 * h['graph_sparsity']:.2f}% weights "
                      f"{100 * h['weight_sparsity']:.2f}% test {100 * h['test_acc']:.2f} {h['seconds']:.0f} s",
                      flush=True)
        res["methods"][name]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        save()
    res["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
