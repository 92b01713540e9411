"""The scan kernels' sweep-only options (tools/scan_kernel_options.py) against the float64
reference: under Triton's interpreter in a child process (as tests/ops/test_linear_scan_triton.py
runs the library's kernels) and compiled on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mmrec.ops.linear_scan import linear_scan_reference
from tests.helpers import run_under_triton_interpreter
from tests.ops.test_linear_scan_triton import (
    SMALL,
    TOL,
    make_inputs,
    reference_grads,
    rel_err,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON

# dtype, T, reverse, h0, layout, grad_h, grad_h_last, extra (as in tests/ops/test_linear_scan_triton.py)
CASES = [
    # cache hints (STREAM) change no result
    (torch.bfloat16, 21, True, True, "strided", True, True, {"log_space": True, "config": {**SMALL, "STREAM": True}}),
    # the software-pipelined loop with the re-read of each row's previous group
    (torch.float32, 37, True, True, "strided", True, True, {"config": {**SMALL, "STAGES": 3}}),
    (torch.bfloat16, 21, False, True, "contiguous", True, True, {"log_space": True, "config": {**SMALL, "STAGES": 2}}),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_option_kernels_under_triton_interpreter():
    out = run_under_triton_interpreter(__file__)
    assert out.count("ok ") == len(CASES), out


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("log_space", [False, True])
@pytest.mark.parametrize("options", [{"STAGES": 3}, {"STREAM": True}, {"STREAM": True, "REREAD": False}], ids=str)
def test_cuda_option_kernels_agree_with_the_reference(options, log_space):
    """Compiled for the GPU, on a length that ends mid-tile, float32 against float64."""
    from tools import scan_kernel_options as kernels

    gen = torch.Generator().manual_seed(7)
    batch, length, dim = 2, 1234, 200
    a, b = make_inputs(batch, length, dim, torch.float32, "cuda", gen, log_space=log_space)
    h0 = torch.randn(batch, dim, generator=gen).cuda()
    grad_h, grad_hl = torch.randn(batch, length, dim, generator=gen).cuda(), torch.randn(batch, dim, generator=gen).cuda()
    config = {"G": 16, "R": 4, "BLOCK_D": 64, "num_warps": 4, **options}
    for reverse in (False, True):
        h, h_last = kernels.scan_forward(a, b, h0, reverse, log_space=log_space, config=config)
        grads = kernels.scan_backward(a, h, grad_h, grad_hl, h0, reverse, b.dtype, log_space=log_space, config=config)
        ref_h, ref_last = linear_scan_reference(a.double(), b.double(), h0.double(), reverse, log_space=log_space)
        refs = reference_grads(a, b, h0, reverse, grad_h, grad_hl, log_space)
        tol = TOL[torch.float32]
        assert rel_err(h, ref_h) < tol and rel_err(h_last, ref_last) < tol, reverse
        for name, got, ref in zip(("da", "db", "dh0"), grads, refs):
            assert rel_err(got, ref) < (3 * tol if name == "da" else tol), (name, reverse)


if __name__ == "__main__":
    from tests.ops.test_linear_scan_triton import check_cases
    from tools import scan_kernel_options

    check_cases(scan_kernel_options, CASES, torch.Generator().manual_seed(0))
