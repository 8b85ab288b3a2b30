"""Hypothesis draws random DAG CNNs (residual adds, concats, chunks, depthwise and grouped convs,
channel shuffles, flatten -> linear) and every one must pass the oracle, or have nothing prunable
with the frozen ops reported."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from structprune.testing import Pruner, assert_oracle, assert_zero_ratio_identity, randomize_

HW = 6


class RandomNet(nn.Module):
    """Interprets a spec: each step appends one tensor computed from earlier ones."""

    def __init__(self, spec, channels, head):
        super().__init__()
        self.spec, self.head_kind = spec, head
        self.layers = nn.ModuleList()
        for step in spec:
            kind = step[0]
            if kind == "conv":
                _, src, out, k, groups = step
                self.layers.append(nn.Conv2d(channels[src], out, k, padding=k // 2, groups=groups))
            elif kind == "bn":
                self.layers.append(nn.BatchNorm2d(channels[step[1]]))
            else:
                self.layers.append(nn.Identity())
        last = channels[-1]
        self.head = nn.Linear(last * HW * HW if head == "flatten" else last, 5)

    def forward(self, x):
        ts = [x]
        for layer, step in zip(self.layers, self.spec):
            kind = step[0]
            if kind in ("conv", "bn"):
                y = layer(ts[step[1]])
            elif kind == "relu":
                y = F.relu(ts[step[1]])
            elif kind == "add":
                y = ts[step[1]] + ts[step[2]]
            elif kind == "cat":
                y = torch.cat([ts[step[1]], ts[step[2]]], dim=1)
            elif kind == "chunk":
                y = ts[step[1]].chunk(2, dim=1)[step[2]]
            elif kind == "shuffle":
                t, g = ts[step[1]], step[2]
                b, c, h, w = t.size()
                y = t.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
            ts.append(y)
        out = ts[-1]
        if self.head_kind == "flatten":
            return self.head(torch.flatten(out, 1))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


@st.composite
def architectures(draw):
    channels, spec = [3], []
    n_steps = draw(st.integers(2, 9))
    for _ in range(n_steps):
        i = draw(st.integers(0, len(channels) - 1))
        c = channels[i]
        kinds = ["conv", "conv", "bn", "relu"] if i else ["conv"]
        same = [j for j in range(1, len(channels)) if channels[j] == c and j != i]
        if i and same:
            kinds.append("add")
        if i and len(channels) > 2:
            kinds.append("cat")
        if i and c % 2 == 0:
            kinds += ["chunk", "shuffle"]
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            out = draw(st.sampled_from([4, 6, 8]))
            k = draw(st.sampled_from([1, 3]))
            groups = 1
            if i:
                choice = draw(st.sampled_from(["plain", "depthwise", "grouped"]))
                if choice == "depthwise":
                    groups, out = c, c * draw(st.sampled_from([1, 2]))
                elif choice == "grouped" and c % 2 == 0 and out % 2 == 0:
                    groups = 2
            spec.append(("conv", i, out, k, groups))
            channels.append(out)
        elif kind in ("bn", "relu"):
            spec.append((kind, i))
            channels.append(c)
        elif kind == "add":
            spec.append(("add", i, draw(st.sampled_from(same))))
            channels.append(c)
        elif kind == "cat":
            j = draw(st.integers(1, len(channels) - 1))
            spec.append(("cat", i, j))
            channels.append(c + channels[j])
        elif kind == "chunk":
            spec.append(("chunk", i, draw(st.integers(0, 1))))
            channels.append(c // 2)
        else:
            spec.append(("shuffle", i, 2))
            channels.append(c)
    head = draw(st.sampled_from(["flatten", "pool"]))
    return spec, channels, head


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=architectures(), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       importance=st.sampled_from(["random", "l2"]))
def test_random_dag_cnn_passes_the_oracle(arch, ratio, importance):
    spec, channels, head = arch
    torch.manual_seed(0)
    model = randomize_(RandomNet(spec, channels, head)).double().eval()
    x = torch.randn(2, 3, HW, HW, dtype=torch.float64)
    assert_zero_ratio_identity(model, x)
    pruner = Pruner(model, x, ratio=ratio, importance=importance)
    plan = pruner.plan()
    if plan.is_empty:
        # Nothing prunable must be explained: every group has a single unit, or ops are frozen.
        reasons = [e for e in pruner.graph.frozen() if e.op != "output"]
        assert all(g.num_units * ratio < 1 for g in pruner.graph.groups()) or reasons
        return
    assert_oracle(pruner, plan, tol=1e-5)


def test_most_generated_graphs_have_something_to_prune():
    """Guard against a generator whose examples are all frozen (a property that cannot fail)."""
    from hypothesis import Phase

    seen = []

    @settings(max_examples=100, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(arch=architectures())
    def sample(arch):
        spec, channels, head = arch
        model = RandomNet(spec, channels, head).double().eval()
        x = torch.randn(2, 3, HW, HW, dtype=torch.float64)
        plan = Pruner(model, x, ratio=0.5, importance="random").plan()
        seen.append((plan.num_dropped() > 0, {s[0] for s in spec}))

    sample()
    pruned = [kinds for ok, kinds in seen if ok]
    assert len(pruned) >= 0.7 * len(seen)
    assert sum(1 for k in pruned if k & {"add", "cat", "shuffle", "chunk"}) >= 0.3 * len(seen)
