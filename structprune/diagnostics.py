"""Short, actionable error messages for capture and example-input failures, full detail on demand.

torch.fx and torch.export explain their failures at length (torch.export prints the partial
graph of a detection model, thousands of lines, to stderr before raising). structprune's own
errors stay short: the module, the source line and what to try. Set the environment variable
``STRUCTPRUNE_DEBUG=1`` (the CLI's ``--debug`` does) to keep torch's full texts, its stderr output
and the chained exceptions.

What this module works out when capture fails:

- where: the innermost frame of the model's own code (:func:`user_frame`), found from the files
  that define the model's module classes, so that a model whose code lives in site-packages
  (torchvision) is still pointed at;
- whether the example inputs fit the model at all (:func:`run_eagerly`), and if not, which module
  rejected which input shape (:func:`shape_mismatch`);
- which submodules capture on their own (:func:`capturable_submodules`), the largest first, as
  candidates to prune instead of the whole model (``model.backbone`` of a detector).
"""
from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

DEBUG_ENV = "STRUCTPRUNE_DEBUG"
_LIB_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# Loggers through which torch.export reports a failed export (besides printing to stderr).
_EXPORT_LOGGERS = ("torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental",
                   "torch._subclasses", "torch._functorch")


def debug_enabled() -> bool:
    """Whether full diagnostics were asked for (``STRUCTPRUNE_DEBUG`` set to 1/true/yes/on)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


STRICT_ENV = "STRUCTPRUNE_STRICT"


def strict_enabled() -> bool:
    """Whether a rule that raises while coupling is an error instead of a frozen op
    (``STRUCTPRUNE_STRICT`` set to 1/true/yes/on; the test suite sets it): a broken rule must
    not look like "nothing prunable"."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of ``exc``: its first sentence when the line is long,
    cut to ``limit`` characters."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if len(text) > limit // 2 and ". " in text:
        text = text[:text.index(". ") + 1]
    if len(text) > limit:
        text = text[:limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def full_text(exc: BaseException) -> str:
    """The whole traceback and message of ``exc`` (for debug mode)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Hide what torch prints or logs while it fails (unless debug mode is on).

    ``torch.export`` prints a failed export's partial graph to stderr and logs at ERROR level;
    the structprune error that follows says what matters.
    """
    if debug_enabled():
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --- where ---------------------------------------------------------------------------------------
def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + os.sep)


def model_files(model: Optional[nn.Module]) -> set[str]:
    """Source files of the model's own code: where its module classes define their methods.

    Base classes from torch itself are left out; classes from anywhere else (the user's file,
    torchvision in site-packages) count.
    """
    files: set[str] = set()
    if model is None:
        return files
    for cls in {type(m) for m in model.modules()}:
        for klass in cls.__mro__:
            if klass.__module__.split(".")[0] == "torch" or klass is object:
                continue
            for value in vars(klass).values():
                code = getattr(getattr(value, "__func__", value), "__code__", None)
                if code is not None:
                    files.add(os.path.abspath(code.co_filename))
    return files


def user_frame(exc: BaseException, model: Optional[nn.Module] = None) -> Optional[str]:
    """``file:line: code`` of the innermost frame in the model's own code, or None.

    First choice is a file that defines one of the model's module classes (see
    :func:`model_files`); failing that, the innermost frame outside torch and structprune.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    own = model_files(model)

    def fmt(fr: traceback.FrameSummary) -> str:
        code = (fr.line or linecache.getline(fr.filename, fr.lineno or 0)).strip()
        return f"{fr.filename}:{fr.lineno}: {code}"

    for fr in reversed(frames):
        if os.path.abspath(fr.filename) in own:
            return fmt(fr)
    for fr in reversed(frames):
        f = os.path.abspath(fr.filename)
        if not _is_under(f, _LIB_DIR) and not _is_under(f, _TORCH_DIR) and not f.startswith("<"):
            return fmt(fr)
    return None


# --- does the model run on its inputs? -----------------------------------------------------------
@dataclass
class EagerRun:
    """What one eager forward pass on the example inputs showed.

    Attributes:
        inputs: the first call's ``(args, kwargs)`` of every submodule that ran, by path.
        error: the exception the forward raised, if any.
        failed_module: the path of the innermost module that was running when it raised.
    """

    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    error: Optional[BaseException] = None
    failed_module: Optional[str] = None


def run_eagerly(model: nn.Module, args: tuple, kwargs: dict) -> EagerRun:
    """Run ``model(*args, **kwargs)`` once (eval mode, no grad), recording submodule inputs."""
    from .modes import eval_mode

    run = EagerRun()
    stack: list[str] = []
    handles = []
    for path, m in model.named_modules():
        def pre(mod: nn.Module, a: tuple, kw: dict, path: str = path) -> None:
            stack.append(path)
            run.inputs.setdefault(path, (a, kw))

        def post(mod: nn.Module, a: tuple, kw: dict, out: Any) -> None:
            if stack:
                stack.pop()

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    except Exception as exc:  # the model's own error, whatever its type
        run.error = exc
        run.failed_module = stack[-1] if stack else ""
    finally:
        for h in handles:
            h.remove()
    return run


def _shape(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return str(tuple(v.shape))
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_shape(x) for x in v) + "]"
    return type(v).__name__


def expected_input(module: nn.Module) -> Optional[str]:
    """The input layout a module declares through its size attributes, e.g. ``[N, 3, *]``."""
    if isinstance(getattr(module, "in_channels", None), int):
        return f"[N, {module.in_channels}, *]"
    if isinstance(getattr(module, "in_features", None), int):
        return f"[*, {module.in_features}]"
    if isinstance(getattr(module, "num_features", None), int):
        return f"[N, {module.num_features}, *]"
    if isinstance(getattr(module, "embed_dim", None), int):
        return f"[*, {module.embed_dim}]"
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple) and shape:
        return "[*, " + ", ".join(str(s) for s in shape) + "]"
    if isinstance(getattr(module, "input_size", None), int):
        return f"[*, {module.input_size}]"
    return None


def shape_mismatch(model_name: str, inputs: dict[str, Any], module_path: Optional[str],
                   module: Optional[nn.Module], got: Any, exc: BaseException,
                   node: Optional[str] = None) -> str:
    """One line: which example input, its shape, and what the first failing module expected.

    Args:
        model_name: the model's class name.
        inputs: the example inputs that reach the failing module, by argument name.
        module_path: the failing module's qualified name (``""`` for the model itself).
        module: the failing module, to read its declared input size from.
        got: the values the failing module was called with.
        exc: what it raised.
        node: the failing graph node (``node.format_node()``), when there is a graph.
    """
    given = ", ".join(f"'{k}' of shape {_shape(v)}" for k, v in inputs.items())
    if module_path:
        expect = expected_input(module) if module is not None else None
        what = f" ({type(module).__name__})" if module is not None else ""
        at = (f"module '{module_path}'{what} expects {expect} and got {_shape(got)}"
              if expect else f"module '{module_path}'{what} failed on {_shape(got)}")
        if node:
            at += f" at node {node}"
    elif node:
        at = f"node {node} failed on {_shape(got)}"
    else:
        at = f"{model_name}.forward failed"
    why = first_line(exc)
    return (f"{model_name} does not run on its example inputs: {at}"
            + (f", from input {given}" if given else "") + f": {why}"
            + ("" if why.endswith(".") else ".")
            + " Give example inputs of the shape, dtype and device the model expects.")


# --- what could be pruned instead ----------------------------------------------------------------
_PARTS_FOLLOW = [0]  # > 0 while a failed capture is followed by pruning in parts


@contextlib.contextmanager
def parts_follow() -> Iterator[None]:
    """While active, a failed capture does not look for submodules that capture on their own
    (:func:`capturable_submodules` returns none): pruning in parts
    (:mod:`structprune.partial`) follows and finds them itself."""
    _PARTS_FOLLOW[0] += 1
    try:
        yield
    finally:
        _PARTS_FOLLOW[0] -= 1


@dataclass(frozen=True)
class Candidate:
    """A submodule that captures on its own: its path, parameter count and how it captured."""

    path: str
    num_params: int
    how: str  # "fx" or "export"


def capturable_submodules(model: nn.Module, run: EagerRun,
                          capture_one: Callable[[nn.Module, tuple, dict], str],
                          limit: int = 3, budget_s: float = 30.0) -> list[Candidate]:
    """The largest submodules that capture on their own, largest first.

    Children of the model are tried first, largest by parameter count; a child that does not
    capture is replaced by its own children. Only submodules that ran on the example inputs
    (so their inputs are known) and that hold parameters are tried.

    Args:
        capture_one: ``(module, args, kwargs) -> "fx" | "export"``, raising if it cannot capture.
        limit: the most candidates returned.
        budget_s: stop trying after this many seconds (export can be slow on big submodules).
    """
    if _PARTS_FOLLOW[0]:
        return []
    start = time.monotonic()
    found: list[Candidate] = []
    frontier = [(p, m) for p, m in model.named_children()]
    while frontier and len(found) < limit and time.monotonic() - start < budget_s:
        sized = [(p, m, sum(t.numel() for t in m.parameters())) for p, m in frontier]
        sized = [s for s in sized if s[2] > 0 and s[0] in run.inputs]
        sized.sort(key=lambda s: -s[2])
        frontier = []
        for path, m, size in sized:
            if len(found) >= limit or time.monotonic() - start >= budget_s:
                break
            args, kwargs = run.inputs[path]
            try:
                with quiet_torch():
                    how = capture_one(m, args, kwargs)
            except Exception:  # does not capture: look one level down
                frontier += [(f"{path}.{p}", c) for p, c in m.named_children()]
                continue
            found.append(Candidate(path, size, how))
    found.sort(key=lambda c: -c.num_params)
    return found


def capture_failure(model: nn.Module, fx_exc: BaseException, failed_module: Optional[str],
                    export_exc: Optional[BaseException], candidates: list[Candidate]) -> str:
    """The message of a failed capture: where, why (one line each), and what to try."""
    name = type(model).__name__
    from .partial import parts_of

    if parts_of(model) is not None:  # sp.save / sp.trace on a model sp.prune pruned in parts
        return (f"{name} was pruned in parts (it cannot be captured whole), so it cannot be "
                f"captured as one graph for sp.save, sp.trace or export either: save it with "
                f"torch.save(model, path) and load it with torch.load(path, weights_only=False)"
                f"; or prune and save its parts (sp.report lists them). "
                f"torch.fx: {first_line(fx_exc)}")
    where = (f"module '{failed_module}' ({type(model.get_submodule(failed_module)).__name__})"
             if failed_module else f"the top module ({name})")
    frame = user_frame(fx_exc, model)
    lines = [f"cannot capture {name} as a graph; torch.fx failed in {where}"
             + (f" at\n  {frame}" if frame else "."),
             f"  torch.fx: {first_line(fx_exc)}"]
    if export_exc is not None:
        eframe = user_frame(export_exc, model)
        lines.append(f"  the torch.export fallback failed as well: {first_line(export_exc)}"
                     + (f" (at {eframe})" if eframe and eframe != frame else ""))
    lines.append("This happens when code branches on tensor values, has data-dependent shapes "
                 "(.item(), .nonzero(), loops over a tensor's values) or iterates over inputs.")
    lines.append("Try:")
    if candidates:
        best = candidates[0]
        others = ", ".join(f"model.{c.path} ({c.num_params:,} params)" for c in candidates[1:])
        lines.append(f"  - prune a part that captures on its own: model.{best.path} "
                     f"({best.num_params:,} params), e.g. sp.prune(model.{best.path}, "
                     f"<its input>, ...)" + (f"; also {others}" if others else ""))
    if failed_module:
        cls = type(model.get_submodule(failed_module)).__name__
        lines.append(f"  - make {cls} a leaf: sp.trace(model, x, leaf_modules=[{cls}]); it is "
                     f"then frozen unless you also give a rule (rules={{{cls}: MyRule()}})")
    else:
        lines.append("  - move the data-dependent part (post-processing) out of forward, or "
                     "prune the parts before it")
    lines.append(f"Set {DEBUG_ENV}=1 (CLI: --debug) for torch's full error texts.")
    if debug_enabled():
        lines.append("\n--- torch.fx ---\n" + full_text(fx_exc))
        if export_exc is not None:
            lines.append("\n--- torch.export ---\n" + full_text(export_exc))
    return "\n".join(lines)
