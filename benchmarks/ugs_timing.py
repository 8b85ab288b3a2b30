"""Seconds per UGS epoch on Cora: the official aggregate-first GCN (dense ``x``) against the
transform-first one with a sparse ``x`` (``models/gnn_ugs.py``), side by side in one process.

Times ``find_ticket``'s two stages (the mask search: train step with the soft masks + evaluation;
the fixed-mask training: train step + evaluation), each as the median over ``--repeats`` runs of
``--epochs`` epochs, with ``torch.set_num_threads`` at every value of ``--threads``, and projects
20 rounds (2 x 200 epochs each). Prints and writes ``benchmarks/results/ugs_timing.{json,md}``.

    .venv/bin/python benchmarks/ugs_timing.py --threads 2 1
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

from models import gnn_ugs, planetoid  # noqa: E402
from structprune.gnn import ticket as ticket_mod  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HP = dict(lr=0.008, weight_decay=8e-5, s1=1e-2, s2=1e-2, seed=2377)  # ALGORITHMS.md §2.6, GCN Cora


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def variants(data):
    """(name, model, data) for the official layout and the fast one, same θ0."""
    torch.manual_seed(HP["seed"])
    slow = gnn_ugs.build(data.num_features, int(data.y.max()) + 1, hidden=512)
    fast = gnn_ugs.build_fast(data.num_features, int(data.y.max()) + 1, hidden=512)
    fast.load_state_dict(slow.state_dict())
    fast_data = data.clone()
    fast_data.x = gnn_ugs.sparse_features(data.x)
    return [("aggregate-first, dense x", slow, data), ("transform-first, sparse x", fast, fast_data)]


def time_stage(model, data, stage: str, epochs: int) -> float:
    """Seconds per epoch of one stage run for ``epochs`` epochs (nothing pruned)."""
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    named = dict(model.named_parameters())
    alive_g = torch.ones(data.edge_index.size(1), dtype=torch.bool)
    alive_w = {n: torch.ones_like(named[n], dtype=torch.bool) for n in names}
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    if stage == "mask":
        ticket_mod._search_masks(model, data, "edge_weight", theta0, alive_g, alive_w, epochs, HP["lr"],
                                 HP["weight_decay"], HP["s1"], HP["s2"], HP["seed"], 1e-5, torch.float32, False)
    else:
        ticket_mod.train_ticket(model, data, alive_g, alive_w, theta0, epochs, HP["lr"], HP["weight_decay"],
                                HP["seed"])
    seconds = (time.perf_counter() - start) / epochs
    model.load_state_dict(theta0)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "ugs_timing"))
    args = parser.parse_args(argv)
    data = planetoid.load("cora")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, model, d in variants(data):
            before = loadavg()
            time_stage(model, d, "mask", 1)  # warm-up
            mask = [time_stage(model, d, "mask", args.epochs) for _ in range(args.repeats)]
            fixed = [time_stage(model, d, "fixed", args.epochs) for _ in range(args.repeats)]
            m, f = statistics.median(mask), statistics.median(fixed)
            rows.append({"threads": threads, "variant": name, "mask_epoch_s": m, "fixed_epoch_s": f,
                         "mask_runs": mask, "fixed_runs": fixed, "projected_20_rounds_min": 20 * 200 * (m + f) / 60,
                         "loadavg_before": before, "loadavg_after": loadavg()})
            print(f"{threads} thread(s) {name}: mask {1000 * m:.0f} ms, fixed {1000 * f:.0f} ms per epoch; "
                  f"20 rounds ~ {rows[-1]['projected_20_rounds_min']:.1f} min; load {before} -> {loadavg()}",
                  flush=True)
    lines = ["# UGS epoch time on Cora: official aggregate-first GCN vs transform-first with sparse x", "",
             f"`benchmarks/ugs_timing.py --threads {' '.join(map(str, args.threads))} --epochs {args.epochs} "
             f"--repeats {args.repeats}`; medians of {args.repeats} runs of {args.epochs} epochs; 20 rounds = "
             f"20 x 200 x (mask + fixed). torch {torch.__version__}.", "",
             "| threads | model | mask-stage epoch (ms) | fixed-stage epoch (ms) | projected 20 rounds (min) "
             "| load avg before → after |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['variant']} | {1000 * r['mask_epoch_s']:.0f} | "
                     f"{1000 * r['fixed_epoch_s']:.0f} | {r['projected_20_rounds_min']:.1f} | "
                     f"{r['loadavg_before']} → {r['loadavg_after']} |")
    md = "\n".join(lines) + "\n"
    print(md)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1))
    Path(args.out).with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
