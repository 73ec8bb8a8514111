import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    # The interpreter tier needs TRITON_INTERPRET=1 before triton is imported, so it runs in its
    # own pytest process (scripts/test.sh); in that process only interpreter tests run.
    skip_interp = pytest.mark.skip(reason="interpreter tier: run with TRITON_INTERPRET=1 -m interpreter")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_not_interp = pytest.mark.skip(reason="TRITON_INTERPRET=1 is set: only the interpreter tier runs")
    has_gpu = torch.cuda.is_available()
    for item in items:
        is_interp = "interpreter" in item.keywords
        if is_interp and not INTERPRET:
            item.add_marker(skip_interp)
        elif not is_interp and INTERPRET:
            item.add_marker(skip_not_interp)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield
