"""The scan sweep's tile syntax (the sweep itself times CUDA kernels)."""

import pytest

from mmrec.bench.scan import parse_tile


def test_tiles_take_named_kernel_options():
    assert parse_tile("16,4,64,4") == (16, 4, 64, 4, ())
    assert parse_tile("16,4,128,8,stages=3,reread=0") == (16, 4, 128, 8, (("STAGES", 3), ("REREAD", 0)))
    with pytest.raises(SystemExit, match="options are stream=N, stages=N, reread=N"):
        parse_tile("16,4,64,4,stagez=3")
