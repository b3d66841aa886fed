import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

# Without a GPU, Triton kernels run under Triton's interpreter (read when
# triton is first imported, so set before any test imports it).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# Deterministic, and no oversubscription of the 2 CI cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def root():
    return ROOT


def pytest_sessionfinish(session, exitstatus):
    # A run that executed no test proves nothing: make it fail.
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    passed = len(reporter.stats.get('passed', [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line('ERROR: no test passed (none ran?)', red=True)
