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


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` run wherever torch sees a GPU and are reported as skipped, with the reason, elsewhere.
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skipif(True, reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_cuda)
