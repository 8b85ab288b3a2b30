"""YOLOv8 (models/yolov8.py): C2f's chunk halves, SPPF, the PAN neck and the decoupled heads
prune exactly; DFL's 16 fixed bins stay whole, with a reason; the pruned net runs at other image
sizes and batches."""
import pytest
import torch

import models
import structprune as sp
from structprune.rules import Space
from structprune.testing import Pruner, assert_oracle, randomize_


def _model(size="n"):
    torch.manual_seed(0)
    m = randomize_(models.get("yolov8n", size=size, num_classes=3)).double().eval()
    return m, (torch.randn(2, 3, 64, 64, dtype=torch.float64),)


def test_output_layout_and_fx():
    m, x = _model()
    with torch.no_grad():
        out = m(*x)
    assert out.shape == (2, 4 + 3, 8 * 8 + 4 * 4 + 2 * 2)
    assert torch.equal(torch.fx.symbolic_trace(m)(*x), out)
    assert not m.detect.dfl.conv.weight.requires_grad
    assert m.detect.dfl.conv.weight.flatten().tolist() == list(range(16))


def test_prunes_exactly_and_keeps_dfl_bins_with_a_reason():
    m, x = _model()
    g = sp.trace(m, x)
    assert g.is_frozen(Space.param("detect.dfl.conv.weight", 1))
    assert g.is_frozen(Space.param("detect.cv2.0.2.weight", 0))  # 4 x 16 bins per level
    dfl = [e for e in g.frozen() if e.blocks and e.module.startswith("detect.dfl")]
    assert any("softmax" in e.op for e in dfl), g.frozen()
    pruned = assert_oracle(Pruner(m, x, ratio=0.5), tol=1e-6)
    assert pruned.get_parameter("stage1.1.cv1.conv.weight").shape[0] == 16  # both halves 16->8
    assert pruned.get_parameter("detect.dfl.conv.weight").shape == (1, 16, 1, 1)
    rep = sp.report(m, pruned, x)
    assert rep.macs_kept < 0.35 and "->0 " not in rep.table()
    with torch.no_grad():  # other sizes and batches
        assert pruned(torch.randn(1, 3, 96, 128, dtype=torch.float64)).shape == (1, 7, 252)


def test_size_s_is_wider():
    n, s = models.get("yolov8n"), models.get("yolov8n", size="s")
    assert s.stem.conv.out_channels == 2 * n.stem.conv.out_channels == 32
    with pytest.raises(ValueError, match="size must be one of"):
        models.get("yolov8n", size="x")
