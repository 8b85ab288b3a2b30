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
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from ..errors import StructpruneError
from ..graph.trace import ExampleInputs, normalize_inputs

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


def _export(model: nn.Module, args: tuple, path: str, exporter: str, dynamic_batch: bool,
            names: list[str]) -> None:
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
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
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
            prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes,
                                     input_names=names)
            prog.save(path)


def export_onnx(model: nn.Module, example_inputs: ExampleInputs, path: str, check: bool = True,
                exporter: Exporter = "auto", dynamic_batch: bool = True, rtol: float = 1e-3,
                atol: float = 1e-4) -> ExportResult:
    """Export ``model`` to ``path``; with ``check``, verify it with onnx and onnxruntime.

    The model is exported in float32 (a copy; the model is not changed) because onnxruntime's CPU
    kernels are float32. Raises :class:`ExportError` naming the exporter(s) and the failure.
    """
    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        raise ExportError("export_onnx takes positional example inputs (a tensor or a tuple)")
    m = copy.deepcopy(model).float().eval()
    args = _float32(args)
    names = [f"input_{i}" for i in range(len(args))]
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors = []
    used = None
    for ex in order:
        try:
            _export(m, args, path, ex, dynamic_batch, names)
            used = ex
            break
        except Exception as exc:  # exporters raise many types
            errors.append(f"{ex}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    if used is None:
        raise ExportError("ONNX export failed with " + "; ".join(errors))
    diff = _check(m, args, path, rtol, atol, used) if check else None
    return ExportResult(path, used, diff)


def _check(m: nn.Module, args: tuple, path: str, rtol: float, atol: float, exporter: str) -> float:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from ..oracle import flatten_outputs

    onnx.checker.check_model(onnx.load(path))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)
             if isinstance(a, torch.Tensor)}
    got = sess.run(None, feeds)
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
