"""docs/design.md describes what is built; plans stand apart, marked (issue 10, item 12)."""
import os
import re

import structprune as sp

ROOT = os.path.join(os.path.dirname(__file__), "..")
DESIGN = open(os.path.join(ROOT, "docs", "design.md")).read()
BUILT, _, PLANS = DESIGN.partition("## Plans (not built yet)")

UNBUILT = ["sp.sparse", "synflow", "structprune demo", "ops/pyg.py", "isomorphic"]


def test_unbuilt_features_are_named_only_under_plans():
    assert PLANS, "docs/design.md has no 'Plans (not built yet)' section"
    for term in UNBUILT:
        assert term not in BUILT, f"{term!r} is described as built in docs/design.md"
        assert not hasattr(sp, term.split(".")[-1]) or not term.startswith("sp.")


def test_files_the_built_layout_names_exist():
    layout = BUILT[BUILT.index("## Layout (as built)"):]
    lib = os.path.join(ROOT, "structprune")
    for name in set(re.findall(r"\b([a-z_]+\.py)\b", layout)):
        found = any(name in files for _, _, files in os.walk(lib))
        assert found, f"docs/design.md's layout names {name}, which does not exist"


def test_importance_names_in_the_docs_resolve():
    for name in ["l1", "l2", "random", "bn_scale", "taylor", "hessian", "fpgm", "lamp"]:
        assert name in DESIGN
        sp.importance.resolve(name)
