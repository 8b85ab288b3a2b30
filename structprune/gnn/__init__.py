"""Graph lottery tickets for PyTorch Geometric models (needs ``torch_geometric``).

- :func:`find_ticket`: unified graph + weight lottery ticket search (UGS, ICML 2021), faithful to
  the official code, on sparse edge lists; returns a :class:`Ticket`.
- :func:`train_ticket`: the fixed-mask (rewind and retrain) stage alone, for baselines.
- :func:`prune_edges`: a copy of a graph without the masked-out edges.
"""
from .ticket import Ticket as Ticket, find_ticket as find_ticket, prune_edges as prune_edges
from .ticket import train_ticket as train_ticket

__all__ = ["Ticket", "find_ticket", "prune_edges", "train_ticket"]
