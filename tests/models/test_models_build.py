from __future__ import annotations

import pytest
import torch
import torch.fx

import models

SEGMENTATION = {"unet"}
DETECTION = {"yolov8n"}


@pytest.mark.parametrize("name", models.names())
def test_model_builds_runs_and_traces(name: str) -> None:
    torch.manual_seed(0)
    model = models.get(name, num_classes=7).double().eval()
    inputs = tuple(t.double() for t in models.example_inputs(name))

    with torch.no_grad():
        out = model(*inputs)
        again = model(*inputs)
        traced = torch.fx.symbolic_trace(model)
        out_traced = traced(*inputs)

    batch, _, height, width = inputs[0].shape
    if name in SEGMENTATION:
        expected = (batch, 7, height, width)
    elif name in DETECTION:  # 4 box coordinates + 7 classes, one anchor per cell of 3 levels
        expected = (batch, 4 + 7, sum((height // s) * (width // s) for s in (8, 16, 32)))
    else:
        expected = (batch, 7)
    assert out.shape == expected
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert torch.equal(out, again), "eval forward is not deterministic"
    assert torch.equal(out, out_traced), "fx.symbolic_trace changed the output"


def test_registry() -> None:
    small = models.names()
    large = set(models.names(include_large=True)) - set(small)
    assert large == {"resnet50", "resnet101", "resnet152", "densenet121"}
    assert not any(models.is_large(n) for n in small)
    with pytest.raises(KeyError, match="unknown model"):
        models.get("no_such_model")


def test_checker_entry_points() -> None:
    from models.cifar_resnet import resnet20, resnet56

    assert resnet20()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in resnet56().parameters()) > sum(p.numel() for p in resnet20().parameters())
