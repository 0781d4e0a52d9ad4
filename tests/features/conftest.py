"""The feature tests run tiny inputs: one intra-op thread is as fast, and immune to a busy CPU."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
