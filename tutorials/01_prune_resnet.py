# ---
# jupytext:
#   text_representation:
#     format_name: percent
# ---
# %% [markdown]
# # Prune a CIFAR ResNet-20 to half its channels
#
# Trace the model, look at its coupled groups, prune 50% of every group by L2 magnitude, check
# the result against the masked-activation oracle, print the before/after report, and export to
# ONNX with an onnxruntime equivalence check. `SP_TINY=1` runs it on a narrow model (the tests do).

# %%
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's models/
import models  # noqa: E402
import structprune as sp  # noqa: E402
from structprune.testing import masked_output, max_rel_diff  # noqa: E402

tiny = os.environ.get("SP_TINY") == "1"
torch.manual_seed(0)
model = models.get("resnet20", width=0.5 if tiny else 1.0).eval()
(x,) = models.example_inputs("resnet20")

# %% [markdown]
# ## The dependency graph: which channels must go together

# %%
graph = sp.trace(model, x)
print(graph)
for group in graph.groups()[:3]:
    print(" ", group)

# %% [markdown]
# ## Plan, apply, and check against the oracle

# %%
pruner = sp.Pruner(model, x, ratio=0.5, importance="l2", ignore=[model.fc])
plan = pruner.plan()
pruned = pruner.apply(plan)
with torch.no_grad():
    diff = max_rel_diff(pruned(x), masked_output(plan.graph, plan))
print(plan, f"oracle max rel diff {diff:.1e}")

# %% [markdown]
# ## Report and export

# %%
rep = sp.report(model, pruned, x)
print(rep)
with tempfile.TemporaryDirectory() as d:
    result = sp.export_onnx(pruned, x, os.path.join(d, "resnet20_pruned.onnx"), check=True)
    print(f"ONNX ({result.exporter} exporter): onnxruntime max |diff| {result.max_abs_diff:.1e}")

assert diff < 1e-4 and rep.macs_kept < 0.5 and rep.params_kept < 0.5
