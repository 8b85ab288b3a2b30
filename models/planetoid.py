"""Planetoid citation graphs (Cora, CiteSeer, PubMed) loaded offline, never downloaded.

The raw files live in ``../shared/data/planetoid/<Name>/raw/`` next to the repository (see the
README there: sources, checksums, measured baselines; PubMed lacks ``ind.pubmed.allx`` and so
cannot be loaded). PyG's ``Planetoid`` writes ``processed/`` next to ``raw/``, so :func:`load`
copies the raw files of one dataset to a temporary directory, builds the dataset there (~0.2 s)
and removes the directory again: the shared folder is only read, and concurrent loads cannot race
on a cache.

Example:
    >>> from models import planetoid
    >>> data = planetoid.load("Cora")
    >>> data.num_nodes, data.num_features, int(data.train_mask.sum())
    (2708, 1433, 140)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data" / "planetoid"
NAMES = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
RAW_SUFFIXES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


def raw_dir(name: str = "Cora", root: str | Path | None = None) -> Path:
    """The folder holding dataset ``name``'s raw ``ind.<name>.*`` files under ``root``
    (default: ``../shared/data/planetoid`` relative to the repository root)."""
    return _root(root) / _canonical(name) / "raw"


def load(
    name: str = "Cora", root: str | Path | None = None, normalize: bool = True, split: str = "public"
) -> Any:
    """Load Planetoid dataset ``name`` as one ``torch_geometric.data.Data`` graph, offline.

    Args:
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"`` (any case).
        root: the folder holding ``<Name>/raw/``; a relative path is taken relative to the
            repository root. Default ``../shared/data/planetoid``.
        normalize: row-normalise the node features (``T.NormalizeFeatures()``), as in the GCN and
            GAT papers.
        split: PyG's ``split`` (``"public"``, ``"full"`` or ``"random"``; ``"geom-gcn"`` needs
            split files that are not stored, and fails like any missing file).

    Returns:
        ``Data`` with ``x``, ``edge_index`` (both directions of each edge), ``y`` and the
        ``train_mask``/``val_mask``/``test_mask`` of ``split``.

    Raises:
        FileNotFoundError: the raw files are missing; the message names the folder and files.
        ValueError: ``name`` is not a Planetoid dataset.
    """
    canonical = _canonical(name)
    source = raw_dir(canonical, root)
    if not source.is_dir():
        raise FileNotFoundError(
            f"Planetoid {canonical}: no raw data folder {source}; put PyG's Planetoid raw files "
            f"(ind.{canonical.lower()}.x, ...) there or pass root= (nothing is downloaded)"
        )
    files = [f"ind.{canonical.lower()}.{suffix}" for suffix in RAW_SUFFIXES]
    missing = [f for f in files if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Planetoid {canonical}: missing raw file(s) {', '.join(missing)} in {source}; "
            f"put the files of PyG's Planetoid layout there or pass root= (nothing is downloaded)"
        )

    import torch_geometric.transforms as T
    from torch_geometric.datasets import Planetoid

    class OfflinePlanetoid(Planetoid):
        def download(self) -> None:
            raise FileNotFoundError(
                f"Planetoid {canonical} split={split!r}: files missing from {source} "
                f"and structprune never downloads"
            )

    with tempfile.TemporaryDirectory(prefix="structprune-planetoid-") as tmp:
        shutil.copytree(source, Path(tmp) / canonical / "raw")
        dataset = OfflinePlanetoid(
            tmp, canonical, split=split, transform=T.NormalizeFeatures() if normalize else None
        )
        return dataset[0]


def _root(root: str | Path | None) -> Path:
    if root is None:
        return DEFAULT_ROOT
    root = Path(root)
    return root if root.is_absolute() else REPO_ROOT / root


def _canonical(name: str) -> str:
    try:
        return NAMES[name.lower()]
    except KeyError:
        choices = sorted(NAMES.values())
        raise ValueError(f"unknown Planetoid dataset {name!r}; choose one of {choices}") from None
