"""Structured UGS on Cora: one mask per coupled channel unit (``find_ticket(structured=True)``)
beside UGS's edge mask; MACs and latency of the *physically* pruned model on the pruned graph.

Model: the UGS paper's GCN (``models/gnn_ugs.py``, 1433-512-7, aggregate-then-transform, bias-free,
source-degree normalisation; ``--model ugs``) or PyG's ``GCNConv`` GCN (``models/gnn.py``, hidden
512; ``--model gcn``), official Cora hyperparameters (``../shared/ALGORITHMS.md`` §2.6: seed 2377,
lr 0.008, weight decay 8e-5, s1 = s2 = 1e-2; 200 + 200 epochs per round). The dense baseline is
the fixed-mask stage with nothing pruned (same θ0, same training), as in
``benchmarks/ugs_planetoid.py``.

Per round: graph sparsity, channel sparsity (units over all groups), test accuracy (best
validation epoch of the fixed-mask stage) and MACs of the physically pruned model on the pruned
graph: structprune's counter (``structprune.macs.count_macs`` on the pruned model traced on the
pruned graph: the Linears) plus the message aggregations counted as they run
(``structprune.gnn.masks.count_message_macs``: edges incl. self-loops x width). Then the round
with the largest MAC reduction whose test accuracy is within ``--tolerance`` (0.5 pt) of dense,
and the latency of its model on its graph against the dense model on the full graph: torch
forward and onnxruntime (``sp.export_onnx``), 1 thread each, calls interleaved, medians of
``--runs`` repeats, all in one process. The last round is timed too.

    .venv/bin/python benchmarks/ugs_structured.py --rounds 8 --threads 1
    .venv/bin/python benchmarks/ugs_structured.py --model gcn --rounds 8 --epochs 100

PubMed cannot run here: its raw ``ind.pubmed.allx`` is missing from ``../shared/data/planetoid``.
Writes ``benchmarks/results/ugs_structured_<dataset>_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structprune as sp  # noqa: E402
from models import gnn, gnn_ugs, planetoid  # noqa: E402
from structprune.gnn.masks import count_dense_macs, count_message_macs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from ugs_planetoid import OFFICIAL  # noqa: E402  (ALGORITHMS.md §2.6; PubMed needs its allx file)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def build(model: str, num_features: int, num_classes: int, hidden: int) -> torch.nn.Module:
    if model == "ugs":
        return gnn_ugs.build(num_features, num_classes, hidden=hidden)
    return gnn.build("gcn", num_features, num_classes, hidden=hidden)


def macs(model: torch.nn.Module, x: torch.Tensor, edge_index: torch.Tensor) -> dict[str, int]:
    dense, messages = count_dense_macs(model, x, edge_index), count_message_macs(model, x, edge_index)
    return {"macs": dense + messages, "macs_dense": dense, "macs_messages": messages}


def time_interleaved(fns: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved (A B C A B C ...) after ``warmup``
    unrecorded rounds, so that machine noise falls on every side alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t)
    return out


def torch_call(model, x, ei):
    def call():
        with torch.no_grad():
            return model(x, ei)
    return call


def ort_call(path: str, x, ei):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (x, ei))}
    return lambda: sess.run(None, feeds)


def pick(history: list[dict], dense: dict, tolerance: float) -> dict | None:
    """The round with the largest MAC reduction whose test accuracy is within ``tolerance`` of
    dense (fewest MACs; ties: the later round)."""
    ok = [h for h in history if h["test_acc"] >= dense["test_acc"] - tolerance]
    return min(ok, key=lambda h: (h["macs"], -h["round"])) if ok else None


def latency(cases: dict[str, tuple], runs: int, warmup: int, tmp: str) -> dict[str, dict]:
    """``cases``: ``{name: (model, x, edge_index)}``; torch and onnxruntime medians (ms)."""
    fns: dict[str, Callable[[], Any]] = {}
    for name, (model, x, ei) in cases.items():
        model.eval()
        fns[f"{name}/torch"] = torch_call(model, x, ei)
        path = f"{tmp}/{name}.onnx"
        res = sp.export_onnx(model, (x, ei), path, check=True)
        fns[f"{name}/ort"] = ort_call(path, x, ei)
        print(f"  {name}: exported with {res.exporter}, max |onnx - torch| {res.max_abs_diff:.2e}", flush=True)
    times = time_interleaved(fns, runs, warmup)
    out: dict[str, dict] = {}
    for key, xs in times.items():
        name, backend = key.split("/")
        q = statistics.quantiles(xs, n=4)
        out.setdefault(name, {})[backend] = {"median_ms": round(statistics.median(xs) * 1e3, 3),
                                             "q25_ms": round(q[0] * 1e3, 3), "q75_ms": round(q[2] * 1e3, 3)}
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = planetoid.load(args.dataset, root=args.root)
    hp = OFFICIAL[args.dataset]
    num_classes = int(data.y.max()) + 1
    torch.manual_seed(hp["seed"])
    model = build(args.model, data.num_features, num_classes, args.hidden)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    result: dict[str, Any] = {
        "dataset": args.dataset, "model": args.model, "hidden": args.hidden, "rounds": args.rounds,
        "epochs": args.epochs, "graph_rate": args.graph_rate, "weight_rate": args.weight_rate,
        "threads": torch.get_num_threads(), "hyperparameters": hp, "torch": torch.__version__,
        "loadavg_start": loadavg(),
        "macs_counted_by": "structprune.macs.count_macs on the pruned model traced on the pruned graph "
                           "(Linears) + structprune.gnn.masks.count_message_macs (aggregations as they run)",
    }
    ones_g = torch.ones(data.edge_index.size(1), dtype=torch.bool)
    t = time.perf_counter()
    val, test, state = sp.gnn.train_ticket(model, data, ones_g, {}, theta0, args.epochs, hp["lr"],
                                           hp["weight_decay"], hp["seed"])
    model.load_state_dict(state)
    dense_model = build(args.model, data.num_features, num_classes, args.hidden)
    dense_model.load_state_dict(state)
    dense_model.eval()
    result["dense"] = {"val_acc": val, "test_acc": test, "seconds": time.perf_counter() - t,
                       "params": sum(p.numel() for p in dense_model.parameters()),
                       **macs(dense_model, data.x, data.edge_index)}
    print(f"dense: test {100 * test:.2f}, {result['dense']['macs'] / 1e6:.1f} M MACs", flush=True)
    model.load_state_dict(theta0)

    tickets: dict[int, Any] = {}

    def on_round(ticket):
        h = ticket.history[-1]
        tickets[h["round"]] = ticket
        print(f"round {h['round']}: graph {100 * h['graph_sparsity']:.2f}%, channels "
              f"{100 * h['channel_sparsity']:.2f}% ({h['channels_kept']} kept), test {100 * h['test_acc']:.2f}, "
              f"{h['macs'] / 1e6:.1f} M MACs, {h['seconds']:.0f} s (load {loadavg()})", flush=True)
        result["history"] = ticket.history
        save(result, args)

    t = time.perf_counter()
    ticket = sp.gnn.find_ticket(model, data, rounds=args.rounds, graph_rate=args.graph_rate,
                                weight_rate=args.weight_rate, epochs=args.epochs, lr=hp["lr"],
                                weight_decay=hp["weight_decay"], s1=hp["s1"], s2=hp["s2"], seed=hp["seed"],
                                progress=False, structured=True, on_round=on_round)
    result["search_seconds"] = time.perf_counter() - t
    result["history"] = ticket.history
    best = pick(ticket.history, result["dense"], args.tolerance)
    result["best_round"] = None if best is None else best["round"]
    cases = {"dense": (dense_model, data.x, data.edge_index)}
    if best is not None:
        tb = tickets[best["round"]]
        cases[f"round{best['round']}"] = (tb.model, tb.data.x, tb.data.edge_index)
    last = ticket.history[-1]["round"]
    cases.setdefault(f"round{last}", (ticket.model, ticket.data.x, ticket.data.edge_index))
    with torch.no_grad():  # each timed model reproduces its round's accuracy on its graph
        for name, (m, x, ei) in cases.items():
            if name != "dense":
                out = m(x, ei)
                acc = float((out[data.test_mask].argmax(-1) == data.y[data.test_mask]).float().mean())
                assert acc == tickets[int(name[5:])].history[-1]["test_acc"], (name, acc)
    print(f"latency ({args.runs} runs, load {loadavg()})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lat = latency(cases, args.runs, args.warmup, tmp)
    for name, row in lat.items():
        for backend in ("torch", "ort"):
            row[backend]["ratio_to_dense"] = round(row[backend]["median_ms"] / lat["dense"][backend]["median_ms"], 3)
    result["latency"] = lat
    result["loadavg_end"] = loadavg()
    result["wall_seconds"] = time.perf_counter() - t + result["dense"]["seconds"]
    save(result, args)
    return result


def random_control(path: Path, rounds: list[int], threads: int) -> dict:
    """Random structured tickets at the counts of ``rounds`` of the result in ``path``: random
    channel units (the same number kept, ranked globally like the search: one random score per
    unit, every group keeping one) and random edges (the same number), the same θ0 and the same
    fixed-mask training; adds ``random`` rows to the result."""
    from structprune.gnn import masks

    torch.set_num_threads(threads)
    r = json.loads(path.read_text())
    data = planetoid.load(r["dataset"])
    hp = r["hyperparameters"]
    torch.manual_seed(hp["seed"])
    model = build(r["model"], data.num_features, int(data.y.max()) + 1, r["hidden"])
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    units = masks.ChannelUnits(model, data.x, data.edge_index)
    g = torch.Generator().manual_seed(hp["seed"])
    scores = {gid: torch.rand(n, generator=g) for gid, n in units.groups.items()}
    edge_scores = torch.rand(data.edge_index.size(1), generator=g)
    rows = {int(k): v for k, v in r.get("random", {}).items()}
    for k in rounds:
        h = r["history"][k - 1]
        alive = units.ones()
        while sum(int(a.sum()) for a in alive.values()) > h["channels_kept"]:  # one unit at a time: exact
            alive = masks.prune_lowest_units(scores, alive, 1e-9)
        edges = torch.zeros_like(edge_scores, dtype=torch.bool)
        edges[torch.argsort(edge_scores, descending=True)[:h["edges_kept"]]] = True
        t = time.perf_counter()
        val, test, _ = sp.gnn.train_ticket(model, data, edges, units.weight_masks(alive, "gates"), theta0,
                                           r["epochs"], hp["lr"], hp["weight_decay"], hp["seed"])
        rows[k] = {"round": k, "channels_kept": int(sum(int(a.sum()) for a in alive.values())),
                   "edges_kept": int(edges.sum()), "val_acc": val, "test_acc": test,
                   "seconds": time.perf_counter() - t, "loadavg": loadavg()}
        print(f"random at round {k}: test {100 * test:.2f} (ticket {100 * h['test_acc']:.2f})", flush=True)
        r["random"] = {str(j): v for j, v in sorted(rows.items())}
        path.write_text(json.dumps(r, indent=1))
        path.with_suffix(".md").write_text(markdown(r))
    return r


def markdown(r: dict) -> str:
    d = r["dense"]
    lines = [
        f"# Structured UGS: {r['dataset']}, {'UGS GCN' if r['model'] == 'ugs' else 'PyG GCN'} "
        f"(hidden {r['hidden']})",
        "",
        f"`find_ticket(structured=True)`, {r['rounds']} rounds of {r['epochs']} + {r['epochs']} epochs, "
        f"graph_rate {r['graph_rate']}, weight_rate {r['weight_rate']} (of the kept channel units), "
        f"official hyperparameters {r['hyperparameters']}; {r['threads']} thread(s), torch {r['torch']}, "
        f"load average {r['loadavg_start']} (start) / {r.get('loadavg_end', '?')} (end).",
        "",
        f"MACs: {r['macs_counted_by']}.",
        "",
        "| round | graph sparsity | channel sparsity (kept) | params | MACs (M) | of dense | test acc | vs dense "
        "| random, same counts |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | 0.00% | 0.00% ({r['hidden']}) | {d['params']:,} | {d['macs'] / 1e6:.1f} | 100.0% | "
        f"{100 * d['test_acc']:.2f} | | |",
    ]
    randoms = r.get("random", {})
    for h in r.get("history", []):
        rnd = randoms.get(str(h["round"]))
        rnd_acc = "" if rnd is None else f"{100 * rnd['test_acc']:.2f}"
        lines.append(
            f"| {h['round']} | {100 * h['graph_sparsity']:.2f}% | {100 * h['channel_sparsity']:.2f}% "
            f"({h['channels_kept']}) | {h['weights_kept']:,} | {h['macs'] / 1e6:.1f} | "
            f"{100 * h['macs'] / d['macs']:.1f}% | {100 * h['test_acc']:.2f} | "
            f"{100 * (h['test_acc'] - d['test_acc']):+.2f} | {rnd_acc} |")
    if "latency" in r:
        best, tol = r["best_round"], 100 * r.get("tolerance", 0.005)
        lines += ["", (f"Largest MAC reduction within {tol:.1f} pt of dense: round {best}." if best is not None
                       else f"No round is within {tol:.1f} pt of dense.")]
        for wider in (1.0, 2.0):
            if wider > tol:
                h = pick(r["history"], d, wider / 100)
                lines.append(f"Within {wider:.1f} pt: " + (f"round {h['round']} ({100 * h['macs'] / d['macs']:.1f}% "
                                                           f"of the dense MACs)." if h else "none."))
        lines += ["", "Latency of the physically pruned model on its pruned graph vs the dense model on the "
                  "full graph (1 thread, calls interleaved, medians):", "",
                  "| model, graph | torch ms (median) | ratio | onnxruntime ms (median) | ratio |",
                  "|---|---|---|---|---|"]
        for name, row in r["latency"].items():
            what = "dense, full graph" if name == "dense" else f"{name}, its pruned graph"
            lines.append(f"| {what} | {row['torch']['median_ms']:.2f} | {row['torch']['ratio_to_dense']:.3f} | "
                         f"{row['ort']['median_ms']:.2f} | {row['ort']['ratio_to_dense']:.3f} |")
    return "\n".join(lines) + "\n"


def save(result: dict, args: argparse.Namespace) -> None:
    result["tolerance"] = args.tolerance
    stem = RESULTS / f"ugs_structured_{args.dataset}_{args.model}{args.suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cora", choices=sorted(OFFICIAL))
    p.add_argument("--model", default="ugs", choices=["ugs", "gcn"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--graph-rate", type=float, default=0.05)
    p.add_argument("--weight-rate", type=float, default=0.2)
    p.add_argument("--tolerance", type=float, default=0.005, help="accuracy tolerance vs dense (fraction)")
    p.add_argument("--runs", type=int, default=30, help="latency repeats")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=None, help="folder with <Name>/raw (default ../shared/data/planetoid)")
    p.add_argument("--suffix", default="", help="appended to the output file names")
    p.add_argument("--markdown-from", default=None, help="only re-render the markdown of this JSON result")
    p.add_argument("--random-control", default=None,
                   help="comma-separated rounds: train random structured tickets at their counts (needs "
                        "--markdown-from)")
    args = p.parse_args(argv)
    if args.random_control:
        if not args.markdown_from:
            p.error("--random-control needs --markdown-from RESULT.json (the counts come from it)")
        random_control(Path(args.markdown_from), [int(k) for k in args.random_control.split(",")], args.threads)
        return 0
    if args.markdown_from:
        r = json.loads(Path(args.markdown_from).read_text())
        Path(args.markdown_from).with_suffix(".md").write_text(markdown(r))
        print(markdown(r))
        return 0
    r = run(args)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
