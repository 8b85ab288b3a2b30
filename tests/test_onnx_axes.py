"""Per-input dynamic axes in sp.export_onnx (dim 0 is not always a batch: edge_index is [2, E])."""
import onnx
import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.export.onnx import ExportError


class Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x, edge_index):
        h = self.lin(x)
        return h.index_select(0, edge_index[0]) * h.index_select(0, edge_index[1])


def dims(path):
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(path).graph.input}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_axes_per_input(tmp_path, exporter):
    x, ei = torch.randn(5, 4), torch.randint(0, 5, (2, 7))
    path = str(tmp_path / "g.onnx")
    sp.export_onnx(Gather(), (x, ei), path, exporter=exporter,
                   dynamic_axes={0: {0: "nodes"}, "input_1": {1: "edges"}})
    d = dims(path)
    assert d["input_0"] == ["nodes", 4] and d["input_1"] == [2, "edges"]
    sp.export_onnx(Gather(), (x, ei), path, exporter=exporter)  # default: batch where it fits
    d = dims(path)
    assert d["input_0"][0] == "batch" and d["input_1"] == [2, 7]  # [2, E] is no batch


def test_dynamic_axes_errors_name_the_input(tmp_path):
    x, ei = torch.randn(5, 4), torch.randint(0, 5, (2, 7))
    with pytest.raises(ExportError, match="names input 'y'"):
        sp.export_onnx(Gather(), (x, ei), str(tmp_path / "g.onnx"), dynamic_axes={"y": {0: "n"}})
    with pytest.raises(ExportError, match="has no dim 2"):
        sp.export_onnx(Gather(), (x, ei), str(tmp_path / "g.onnx"), dynamic_axes={1: {2: "n"}})


def test_a_file_the_onnx_checker_rejects_falls_back_to_the_other_exporter(tmp_path, monkeypatch):
    """An exporter that writes an invalid file (the dynamo exporter on timm's Gemma4 ViT: a
    node reads a value no earlier node makes) is a failed attempt: the other exporter runs."""
    from onnx import TensorProto, helper

    import structprune.export.onnx as sp_onnx

    real = sp_onnx._export

    def export(m, args, path, ex, axes, names):
        if ex == "torchscript":  # an invalid graph: Relu reads 'missing'
            node = helper.make_node("Relu", ["missing"], ["y"])
            graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
                "input_0", TensorProto.FLOAT, [5, 4])], [helper.make_tensor_value_info(
                    "y", TensorProto.FLOAT, [5, 4])])
            onnx.save(helper.make_model(graph), path)
            return
        real(m, args, path, ex, axes, names)

    monkeypatch.setattr(sp_onnx, "_export", export)
    x = torch.randn(5, 4)
    res = sp.export_onnx(nn.Linear(4, 3), (x,), str(tmp_path / "m.onnx"), check=True)
    assert res.exporter == "dynamo"
    with pytest.raises(ExportError, match="fails onnx's checker"):
        sp.export_onnx(nn.Linear(4, 3), (x,), str(tmp_path / "m.onnx"), exporter="torchscript",
                       check=True)
