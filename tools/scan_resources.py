"""Registers, stack frame and shared memory of the scan kernels for given tiles, compiled
for sm_90 on this machine (Triton's own ptxas and cuobjdump; no GPU needed).

    python -m tools.scan_resources fwd,plain,8,8,128,4,stages=3,reread=0 bwd,log,16,4,128,8,reread=0

Each argument: pass (fwd/bwd), gates (plain/log), then a tile as `tools.scan_sweep --tiles`
takes it.
A stack frame above 0 means spills (docs/notes/scan-kernel.md). Launches are specialised
as the op's are: bf16, unit channel stride, 16-divisible pointers and strides.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmrec.ops import linear_scan_triton
from tools.scan_sweep import parse_tile

POINTERS = {
    "fwd": ["a_ptr", "b_ptr", "h0_ptr", "h_ptr", "hlast_ptr"],
    "bwd": ["a_ptr", "h_ptr", "dh_ptr", "dhl_ptr", "h0_ptr", "da_ptr", "db_ptr", "dh0_ptr"],
}
# (batch, time, channel) strides of each tensor, in argument order
STRIDES = {
    "fwd": ["s_ab", "s_at", "s_ad", "s_bb", "s_bt", "s_bd", "s_h0b", "s_h0d", "s_hb", "s_ht", "s_hd", "s_lb", "s_ld"],
    "bwd": ["s_ab", "s_at", "s_ad", "s_hb", "s_ht", "s_hd", "s_gb", "s_gt", "s_gd", "s_glb", "s_gld", "s_h0b", "s_h0d",
            "s_dab", "s_dat", "s_dad", "s_dbb", "s_dbt", "s_dbd", "s_dh0b", "s_dh0d"],
}


def resources(kind: str, log_space: bool, tile: tuple) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes) of one kernel variant."""
    groups, steps, block_d, warps, options = tile
    fn = linear_scan_triton._scan_fwd_kernel if kind == "fwd" else linear_scan_triton._scan_bwd_kernel
    flags = dict(HAS_H0=False, REVERSE=False, ACC_FP64=False, LOG_A=log_space)
    if kind == "bwd":
        flags.update(HAS_DH=True, HAS_DHL=False)
    constants = {**flags, "G": groups, "R": steps, "BLOCK_D": block_d, **dict(options)}
    signature = {name: "*bf16" for name in POINTERS[kind]} | {"T": "i32", "D": "i32", "n_tiles": "i32"}
    signature |= {name: "i32" for name in STRIDES[kind]}
    constants |= {name: 1 for name in STRIDES[kind] if name.endswith("d")}  # channel strides, as launches specialise them
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items() if p.default is not p.empty}
    constants = defaults | constants
    params = list(fn.arg_names)
    signature = {name: "constexpr" if name in constants else signature[name] for name in params}
    divisible = [i for i, name in enumerate(params)
                 if signature[name].startswith("*") or (signature[name] == "i32" and name != "T" and name != "n_tiles")]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(params.index(name),): value for name, value in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
        report = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", report).group(1))
    stack = int(re.search(r"STACK:(\d+)", report).group(1))
    return registers, stack, compiled.metadata.shared


def main(args: list[str]) -> None:
    for spec in args:
        kind, gates, tile_text = spec.split(",", 2)
        try:
            registers, stack, shared = resources(kind, gates == "log", parse_tile(tile_text))
            print(f"{spec:<44} registers {registers:>3}  stack {stack:>4}  shared {shared}")
        except Exception as error:  # noqa: BLE001 - report and go on to the next tile
            print(f"{spec:<44} failed: {type(error).__name__}: {str(error)[:200]}")


if __name__ == "__main__":
    main(sys.argv[1:])
