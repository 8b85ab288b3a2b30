"""Export to ONNX with a checker pass and an onnxruntime equivalence check.

Both PyTorch exporters are supported: the TorchScript-based one (``exporter="torchscript"``) and
the dynamo-based one (``"dynamo"``); ``"auto"`` tries TorchScript first and falls back, and the
result says which one produced the file. The check runs the exported model in onnxruntime on the
example inputs and compares with the torch output in float32: the largest difference must be at
most ``atol + rtol * max|output|`` (``rtol=1e-3, atol=1e-4`` by default).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import StructpruneError
from ..graph.capture import ExampleInputs, normalize_inputs

Exporter = Literal["auto", "torchscript", "dynamo"]


class ExportError(StructpruneError):
    """Export failed, or the exported model disagrees with the torch model."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    exporter: str
    max_abs_diff: Optional[float]


def _float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_float32(v) for v in x)
    return x


AxesSpec = dict[Any, dict[int, str]]  # input index or name -> {dim: symbolic name}


def _axes(names: list[str], args: tuple, dynamic_batch: bool,
          dynamic_axes: Optional[AxesSpec],
          captured: Optional[dict[str, dict[int, str]]] = None) -> Optional[dict[str, dict[int, str]]]:
    """``{input name: {dim: name}}``: the user's ``dynamic_axes`` (by input index or name; an
    input left out has static dims), else the sizes a ``torch.export`` capture left open
    (``captured``), else dim 0 of every tensor input as ``batch``."""
    if dynamic_axes is None:
        if not dynamic_batch:
            return None
        if captured is not None:
            return captured
        tensors = [(n, a) for n, a in zip(names, args) if isinstance(a, torch.Tensor) and a.dim()]
        if not tensors:
            return None
        batch = tensors[0][1].shape[0]  # inputs whose dim 0 is another size are not batched
        return {n: {0: "batch"} for n, a in tensors if a.shape[0] == batch}
    out = {}
    for key, dims in dynamic_axes.items():
        name = f"input_{key}" if isinstance(key, int) else key  # by the input's position
        if name not in names:
            raise ExportError(f"dynamic_axes names input {key!r}, but the file's inputs are "
                              f"{', '.join(names)} (or their positions)")
        a = args[names.index(name)]
        bad = [d for d in dims if not isinstance(a, torch.Tensor) or not 0 <= d < a.dim()]
        if bad:
            raise ExportError(f"dynamic_axes: input {name} has no dim {bad[0]}")
        out[name] = {int(d): str(v) for d, v in dims.items()}
    return out


def _cause(exc: BaseException) -> str:
    """An exporter's failure in one line: the innermost cause's last non-empty line (torch's own
    first lines are often headers such as "... Next steps:")."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


class _Baked(nn.Module):
    """``model`` with the inputs at ``positions`` fixed to buffers: it takes the others."""

    def __init__(self, model: nn.Module, args: tuple, positions: list[int]) -> None:
        super().__init__()
        self.model, self.positions, self.n = model, positions, len(args)
        for k in positions:
            self.register_buffer(f"input_{k}", args[k])

    def forward(self, *rest: Any) -> Any:
        it = iter(rest)
        args = [getattr(self, f"input_{k}") if k in self.positions else next(it)
                for k in range(self.n)]
        return self.model(*args)


def captured_axes(model: nn.Module, names: list[str]) -> Optional[dict[str, dict[int, str]]]:
    """The input sizes a model captured by ``torch.export`` runs at (the graph's placeholders
    hold symbolic sizes there: a GNN's node and edge counts, a batch), as ONNX dynamic axes;
    one name per symbol, so sizes export found equal stay equal. None for other models."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or \
            model.meta.get("structprune_capture") != "export":  # type: ignore[union-attr]
        return None
    out: dict[str, dict[int, str]] = {}
    symbols: dict[str, str] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, ph in zip(names, placeholders):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None:
                if _guarded(model, ph, d, size):
                    continue  # captured for a range or relation ONNX cannot check: static
                key = str(size.node.expr)
                out.setdefault(name, {})[d] = symbols.setdefault(key, f"{name}_dim{d}")
    return out or None


def _guarded(model: nn.Module, ph: "torch.fx.Node", d: int, size: "torch.SymInt") -> bool:
    """Whether the capture holds only for some sizes of dim ``d`` of input ``ph`` beyond a
    lower bound: an upper bound (``W <= 4`` from a branch) or a relation (``H * W == 16``)
    among its guards. An ONNX file with that axis open would compute the captured branch for
    every size, so the axis stays static (onnxruntime refuses other sizes)."""
    import re

    import sympy

    vr = size.node.shape_env.var_to_range.get(size.node.expr)
    if isinstance(getattr(vr, "upper", None), sympy.Integer):  # not torch's int_oo
        return True
    names = [str(ph.target)] + [f"flat_args'][{k}" for k, n in enumerate(
        model.meta.get("structprune_flat_inputs", ())) if n == ph.name]  # type: ignore
    refs = [f"L['{n}'].size()[{d}]" for n in names]
    for code in model.meta.get("structprune_guards", ()):  # type: ignore[union-attr]
        if any(r in code for r in refs) and \
                not re.fullmatch(r"\s*L\[[^\]]+\](\[\d+\])?\.size\(\)\[\d+\] >= \d+\s*", code):
            return True
    return False


def _export(model: nn.Module, args: tuple, path: str, exporter: str,
            axes: Optional[dict[str, dict[int, str]]], names: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            from ..oracle import flatten_outputs

            with torch.no_grad():
                n_out = len(flatten_outputs(model(*args)))
            # Explicit output names: the exporter otherwise reads model.graph, which on an
            # fx.GraphModule is the fx graph, not a TorchScript one.
            torch.onnx.export(model, args, path, input_names=names,
                              output_names=[f"output_{k}" for k in range(n_out)],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        else:
            shapes = None
            if axes:
                dims: dict[str, Any] = {}
                shapes = tuple({d: dims.setdefault(v, torch.export.Dim(v))
                                for d, v in axes.get(n, {}).items()} or None
                               for n in names)
            if isinstance(model, _Baked) and shapes is not None:
                shapes = (shapes,)  # forward(*rest): export nests the shapes of *args once
            prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes,
                                     input_names=names)
            prog.save(path)


def export_onnx(model: nn.Module, example_inputs: ExampleInputs, path: str, check: bool = True,
                exporter: Exporter = "auto", dynamic_batch: bool = True, rtol: float = 1e-3,
                atol: float = 1e-4, dynamic_axes: Optional[AxesSpec] = None,
                check_inputs: Sequence[ExampleInputs] = (),
                constant_inputs: Sequence[int] = ()) -> ExportResult:
    """Export ``model`` to ``path``; with ``check``, verify it with onnx and onnxruntime.

    Inputs are named ``input_0``, ``input_1``, ... With ``dynamic_batch`` dim 0 is a symbolic
    ``batch`` for every tensor input whose dim 0 has the first input's size (others stay static); ``dynamic_axes`` says it per input instead, keyed by position
    or name, e.g. ``{0: {0: "nodes"}, 1: {1: "edges"}}`` for ``(x [N, F], edge_index [2, E])``
    (inputs it leaves out keep static shapes). A model captured by ``torch.export`` (graph
    neural networks, models fx cannot trace) gets the sizes its capture left open instead of
    ``batch``: any graph size, any batch. ``check_inputs`` are more inputs (of other sizes) to
    compare torch and onnxruntime on. ``constant_inputs`` are positions of inputs to bake into
    the file as constants (a GNN's fixed graph: ``constant_inputs=[1]`` keeps ``edge_index``
    inside, and the file takes only ``x``); the other inputs keep their names ``input_<i>``,
    and ``check_inputs`` still list every input (the baked ones are skipped).

    The model is exported in float32 (a copy; the model is not changed) because onnxruntime's CPU
    kernels are float32. Raises :class:`ExportError` naming the exporter(s) and the failure.
    """
    args, kwargs = normalize_inputs(example_inputs)
    keywords: Optional[list[str]] = None
    if kwargs:
        try:
            args = _leading_positional(model, args, kwargs)
        except ExportError:
            if args:
                raise
            keywords, args = list(kwargs), tuple(kwargs.values())
    m = copy.deepcopy(model).float().eval()
    if hasattr(m, "real_recompile"):  # a lazy GraphModule's copy: give it its real signature
        m.real_recompile()
    _float32_literals(m)
    args = _float32(args)
    names = [f"input_{i}" for i in range(len(args))]
    captured = captured_axes(model, names) if keywords is None else None
    call_kwargs = dict(zip(keywords, args)) if keywords is not None else {}
    with torch.no_grad():
        objects = _has_objects(m(**call_kwargs) if keywords is not None else m(*args))
    if objects:  # a Hugging Face model's key/value cache: no ONNX form
        m = _without_objects(m, () if keywords is not None else args, call_kwargs)
        if isinstance(m, fx.GraphModule):  # its placeholders are the inputs as given
            keywords, captured = None, captured_axes(m, names)
    if keywords is not None:  # keyword inputs that are not forward's leading parameters
        m = _KeywordCall(m, keywords)
    baked = sorted({int(k) for k in constant_inputs})
    if baked:
        if any(not 0 <= k < len(args) or not isinstance(args[k], torch.Tensor) for k in baked):
            raise ExportError(f"constant_inputs {list(constant_inputs)}: the inputs are tensors "
                              f"at positions 0..{len(args) - 1}; name the ones to bake")
        m = _Baked(m, args, baked)
        keep = [k for k in range(len(args)) if k not in baked]
        if captured:
            captured = {n: d for n, d in captured.items() if int(n.rpartition("_")[2]) in keep}
        names, args = [names[k] for k in keep], tuple(args[k] for k in keep)
        check_inputs = [tuple(a for k, a in enumerate(normalize_inputs(c)[0]) if k in keep)
                        for c in check_inputs]
    axes = _axes(names, args, dynamic_batch, dynamic_axes, captured)
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    if exporter == "auto" and captured:  # TorchScript would bake sizes computed from data
        order.reverse()
    errors = []
    for ex in order:
        try:
            _export(m, args, path, ex, axes, names)
        except Exception as exc:  # exporters raise many types
            errors.append(f"{ex}: {type(exc).__name__}: {_cause(exc)}")
            continue
        if not check:
            return ExportResult(path, ex, None)
        try:  # a file onnxruntime computes differently: the next exporter may do better
            diff = _check(m, args, path, rtol, atol, ex)
            for other in check_inputs:
                more = _float32(normalize_inputs(other)[0])
                diff = max(diff, _check(m, more, path, rtol, atol, ex))
        except ExportError as exc:
            errors.append(str(exc))
            continue
        return ExportResult(path, ex, diff)
    if len(errors) == 1 and errors[0].startswith(("output", "onnxruntime")):
        raise ExportError(errors[0])
    raise ExportError("ONNX export failed with " + "; ".join(errors))


def _check(m: nn.Module, args: tuple, path: str, rtol: float, atol: float, exporter: str) -> float:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from ..oracle import flatten_outputs

    try:
        onnx.checker.check_model(onnx.load(path))
    except onnx.checker.ValidationError as exc:  # an exporter's invalid file: try the next
        raise ExportError(f"{exporter}: the file fails onnx's checker: "
                          f"{(str(exc).splitlines() or [''])[0]}") from None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)
             if isinstance(a, torch.Tensor)}
    try:
        got = sess.run(None, feeds)
    except Exception as exc:  # onnxruntime's own error types
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        raise ExportError(f"onnxruntime cannot run the exported model on inputs of shapes "
                          f"{shapes} ({exporter} exporter): {str(exc).splitlines()[0][:300]}"
                          ) from None
    with torch.no_grad():
        want = [t.numpy() for t in flatten_outputs(m(*args))]
    if len(got) != len(want):
        raise ExportError(f"onnxruntime returned {len(got)} outputs, torch {len(want)} "
                          f"({exporter} exporter)")
    worst = 0.0
    for k, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise ExportError(f"output {k}: onnxruntime shape {g.shape}, torch {w.shape} "
                              f"({exporter} exporter)")
        if w.size:
            worst = max(worst, float(np.abs(g - w).max()))
        # Tolerance relative to the output's scale: float32 rounding grows with the largest
        # activations, and an element near zero can carry an error of that size.
        scale = float(np.abs(w).max()) if w.size else 0.0
        if w.size and float(np.abs(g - w).max()) > atol + rtol * scale:
            raise ExportError(f"output {k}: onnxruntime differs from torch by up to "
                              f"{np.abs(g - w).max():.3e} (allowed {atol} + {rtol} x max|output| "
                              f"= {atol + rtol * scale:.3e}; {exporter} exporter)")
    return worst


def _leading_positional(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Keyword example inputs (``{"input_ids": ids}``) as positional ones, where they are the
    forward's leading parameters (an ONNX file's inputs are positional)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = names[len(args):len(args) + len(kwargs)]
    if set(rest) != set(kwargs):
        missing = [n for n in rest if n not in kwargs]
        raise ExportError(f"export_onnx takes the forward's leading inputs: "
                          f"{list(kwargs)} are not forward's next parameters"
                          + (f" ('{missing[0]}' comes first)" if missing else "")
                          + "; pass a tuple of positional inputs")
    return tuple(args) + tuple(kwargs[n] for n in rest)


class _KeywordCall(nn.Module):
    """``model(**dict(zip(names, inputs)))``: keyword inputs (``input_ids``,
    ``decoder_input_ids``) as the positional inputs of an ONNX file, in the order given."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *inputs: Any) -> Any:
        return self.model(**dict(zip(self.names, inputs)))


def _float32_literals(m: nn.Module) -> None:
    """A graph captured in float64 names float64 in its casts (``x.to(torch.float64)``); the
    float32 copy that is exported casts to float32 instead (onnxruntime would refuse a MatMul
    of both)."""
    for gm in [x for x in m.modules() if isinstance(x, fx.GraphModule)]:
        changed = False
        for n in gm.graph.nodes:
            swap = lambda v: torch.float32 if v is torch.float64 else v  # noqa: E731
            args = fx.node.map_aggregate(n.args, swap)
            kwargs = fx.node.map_aggregate(n.kwargs, swap)
            if args != n.args or kwargs != n.kwargs:
                n.args, n.kwargs, changed = args, kwargs, True
        if changed:
            gm.recompile()


def _has_objects(out: Any) -> bool:
    """Whether an output holds values other than tensors, numbers, None and containers."""
    if out is None or isinstance(out, (torch.Tensor, int, float, bool)):
        return False
    if isinstance(out, dict):
        return any(_has_objects(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return any(_has_objects(v) for v in out)
    return True


def _tensors_only(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # a ModelOutput too: its fields, as flatten_outputs orders them
        kept = {k: _tensors_only(v) for k, v in out.items()}
        return tuple(kept[k] for k in sorted(kept) if kept[k] is not None)
    if isinstance(out, (list, tuple)):
        return tuple(_tensors_only(v) for v in out)
    return None


class _TensorOutputs(nn.Module):
    """The model with only the tensors of its output (a cache object has no ONNX form)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> Any:
        return _tensors_only(self.model(*inputs))


def _without_objects(m: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """``m`` as a graph captured by ``torch.export`` (which leaves cache objects out, see
    ``graph/export_capture.py``), or, if that fails, ``m`` with only its output tensors."""
    from ..graph.export_capture import capture_export

    try:
        gm = capture_export(m, args, kwargs)
    except Exception:  # export raises many types: keep the tensors of the model's own output
        return _TensorOutputs(m)
    gm.real_recompile() if hasattr(gm, "real_recompile") else None
    return gm
