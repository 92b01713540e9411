"""``mmrec.ops.registration``: a CUDA implementation hands inputs its kernels do not take back
to the composite."""

from mmrec.ops.registration import _or_composite


def test_cuda_implementation_falls_back_to_the_composite_on_notimplemented():
    composite = lambda x, y=2: ("composite", x, y)
    cuda = _or_composite(lambda x, y=2: NotImplemented if x < 0 else ("cuda", x, y), composite)
    assert cuda(1) == ("cuda", 1, 2)
    assert cuda(-1, 3) == ("composite", -1, 3)
