import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these tensors are tiny, and on a loaded 2-core machine every parallel
    region of two OpenMP threads can wait a whole scheduler slice (observed: 50 ms -> 4 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
