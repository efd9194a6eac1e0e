import os
import sys

import pytest
import torch

# Tests import the flat modules from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is as fast, and immune to OpenMP stalls on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
