"""Shared test helpers."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


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
