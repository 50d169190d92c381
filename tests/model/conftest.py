"""Model tests use tiny tensors: one intra-op thread is faster for them and immune to CPU oversubscription."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
