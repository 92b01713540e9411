import torch

from mmrec.layers.memory_attention import sdpa_ready


def test_sdpa_ready_copies_only_views_with_rows_off_16_bytes():
    fused = torch.randn(2, 5, 130, dtype=torch.bfloat16)  # a fused projection 130 wide: rows of 260 bytes
    view = fused[..., 2:66]
    ready = sdpa_ready(view)
    assert ready.is_contiguous() and torch.equal(ready, view) and ready.data_ptr() != view.data_ptr()
    aligned = torch.randn(2, 5, 136, dtype=torch.bfloat16)[..., 8:72]  # rows of 272 bytes
    assert sdpa_ready(aligned) is aligned
