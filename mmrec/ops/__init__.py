"""Kernels as ``torch.library`` custom ops (namespace ``mmrec``), each beside its reference."""

from mmrec.ops.gated_rnn import gated_rnn, gated_rnn_reference
from mmrec.ops.linear_scan import accumulation_dtype, linear_scan, linear_scan_reference

__all__ = ["accumulation_dtype", "gated_rnn", "gated_rnn_reference", "linear_scan", "linear_scan_reference"]
