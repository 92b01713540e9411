import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    # a reproducible seed of its own per test: fresh random inputs, never zeros, never shared
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _float32_matmul_precision():
    # training sets it for the process (train.tf32); every test starts from PyTorch's default
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision("highest")
