"""The scan sweep's tile syntax and which kernels a tile runs through (the sweep itself
times CUDA kernels)."""

import functools

import pytest
import torch

from tools.scan_sweep import build_parser, parse_tile, tile_config


def test_tiles_take_named_kernel_options():
    assert parse_tile("16,4,64,4") == (16, 4, 64, 4, ())
    assert parse_tile("16,4,128,8,stages=3,reread=0") == (16, 4, 128, 8, (("STAGES", 3), ("REREAD", 0)))
    with pytest.raises(SystemExit, match="options are stages=N, reread=N"):
        parse_tile("16,4,64,4,stagez=3")
    with pytest.raises(SystemExit, match="options are stages=N, reread=N"):
        parse_tile("16,4,64,4,stream=1")  # cache hints: dropped from the kernels
    with pytest.raises(SystemExit, match="a tile is G,R,BLOCK_D,WARPS"):
        parse_tile("16,4,64")
    args = build_parser().parse_args(["--tiles", "8,8,128,4,stages=3,reread=0", "--log"])
    assert args.tiles == [(8, 8, 128, 4, (("STAGES", 3), ("REREAD", 0)))] and args.log and args.lengths == [32768]


def test_the_library_takes_every_tile_the_sweep_parses_and_refuses_the_dropped_pipeline():
    kernels = pytest.importorskip("mmrec.ops.linear_scan_triton")  # needs triton
    pick = functools.partial(kernels._pick_config, "fwd", False, torch.device("cpu"), torch.float32, 4, 32768, 4096)
    for text in ["16,8,64,4", "32,4,64,8,reread=0", "8,8,128,4,stages=3,reread=0", "16,4,64,4,stages=0"]:
        assert pick(tile_config(parse_tile(text)))["G"] == parse_tile(text)[0]
    with pytest.raises(ValueError):  # the pipelined loop with the re-read
        pick(tile_config(parse_tile("16,4,64,4,stages=3")))
    assert tile_config(parse_tile("8,8,128,4,stages=3,reread=0")) == {
        "G": 8, "R": 8, "BLOCK_D": 128, "num_warps": 4, "STAGES": 3, "REREAD": 0}
