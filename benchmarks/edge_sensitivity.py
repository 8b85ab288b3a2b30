"""How much does dropping a random fraction of Cora's directed edges cost a GCN, with nothing else
pruned? The floor under "a ticket within 0.5 pt of dense": every UGS round drops 5% of the kept
edges. PyG GCN (hidden 512, dropout 0.5), UGS's Cora hyperparameters (lr 0.008, wd 8e-5, 200
epochs), ``sp.gnn.train_ticket`` (test accuracy at the best validation epoch), same θ0 and
seed for dense and pruned; one random edge subset per seed.

    .venv/bin/python benchmarks/edge_sensitivity.py --seeds 5 --drop 0.05
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structprune as sp  # noqa: E402
from models import planetoid  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--drop", type=float, default=0.05, help="fraction of directed edges dropped")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edge_sensitivity.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    from torch_geometric.nn.models import GCN

    data = planetoid.load("Cora")
    num_edges = data.edge_index.size(1)
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = GCN(data.num_features, 512, 2, 7, dropout=0.5)
        theta0 = copy.deepcopy(model.state_dict())
        named = dict(model.named_parameters())
        ones = {n: torch.ones_like(t, dtype=torch.bool) for n, t in named.items() if t.dim() >= 2}
        keep = torch.rand(num_edges, generator=torch.Generator().manual_seed(100 + seed)) >= args.drop
        row = {"seed": seed, "edges_kept": int(keep.sum())}
        for name, mask in (("dense", torch.ones(num_edges, dtype=torch.bool)), ("pruned", keep)):
            _, test, _ = sp.gnn.train_ticket(model, data, mask, ones, theta0, epochs=200, lr=0.008,
                                             weight_decay=8e-5, seed=seed)
            row[name] = test
        rows.append(row)
        print(row, flush=True)
    summary = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows))
               for k in ("dense", "pruned")}
    print(summary)
    Path(args.out).write_text(json.dumps({"drop": args.drop, "rows": rows, "summary": summary},
                                         indent=1))


if __name__ == "__main__":
    main()
