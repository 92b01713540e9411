"""``mmrec.ops.registration``: a CUDA implementation hands inputs its kernels do not take back
to the composite."""

from mmrec.ops.registration import _or_composite


def test_cuda_implementation_falls_back_to_the_composite_on_notimplemented():
    composite = lambda x, y=2: ("composite", x, y)
    cuda = _or_composite(lambda x, y=2: NotImplemented if x < 0 else ("cuda", x, y), composite)
    assert cuda(1) == ("cuda", 1, 2)
    assert cuda(-1, 3) == ("composite", -1, 3)


def test_eager_calls_skip_the_dispatcher_unless_something_watches(monkeypatch):
    import importlib

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    scan = importlib.import_module("mmrec.ops.linear_scan")
    a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3, requires_grad=True)
    want = scan.linear_scan_composite(a, b)[0]

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:  # a dispatch mode sees the op itself
        assert torch.allclose(scan.linear_scan(a, b)[0], want)
    assert "mmrec.linear_scan.default" in seen.ops
    with torch.profiler.profile() as profile:  # and so does the profiler
        scan.linear_scan(a, b)
    assert any(event.name == "mmrec::linear_scan" for event in profile.events())
    traced = torch.jit.trace(lambda a, b: scan.linear_scan(a, b)[0], (a, b.detach()))  # and torch.jit.trace
    assert "mmrec::linear_scan" in str(traced.graph)

    def dispatched(*args):
        raise AssertionError("an unwatched eager call went through the dispatcher")

    monkeypatch.setattr(scan._forward_op, "overload", dispatched)
    h = scan.linear_scan(a, b)[0]  # plain eager: the Autograd kernel directly, gradient included
    assert torch.allclose(h, want) and h.grad_fn is not None
    h.sum().backward()
    assert b.grad is not None
    weight = torch.nn.Parameter(b.detach().clone())  # parameters are plain tensors too (layers pass them)
    scan.linear_scan(a, weight)[0].sum().backward()
    assert torch.equal(weight.grad, b.grad)


def test_matmul_precision_is_read_from_either_of_torch_s_switches():
    import torch

    from mmrec.ops.launch import float32_matmul_precision

    assert float32_matmul_precision() == torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the per-backend switch: the global getter refuses
    try:
        assert float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert float32_matmul_precision() == torch.get_float32_matmul_precision()


def test_cached_launch_config_follows_the_matmul_precision_and_overrides():
    import torch

    from mmrec.ops.launch import cached_config

    calls = []

    def pick_config(size, *, interpret=False, config=None):
        calls.append(size)
        return {"BLOCK": size, "PRECISION": torch.get_float32_matmul_precision(), **(config or {})}

    launch_config = cached_config(pick_config)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        first = launch_config(16, interpret=True)
        first["BLOCK"] = 0  # a launcher's edit stays in its copy
        assert launch_config(16, interpret=True) == {"BLOCK": 16, "PRECISION": "highest"} and calls == [16]
        torch.set_float32_matmul_precision("high")
        assert launch_config(16, interpret=True)["PRECISION"] == "high" and calls == [16, 16]
    finally:
        torch.set_float32_matmul_precision(before)
    assert launch_config(16, interpret=True, config={"BLOCK": 32})["BLOCK"] == 32 and calls == [16, 16, 16]


def test_ops_compute_in_their_inputs_dtypes_under_autocast():
    """The CPU implementations, like the Triton kernels, ignore autocast: the caller casts."""
    import torch

    from mmrec.ops.delta_rule.chunk_scan import delta_chunk_scan
    from tests.ops.test_delta_rule_chunk_scan import scan_inputs

    inputs = scan_inputs(2, 2, 3, 8, 16, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    want = delta_chunk_scan(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = delta_chunk_scan(*inputs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
