"""Kernels as ``torch.library`` custom ops (namespace ``mmrec``), each beside its reference."""

from mmrec.ops.linear_scan import accumulation_dtype, linear_scan, linear_scan_reference

__all__ = ["accumulation_dtype", "linear_scan", "linear_scan_reference"]
