"""Command line: ``structprune prune | report | export``.

A model is ``package.module:factory`` or ``path/to/file.py:factory`` (called with no arguments,
returning a model or ``(model, example_inputs)``) or a ``.sp`` file written by ``prune``. Exit
codes: 0 success, 1 a structprune error (message on stderr), 2 bad usage.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .errors import StructpruneError


def load_model(spec: str, shapes: Sequence[str]) -> tuple[nn.Module, tuple]:
    """Resolve a model argument and its example inputs (random tensors of ``--shape``)."""
    if spec.endswith(".sp"):
        from .io import load

        model: Any = load(spec)
        inputs = None
    else:
        if ":" not in spec:
            raise StructpruneError(f"model {spec!r} must be module:factory, file.py:factory or a "
                                   f".sp file")
        mod_name, fn = spec.rsplit(":", 1)
        if mod_name.endswith(".py"):
            s = importlib.util.spec_from_file_location(os.path.basename(mod_name)[:-3], mod_name)
            if s is None or s.loader is None:
                raise StructpruneError(f"cannot load {mod_name}")
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
        built = getattr(mod, fn)()
        model, inputs = built if isinstance(built, tuple) else (built, None)
    if inputs is None:
        if not shapes:
            raise StructpruneError("give --shape (e.g. --shape 1,3,224,224) for the example input")
        inputs = tuple(torch.randn(*[int(v) for v in s.split(",")]) for s in shapes)
    return model.eval(), tuple(inputs)


def _cmd_prune(a: argparse.Namespace) -> dict:
    from .io import save
    from .pruner import prune
    from .report import report

    model, x = load_model(a.model, a.shape)
    modules = dict(model.named_modules())
    unknown = [n for n in a.ignore if n not in modules]
    if unknown:
        raise StructpruneError(f"--ignore {unknown[0]!r} is not a submodule; some are: "
                               f"{', '.join(list(modules)[1:8])}")
    pruned = prune(model, x, ratio=a.ratio, importance=a.importance,
                   ignore=[modules[n] for n in a.ignore], global_=a.global_,
                   target_macs=a.target_macs, round_to=a.round_to, iterative_steps=a.steps)
    save(pruned, a.output)
    rep = report(model, pruned, x)
    if not a.json:
        print(rep)
        print(f"saved {a.output}")
    return {"output": a.output, **rep.to_dict()}


def _cmd_report(a: argparse.Namespace) -> dict:
    from .io import load
    from .report import report

    model, x = load_model(a.model, a.shape)
    pruned = load(a.pruned) if a.pruned else None
    rep = report(model, pruned, x)
    if not a.json:
        print(rep)
    return rep.to_dict()


def _cmd_export(a: argparse.Namespace) -> dict:
    from .export.onnx import export_onnx

    model, x = load_model(a.model, a.shape)
    res = export_onnx(model, x, a.output, check=not a.no_check, exporter=a.exporter)
    out = {"output": res.path, "exporter": res.exporter, "max_abs_diff": res.max_abs_diff}
    if not a.json:
        diff = "" if res.max_abs_diff is None else f", onnxruntime max |diff| {res.max_abs_diff:.2e}"
        print(f"wrote {res.path} ({res.exporter} exporter{diff})")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structprune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="module:factory, file.py:factory or a .sp file")
        q.add_argument("--shape", action="append", default=[],
                       help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
        q.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    q = sub.add_parser("prune", help="prune a model and save it as a .sp file")
    common(q)
    q.add_argument("-o", "--output", required=True, help="where to write the pruned model (.sp)")
    q.add_argument("--ratio", type=float, default=0.5, help="fraction of units removed per group")
    q.add_argument("--target-macs", type=float, default=None, help="fraction of MACs to keep")
    q.add_argument("--importance", default="l2", help="l1 l2 random bn_scale fpgm lamp ...")
    q.add_argument("--global", dest="global_", action="store_true", help="rank units globally")
    q.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of N")
    q.add_argument("--steps", type=int, default=1, help="iterative steps with re-scoring")
    q.add_argument("--ignore", action="append", default=[], help="submodule name to keep whole")
    q.set_defaults(func=_cmd_prune)

    q = sub.add_parser("report", help="params and MACs of a model, or before/after pruning")
    common(q)
    q.add_argument("--pruned", default=None, help="a .sp file to compare with")
    q.set_defaults(func=_cmd_report)

    q = sub.add_parser("export", help="export to ONNX and check it with onnxruntime")
    common(q)
    q.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    q.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"])
    q.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    q.set_defaults(func=_cmd_export)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = args.func(args)
    except StructpruneError as exc:
        print(f"structprune: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
