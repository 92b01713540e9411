"""MDI (memory decay / integration): the per-token, per-channel decay of the recurrence.

``γ_t = σ(W_γ z_t + b_γ) ⊙ σ(W_c k_t + b_c)``: the candidate ``z`` sets the decay and the
memory key ``k`` modulates it by context. Both biases start at ``logit(sqrt(γ_0))`` and the
weights small, so ``γ ≈ γ_0`` at initialisation: one ``decay_init`` for every channel (the
seeds' 0.99), or a range ``(low, high)`` over which the channels' time constants
``1 / (1 - γ_0)`` are spread evenly in log scale, so that some channels start short-range
and others long-range. Returned as ``log γ``, which keeps its precision where ``γ`` itself
would round to 1 or 0; only the logits, in the activations' dtype, are kept for backward.

``width`` (default ``d_model``) is how many decays it gives per token: ``W_γ`` maps
``d_model`` and ``W_c`` maps ``d_context`` to it. A recurrence with one decay per head (the
delta rule) asks the block for ``n_heads``; a range of ``decay_init`` is then spread over
those outputs.

``integration=True`` (off by default) adds the seeds' gated integration, applied by the
block to the recurrence's output (:meth:`MDI.integrate`):
``h̃_t = (1 - ι_t) ⊙ h_t + ι_t ⊙ z_t + γ_t ⊙ h_t`` with ``ι_t = σ(W_ι [z_t; h_t] + b_ι)``.
The seeds' MDI computes ``(1 - g) ⊙ h_prev + g ⊙ z_t + γ ⊙ h_prev`` (the last term its
"residual") beside the core formula; as a state update its keep factor ``1 - g + γ`` would
exceed 1, so here it reads the state the recurrence has already formed, per token, which
keeps every recurrence parallel and adds no state.

``log γ`` is computed in float32 and returned in the activations' dtype unless asked for
another (recurrences that keep their state in ``log γ``'s dtype ask for float32). In bf16 it has a
relative error of at most 2^-8 *of log γ*, so ``γ`` itself is off by a factor
``exp(±2^-8 |log γ|)``, about ``1 ± 2^-8 (1 - γ)`` near 1: 4e-5 at γ = 0.99, less closer
to 1 (whereas ``γ`` stored in bf16 would round 0.999 to 1). Over a span of steps the
errors add in log space, so the product of the decays is off by at most 2^-8 of its own
log (0.4% of a decay to ``e^-1``; the rounding errors are independent, so typically far
less), and where that log is large the product is negligible anyway. The scan saves
``log γ`` for backward, so this halves those bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmrec.ops import accumulation_dtype


def spread_decays(bounds: tuple[float, ...], n: int) -> Tensor:
    """``n`` decays in float64: ``bounds[0]`` for all with one bound; with ``(low, high)``,
    time constants ``1 / (1 - γ)`` evenly spaced in log from ``low``'s to ``high``'s, so the
    decays cover short and long memories alike."""
    if len(bounds) == 1:
        return torch.full((n,), bounds[0], dtype=torch.float64)
    low, high = (1 / (1 - g) for g in bounds)  # time constants in tokens
    return 1 - 1 / torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64)


class MDI(nn.Module):
    def __init__(self, d_model: int, d_context: int, decay_init: float | tuple[float, float] = 0.99, init_std: float = 0.02,
                 width: int | None = None, integration: bool = False):
        super().__init__()
        width = d_model if width is None else width
        if integration and d_model % width:
            raise ValueError(f"the gated integration needs MDI's decays per token ({width}) to divide d_model ({d_model})")
        bounds = decay_init if isinstance(decay_init, (tuple, list)) else (decay_init,)
        if not all(0.0 < g < 1.0 for g in bounds) or list(bounds) != sorted(bounds):
            raise ValueError(f"decay_init must be in (0, 1), or a range (low, high) inside it, got {decay_init}")
        self.decay_init = tuple(bounds)
        self.decay = nn.Linear(d_model, width, bias=False)  # W_γ
        self.context = nn.Linear(d_context, width, bias=False)  # W_c
        self.decay_bias = nn.Parameter(torch.empty(width))
        self.context_bias = nn.Parameter(torch.empty(width))
        # W_ι, b_ι of the gated integration, reading [z; h]
        self.integration = nn.Linear(2 * d_model, d_model) if integration else None
        self.init_std = init_std
        self.init_weights()

    def initial_decay(self) -> Tensor:
        """``γ_0`` per channel."""
        return spread_decays(self.decay_init, self.decay_bias.numel())

    @torch.no_grad()
    def init_weights(self) -> None:
        # small weights: the decay starts near γ_0 whatever the token
        nn.init.normal_(self.decay.weight, std=self.init_std * 0.1)
        nn.init.normal_(self.context.weight, std=self.init_std * 0.1)
        half = self.initial_decay().sqrt()  # each of the two gates gives sqrt(γ_0)
        self.decay_bias.copy_(torch.logit(half))
        self.context_bias.copy_(torch.logit(half))
        if self.integration is not None:  # ι starts near 1/2 for every token
            nn.init.normal_(self.integration.weight, std=self.init_std)
            nn.init.zeros_(self.integration.bias)

    def forward(self, z: Tensor, k: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``z``: ``[B, T, d_model]``, ``k``: ``[B, T, d_context]`` -> ``log γ`` ``[B, T, width]``
        in ``dtype`` (default: ``z``'s)."""
        decay_logit = self.decay(z) + self.decay_bias
        context_logit = self.context(k) + self.context_bias
        return LogSigmoidSum.apply(decay_logit, context_logit, dtype or z.dtype)

    def integrate(self, h: Tensor, z: Tensor, log_decay: Tensor) -> Tensor:
        """The gated integration (``integration=True``): ``h``, ``z`` ``[B, T, d_model]``,
        ``log_decay`` ``[B, T, width]`` (what :meth:`forward` returned; with fewer decays
        than channels, e.g. one per head, each covers its group of channels) ->
        ``(1 - ι) ⊙ h + ι ⊙ z + γ ⊙ h`` ``[B, T, d_model]`` in ``h``'s dtype."""
        gate = torch.sigmoid(self.integration(torch.cat([z, h], dim=-1)))
        decay = log_decay.exp().to(h.dtype)
        residual = (h.unflatten(-1, (decay.shape[-1], -1)) * decay.unsqueeze(-1)).flatten(-2)
        return (1 - gate) * h + gate * z + residual


class LogSigmoidSum(torch.autograd.Function):
    """``log σ(x) + log σ(y)``, computed in float32 (float64 for float64) and returned in
    ``dtype``; saves only ``x`` and ``y`` for backward, not their float32 copies."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, y)
        acc = accumulation_dtype(x.dtype)
        out = nn.functional.logsigmoid(x.to(acc)) + nn.functional.logsigmoid(y.to(acc))
        # No `.to` when the dtype is already right: PyTorch 2.11 compiles a Function whose
        # forward returns such a no-op cast with zero gradients (fine in eager and in 2.13).
        return out if out.dtype == dtype else out.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, y = ctx.saved_tensors
        acc = accumulation_dtype(torch.promote_types(x.dtype, grad.dtype))
        grad = grad.to(acc)
        # d log σ(x) / dx = σ(-x)
        return (grad * torch.sigmoid(-x.to(acc))).to(x.dtype), (grad * torch.sigmoid(-y.to(acc))).to(y.dtype), None
