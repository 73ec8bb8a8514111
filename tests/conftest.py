import collections
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    # The interpreter tier needs TRITON_INTERPRET=1 before triton is imported, so it runs in its
    # own pytest process (scripts/test.sh); in that process only interpreter tests run.
    skip_interp = pytest.mark.skip(reason="interpreter tier: run with TRITON_INTERPRET=1 -m interpreter")
    skip_gpu = pytest.mark.skip(reason="gpu tier: needs a CUDA GPU, none here")
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


@pytest.fixture(autouse=True)
def _default_backend_unchanged():
    """Every test starts on the process's default backend: one that sets another (the CLI, a
    benchmark step) and fails before restoring it must not reroute the tests after it."""
    from fastbert import ops
    before = ops.get_backend()
    yield
    ops.set_backend(before)


# Tables that tests compute for reading (static kernel resources), printed after the results
# instead of inside the pass/fail stream; see the static_table fixture.
_STATIC_TABLES = []


@pytest.fixture
def static_table():
    """static_table(title, text): show a table in the run's summary, after the results."""
    return lambda title, text: _STATIC_TABLES.append((title, text))


def pytest_terminal_summary(terminalreporter):
    for title, text in _STATIC_TABLES:
        terminalreporter.section(title)
        terminalreporter.line(text)
    # one line per reason, so a run with hundreds of skips says why without -rs
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("why tests were skipped")
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:5d}  {reason}")
