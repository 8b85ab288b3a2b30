"""Per-test seeding, one torch thread per xdist worker, float64 by default where tests ask."""
import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
# Strict mode: a rule that raises while coupling fails the test instead of freezing its op.
os.environ.setdefault("STRUCTPRUNE_STRICT", "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
