"""Session-wide test settings, set once so that no result depends on which test modules were collected first."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

# One intra-op thread for every test: toy models train bit-identically whatever the test order, and on two
# cores one thread is faster than two contending ones (measured: 64 px fwd+bwd 0.07 s vs 0.8 s under load).
torch.set_num_threads(1)
