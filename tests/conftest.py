import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # a reproducible seed of its own per test: fresh random inputs, never zeros, never shared
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
