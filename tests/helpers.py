"""Shared test helpers."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def checked_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 on CPU (1 in place of a zero norm), after
    checking the shapes agree and every value of ``actual`` is finite (an unwritten output
    poisoned with NaN fails here)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values (unwritten output?)"
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def run_under_triton_interpreter(script: str) -> str:
    """Run a test module as a script with ``TRITON_INTERPRET=1`` (which Triton reads at import,
    hence a fresh process) and return what it printed; fails the test if the script fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, script], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def parameter_gradients(model: torch.nn.Module, forward, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the next-token loss (plus the auxiliary loss) of
    ``forward`` (``model`` itself or a compiled wrapper of it) on ``ids``, as CPU copies."""
    model.zero_grad()
    out = forward(ids[:, :-1], return_aux_loss=True)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    (loss if out.aux_loss is None else loss + out.aux_loss).backward()
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def assert_causal(model: torch.nn.Module, ids: torch.Tensor, t: int, vocab: int) -> None:
    """New tokens after position ``t`` leave the logits up to ``t`` exactly as they were
    (and do change later ones, so the check can fail)."""
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, vocab, changed[:, t + 1 :].shape)
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-12)
    assert (before[:, t + 1 :] - after[:, t + 1 :]).abs().max() > 1e-6


def eager_steps(model: torch.nn.Module, state, ids: torch.Tensor):
    """Feed ``ids`` ``[B, T]`` one token at a time after ``state``: the logits ``[B, T, vocab]``
    and the last state."""
    logits = []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], state=state)
        logits.append(out.logits[:, -1])
        state = out.state
    return torch.stack(logits, 1), state


def ops_called(fn) -> list[str]:
    """The ``mmrec::`` ops that ``fn()`` runs (forward and backward), seen through a
    dispatch mode, in call order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "mmrec":
                self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.names
