import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread everywhere, subprocesses and the engine's own thread sizing included: bitwise comparisons between
# runs (exact resume) need the same float reduction order on both sides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Tests use tiny models: one thread each avoids oversubscription (xdist runs two workers on two cores) and
# makes float reductions independent of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
