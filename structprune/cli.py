"""Command line: ``structprune prune | report | export``.

A model is ``package.module:factory`` or ``path/to/file.py:factory`` (a callable returning a model
or ``(model, example_inputs)``) or a ``.sp`` file written by ``prune``. The factory is called with
the keyword arguments of ``--kwargs`` and ``--arg``; without ``--shape``, its example inputs are
used, else random tensors of those shapes.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import os
import random
import sys
import traceback
import warnings
from typing import Any, Iterator, NoReturn, Optional, Sequence

import torch
import torch.nn as nn

from .diagnostics import DEBUG_ENV, debug_enabled, first_line
from .errors import ModelError, NothingPrunedWarning, StructpruneError, StructpruneWarning

EPILOG = """\
factory arguments:
  --kwargs '{"num_classes": 10, "width": 0.5}'   a JSON object of keyword arguments
  --arg num_classes=10 --arg name=resnet        one keyword argument each; the value is a
                                                Python literal (10, 0.5, True, None, [1, 2],
                                                "text") or, if it is not one, a plain string.
                                                --arg wins over the same key in --kwargs.

exit codes:
  0  success
  1  a structprune error: the model cannot be loaded, captured or pruned (message on stderr;
     with --json also {"error": {"type": ..., "message": ...}} on stdout)
  2  bad usage (unknown option, malformed --shape, --arg or --kwargs)
  3  prune only: nothing, or much less than asked, was pruned (NothingPrunedWarning); the
     output is not written. --allow-noop writes it and exits 0.

debugging: --debug, or the environment variable STRUCTPRUNE_DEBUG=1, keeps torch's full error
texts and prints tracebacks.
"""

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOTHING_PRUNED = 0, 1, 2, 3


class _Error(StructpruneError):
    """A user mistake the CLI reports by itself (a module that will not load, a bad path)."""


def _load_factory(spec: str) -> Any:
    """The callable named by ``module:factory`` or ``file.py:factory``."""
    if ":" not in spec:
        raise _Error(f"model {spec!r} must be module:factory, file.py:factory or a .sp file")
    mod_name, fn = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise _Error(f"no such file: {mod_name}")
            s = importlib.util.spec_from_file_location(os.path.basename(mod_name)[:-3], mod_name)
            if s is None or s.loader is None:
                raise _Error(f"cannot load {mod_name}")
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except StructpruneError:
        raise
    except ModuleNotFoundError as exc:
        raise _Error(f"cannot import {mod_name!r}: {exc} (run from the directory that holds it, "
                     f"or give path/to/file.py:{fn})") from exc
    except Exception as exc:  # the module's own code failed while importing
        raise _Error(f"importing {mod_name} failed: {first_line(exc)}") from exc
    factory = getattr(mod, fn, None)
    if not callable(factory):
        names = [n for n in vars(mod) if not n.startswith("_") and callable(vars(mod)[n])]
        raise _Error(f"{mod_name} has no callable {fn!r}; it has: {', '.join(names[:10])}")
    return factory


def load_model(spec: str, shapes: Sequence[tuple[int, ...]],
               kwargs: Optional[dict] = None) -> tuple[nn.Module, tuple]:
    """Resolve a model argument and its example inputs (random tensors of ``--shape``).

    Raises:
        StructpruneError: the model cannot be loaded, its factory fails or returns something
            that is not a module, or there are no example inputs; the message says which.
    """
    if spec.endswith(".sp"):
        from .io import load

        if kwargs:
            raise _Error("--kwargs/--arg are for factories; a .sp file takes none")
        if not os.path.isfile(spec):
            raise _Error(f"no such file: {spec}")
        model: Any = load(spec)
        inputs = None
    else:
        factory = _load_factory(spec)
        try:
            built = factory(**(kwargs or {}))
        except Exception as exc:  # the user's factory: report, do not dump a traceback
            raise _Error(f"the factory {spec} raised {first_line(exc)}"
                         + ("" if kwargs else " (pass its arguments with --arg key=value)")) \
                from exc
        model, inputs = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} gave a {type(model).__name__}, not an nn.Module (a factory "
                         f"returns a model or (model, example_inputs))")
    if shapes:
        inputs = tuple(torch.randn(*s) for s in shapes)
    elif inputs is None:
        raise _Error("give --shape (e.g. --shape 1,3,224,224) for the example input")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return model.eval(), (dict(inputs) if isinstance(inputs, dict) else tuple(inputs))


def _writable(path: str) -> str:
    """Fail early (before a long prune) when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _Error(f"output {path!r} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise _Error(f"cannot write {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise _Error(f"cannot write {path!r}: no permission to write in {folder!r}")
    return path


def _factory_kwargs(a: argparse.Namespace) -> dict:
    out = dict(a.kwargs or {})
    out.update(dict(a.arg))
    return out


def _seed(n: Optional[int]) -> None:
    """Seed torch, random and numpy (before the model and its random inputs are built)."""
    if n is None:
        return
    random.seed(n)
    torch.manual_seed(n)
    try:
        import numpy as np

        np.random.seed(n)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def _cmd_prune(a: argparse.Namespace) -> dict:
    from . import pruner
    from .io import save
    from .report import report

    _writable(a.output)
    model, x = load_model(a.model, a.shape, _factory_kwargs(a))
    modules = dict(model.named_modules())
    unknown = [n for n in a.ignore if n not in modules]
    if unknown:
        raise StructpruneError(f"--ignore {unknown[0]!r} is not a submodule; some are: "
                               f"{', '.join(list(modules)[1:8])}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StructpruneWarning)
        pruned = pruner.prune(model, x, ratio=a.ratio, importance=a.importance,
                              ignore=[modules[n] for n in a.ignore], global_=a.global_,
                              target_macs=a.target_macs, round_to=a.round_to,
                              iterative_steps=a.steps)
    for w in caught:  # on to main(), which prints them
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    a.nothing_pruned = any(issubclass(w.category, NothingPrunedWarning) for w in caught)
    rep = report(model, pruned, x, ignore=[modules[n] for n in a.ignore])
    if a.nothing_pruned and not a.allow_noop:  # refused: main() exits 3, nothing is written
        if not a.json:
            print(rep)
        return {"output": None, **rep.to_dict()}
    try:  # the inputs let save() capture, with torch.export, a model that fx cannot trace
        save(pruned, a.output, example_inputs=x)
    except OSError as exc:
        raise _Error(f"cannot write {a.output!r}: {exc.strerror or exc}") from exc
    if not a.json:
        print(rep)
        print(f"saved {a.output}")
    return {"output": a.output, **rep.to_dict()}


def _cmd_report(a: argparse.Namespace) -> dict:
    from .io import load
    from .report import report

    model, x = load_model(a.model, a.shape, _factory_kwargs(a))
    pruned = load(a.pruned) if a.pruned else None
    rep = report(model, pruned, x)
    if not a.json:
        print(rep)
    return rep.to_dict()


def _cmd_export(a: argparse.Namespace) -> dict:
    from .export.onnx import export_onnx

    _writable(a.output)
    model, x = load_model(a.model, a.shape, _factory_kwargs(a))
    res = export_onnx(model, x, a.output, check=not a.no_check, exporter=a.exporter)
    out = {"output": res.path, "exporter": res.exporter, "max_abs_diff": res.max_abs_diff}
    if not a.json:
        diff = "" if res.max_abs_diff is None else f", onnxruntime max |diff| {res.max_abs_diff:.2e}"
        print(f"wrote {res.path} ({res.exporter} exporter{diff})")
    return out


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write e.g. 1,3,224,224")
    return dims


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}; write e.g. "
                                         f"'{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value (e.g. num_classes=10)")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # not a Python literal: a plain string
    return key.strip(), value


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that also answers usage errors in JSON when ``--json`` was given."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            print(json.dumps({"error": {"type": "UsageError", "message": message}}))
        super().error(message)


def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="structprune", description=__doc__, epilog=EPILOG, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="module:factory, file.py:factory or a .sp file")
        q.add_argument("--shape", action="append", default=[], type=_shape,
                       help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
        q.add_argument("--kwargs", type=_kwargs, default=None, metavar="JSON",
                       help="keyword arguments of the factory, a JSON object")
        q.add_argument("--arg", action="append", default=[], type=_arg, metavar="KEY=VALUE",
                       help="one keyword argument of the factory (a Python literal or a string)")
        q.add_argument("--seed", type=int, default=None,
                       help="seed torch, random and numpy before building model and inputs")
        q.add_argument("--json", action="store_true",
                       help="print one JSON object on stdout (errors: {\"error\": {...}})")
        q.add_argument("--debug", action="store_true",
                       help=f"full torch error texts and tracebacks (same as {DEBUG_ENV}=1)")

    q = sub.add_parser("prune", help="prune a model and save it as a .sp file", epilog=EPILOG,
                       formatter_class=fmt)
    common(q)
    q.add_argument("-o", "--output", required=True, help="where to write the pruned model (.sp)")
    q.add_argument("--ratio", type=float, default=None, help="fraction of units removed per group (default 0.5)")
    q.add_argument("--target-macs", type=float, default=None, help="fraction of MACs to keep")
    q.add_argument("--importance", default="l2", help="l1 l2 random bn_scale fpgm lamp ...")
    q.add_argument("--global", dest="global_", action="store_true", help="rank units globally")
    q.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of N")
    q.add_argument("--steps", type=int, default=1, help="iterative steps with re-scoring")
    q.add_argument("--ignore", action="append", default=[], help="submodule name to keep whole")
    q.add_argument("--allow-noop", action="store_true",
                   help="exit 0 even when nothing or much less than asked was pruned")
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


def _report_warnings(caught: list, as_json: bool) -> list[dict]:
    """Print structprune's warnings as plain lines (not Python warning lines with file paths);
    pass every other warning on as usual. Returns them for the JSON output."""
    out = []
    for w in caught:
        if issubclass(w.category, StructpruneWarning):
            out.append({"type": w.category.__name__, "message": str(w.message)})
            if not as_json:
                print(f"structprune: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code (see ``structprune --help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    args = parser().parse_args(argv)
    with _debug_env(args.debug):
        return _run(args)


@contextlib.contextmanager
def _debug_env(on: bool) -> Iterator[None]:
    """Set ``STRUCTPRUNE_DEBUG=1`` for the duration of one ``main()`` call when ``on``.

    The previous value (or its absence) is restored afterwards: ``main()`` run in-process (by a
    test, a notebook, a wrapper script) must not switch the library to debug mode for good,
    which would make every later capture error carry torch's full texts.
    """
    if not on:
        yield
        return
    before = os.environ.get(DEBUG_ENV)
    os.environ[DEBUG_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; report warnings and errors; return the exit code."""
    _seed(args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StructpruneWarning)
        try:
            out = args.func(args)
        except Exception as exc:  # every failure ends in one message, never a raw traceback
            _report_warnings(caught, args.json)
            return _fail(exc, args.json)
    found = _report_warnings(caught, args.json)
    code = EXIT_OK
    if getattr(args, "nothing_pruned", False) and not args.allow_noop:
        code = EXIT_NOTHING_PRUNED
        if not args.json:
            print(f"structprune: error: nothing or too little was pruned (see the warning "
                  f"above), so {args.output} was not written; pass --allow-noop to accept it",
                  file=sys.stderr)
    if args.json:
        print(json.dumps({**out, "warnings": found} if found else out))
    return code


def _fail(exc: BaseException, as_json: bool) -> int:
    """Report ``exc`` on stderr (and as JSON on stdout); return exit code 1."""
    if isinstance(exc, StructpruneError):
        kind, message = type(exc).__name__, str(exc)
        if isinstance(exc, _Error):
            kind = "StructpruneError"
    else:  # not a user mistake we know of: say so, traceback only when debugging
        kind, message = type(exc).__name__, (f"unexpected {first_line(exc)} (a structprune bug? "
                                             f"rerun with --debug for the traceback)")
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"structprune: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message}}))
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
