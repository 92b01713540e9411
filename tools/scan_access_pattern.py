"""How fast can the scan's memory access pattern go, with no scan in it? (GPU diagnostic)

    python tools/scan_access_pattern.py

Times at B=4, T=32768, bf16, as % of the same run's copy bandwidth at the floor bytes:
- flat elementwise kernels with the scan's byte mix (forward: read 2, write 1; backward:
  read 3, write 2): what the mix allows;
- the same trivial work in the scan's tiling (one program per (batch, block of channels),
  walking time in tiles of rows): what the access pattern allows, by row width;
- the scan kernels (default tile and 32-channel blocks).
Each at D = 4096, 4224, 6336 and 8448: in 64-channel blocks 256, 264, 396 and 528
programs on an H100's 132 multiprocessors, which separates the access pattern from the
program count.
What it found on the H100 and why the tiles are 128 channels wide there:
docs/notes/scan-kernel.md.
"""
import torch
import triton
import triton.language as tl
from mmrec.bench.common import do_bench_ms as ms
from mmrec.bench.scan import copy_bandwidth
from mmrec.ops.linear_scan_triton import _pick_config, scan_backward, scan_forward


@triton.jit
def _work(x_ptr, y_ptr, g_ptr, out_ptr, out2_ptr, o, BACKWARD: tl.constexpr):
    """The forward's byte mix (read x, y; write x * y) or the backward's (read x, y, g;
    write g * y and g * x), with no dependence between elements."""
    x = tl.load(x_ptr + o).to(tl.float32)
    y = tl.load(y_ptr + o).to(tl.float32)
    if BACKWARD:
        g = tl.load(g_ptr + o).to(tl.float32)
        tl.store(out_ptr + o, (g * y).to(tl.bfloat16))
        tl.store(out2_ptr + o, (g * x).to(tl.bfloat16))
    else:
        tl.store(out_ptr + o, (x * y).to(tl.bfloat16))


@triton.jit
def flat(x_ptr, y_ptr, g_ptr, out_ptr, out2_ptr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _work(x_ptr, y_ptr, g_ptr, out_ptr, out2_ptr, o, BACKWARD)


@triton.jit
def tiled(x_ptr, y_ptr, g_ptr, out_ptr, out2_ptr, T, s_b, s_t,
          ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, BACKWARD: tl.constexpr):
    """The scan's tiling: one program per (block of channels, batch), walking time."""
    pid_d = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * s_b
    off = tl.arange(0, ROWS)[:, None] * s_t + (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    for i in tl.range(0, T // ROWS, num_stages=STAGES):
        _work(x_ptr, y_ptr, g_ptr, out_ptr, out2_ptr, base + i * ROWS * s_t + off, BACKWARD)


def main():
    torch.manual_seed(0)
    copy = copy_bandwidth()["GBps"]
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    B, T = 4, 32768

    def rec(name, D, fwd_ms=None, bwd_ms=None):
        el = B * T * D
        parts = []
        if fwd_ms is not None:
            parts.append(f"fwd {fwd_ms:.3f} ms {100 * 6 * el / fwd_ms / 1e6 / copy:5.1f}%")
        if bwd_ms is not None:
            parts.append(f"bwd {bwd_ms:.3f} ms {100 * 10 * el / bwd_ms / 1e6 / copy:5.1f}%")
        print(f"{name:<44} D={D:<5} " + "  ".join(parts), flush=True)

    for rep in range(2):
        print(f"--- pass {rep}")
        for D in (4096, 4224, 6336, 8448):
            a = torch.rand(B, T, D, device="cuda", dtype=torch.bfloat16) * 0.5 + 0.5
            b = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
            h = torch.empty_like(a)
            da = torch.empty_like(a)
            db = torch.empty_like(a)
            n = a.numel()
            if D == 4096:
                rec("torch.mul (read 2 write 1)", D, ms(lambda: torch.mul(a, b, out=h)))
                for blk in (1024, 4096):
                    rec(f"flat triton BLOCK={blk}", D, ms(lambda: flat[(n // blk,)](a, b, None, h, None, BLOCK=blk, BACKWARD=False)),
                        ms(lambda: flat[(n // blk,)](a, h, g, da, db, BLOCK=blk, BACKWARD=True)))
            for rws, bd, st in ((64, 64, 3), (64, 32, 3), (32, 128, 3), (64, 64, 4)):
                grid = (D // bd, B)
                rec(f"tiled trivial rows={rws} BLOCK_D={bd} st={st} ({B * D // bd} progs)", D,
                    ms(lambda: tiled[grid](a, b, None, h, None, T, a.stride(0), a.stride(1), ROWS=rws, BLOCK_D=bd, STAGES=st,
                                           BACKWARD=False, num_warps=4)),
                    ms(lambda: tiled[grid](a, h, g, da, db, T, a.stride(0), a.stride(1), ROWS=rws, BLOCK_D=bd, STAGES=st,
                                           BACKWARD=True, num_warps=4 if bd <= 64 else 8)))
            hs, _ = scan_forward(a, b)
            block = _pick_config("fwd", False, a.device, a.dtype, B, T, D, None)["BLOCK_D"]
            rec(f"scan default tile ({B * D // block} progs)", D, ms(lambda: scan_forward(a, b, out=(h, torch.empty(B, D, device='cuda', dtype=torch.bfloat16)))),
                ms(lambda: scan_backward(a, hs, g, out=(da, db, a.new_empty(0)))))
            rec(f"scan BLOCK_D=32 ({B * D // 32} progs)", D,
                ms(lambda: scan_forward(a, b, config={"BLOCK_D": 32})),
                ms(lambda: scan_backward(a, hs, g, config={"BLOCK_D": 32})))
            del a, b, g, h, da, db, hs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
