"""Graph neural networks and their graphs (needs ``torch_geometric``).

- :func:`prune`: structured pruning of a GNN's channels together with its graph's edges and
  nodes; returns the smaller model with the smaller graph (:class:`GraphPruneResult`).
- :func:`find_ticket`: unified graph + weight lottery ticket search (UGS, ICML 2021), faithful to
  the official code, on sparse edge lists; returns a :class:`Ticket`.
- :func:`train_ticket`: the fixed-mask (rewind and retrain) stage alone, for baselines.
- :func:`prune_edges`: a copy of a graph without the masked-out edges.
- :mod:`minibatch`: the mini-batch (neighbour-sampled) path of ``find_ticket(num_neighbors=...)``
  and ``minibatch.evaluate``.
"""
from .prune import GraphPruneResult as GraphPruneResult, graph_oracle_diff as graph_oracle_diff
from .prune import prune as prune
from .ticket import Ticket as Ticket, find_ticket as find_ticket, prune_edges as prune_edges
from .ticket import train_ticket as train_ticket

__all__ = ["GraphPruneResult", "Ticket", "find_ticket", "graph_oracle_diff", "prune", "prune_edges",
           "train_ticket"]


def __getattr__(name: str):
    # minibatch subclasses PyG's sampler at import: imported on first use, so that importing
    # structprune (and loading a saved model) never imports torch_geometric
    if name == "minibatch":
        import importlib

        return importlib.import_module(".minibatch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
