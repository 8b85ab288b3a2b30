"""Pruned and traced models pickle, deep-copy, ``torch.save`` and cross process boundaries like
any module, and give the same outputs afterwards."""
import copy
import io
import multiprocessing
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from tests.graph.test_export_fallback import ResidualShapeIf
from tests.test_io import AutocastNet


class ConvAttention(nn.Module):
    """Convolutions, then the pixels as tokens through an ``nn.MultiheadAttention``."""

    def __init__(self, c: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn(self.conv1(x))))
        t = y.flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.fc(t.mean(1))


def _pruned(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """What pruning hands back when it rewrites the graph (``apply_plan``'s plain module)."""
    pruner = sp.Pruner(model.eval(), x, ratio=0.5)
    out = pruner.apply(pruner.plan())
    assert isinstance(out, fx.GraphModule) and out is not model
    return out


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    x_exp = torch.randn(2, 3, 10, 10)
    fx_pruned = _pruned(ConvAttention(), x)
    export_pruned = _pruned(ResidualShapeIf(), x_exp)
    assert export_pruned.meta.get("structprune_capture") == "export"  # the fallback, really
    # Export captures the autocast region as a higher-order op with a nested GraphModule.
    x_auto = torch.randn(2, 3, 8, 8)
    autocast_pruned = _pruned(AutocastNet(), x_auto)
    assert any(isinstance(m, fx.GraphModule) for _, m in autocast_pruned.named_children())
    traced = sp.trace(ConvAttention().eval(), x).graph_module
    return {"fx_pruned": (fx_pruned, x), "export_pruned": (export_pruned, x_exp),
            "export_autocast": (autocast_pruned, x_auto), "traced": (traced, x)}


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return _models()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run in the spawned process (module level, so that it is found there by name)."""
    with torch.no_grad():
        return model(x)


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fx_pruned", "export_pruned", "export_autocast", "traced"])
def test_pickle_deepcopy_and_torch_save(models, name):
    model, x = models[name]
    again = pickle.loads(pickle.dumps(model))
    _same(model, again, x)
    _same(model, copy.deepcopy(model), x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _same(model, loaded, x)
    # A copy of a copy still pickles (fx re-records the tracer on every copy of the graph).
    _same(model, pickle.loads(pickle.dumps(copy.deepcopy(model))), x)


def test_pickled_pruned_model_keeps_its_class_name(models):
    model, _ = models["fx_pruned"]
    assert type(model).__name__ == "ConvAttention"
    assert type(pickle.loads(pickle.dumps(model))).__name__ == "ConvAttention"


def test_models_cross_a_spawned_process(models):
    """A spawn-context pool receives each model, runs it and sends the output back."""
    ctx = multiprocessing.get_context("spawn")
    jobs = list(models.values())
    with ctx.Pool(1) as pool:
        # A worker that cannot unpickle its task dies and the pool waits for it forever.
        outs = pool.starmap_async(_run, jobs, chunksize=len(jobs)).get(timeout=90)
    for (model, x), out in zip(jobs, outs):
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)
