"""Kernels as ``torch.library`` custom ops (namespace ``mmrec``), each beside its reference."""

from mmrec.ops.linear_scan import linear_scan, linear_scan_reference

__all__ = ["linear_scan", "linear_scan_reference"]
