"""Several processes, one model: ``torchrun`` with FSDP2, PyTorch's own engine.

``python -m mmrec.recipes.train`` checks the ``WORLD_SIZE`` that ``torchrun`` sets; above 1
it joins the process group (NCCL on CUDA, one GPU per process at ``cuda:LOCAL_RANK``; gloo
on CPU) and shards the model with ``torch.distributed.fsdp.fully_shard``: each block, then
the root (embedding, final norm, head). Activation checkpointing and ``torch.compile`` of
each block are set before sharding, as torchtitan does. The model is built on the meta
device and sharded there; each process then allocates only its shards (``to_empty``)
and ``LanguageModel.reset_parameters(seed)`` fills them with its part of the weights one
process would draw. On CUDA with bf16 compute the
policy is ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: sharded
fp32 master weights, bf16 all-gathers and compute, fp32 gradient reduction. The recipe's
autocast stays on as in one process, so what autocast computes in fp32 still is; unlike
one process, though, the parameters themselves (the MDI decay biases among them) enter
the forward pass rounded to bf16. Otherwise (CPU, or ``train.dtype=float32``) parameters
stay fp32.

This module holds the process-group life cycle, the sharding, and the few collectives
the training loop needs; checkpoints of sharded models are in ``mmrec.checkpoint``.
The trainer sees them through a :class:`World`: the processes of the run, which without
``torchrun`` is a world of one whose collectives return their input, so that one code
path trains on one process and on many.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "clip_grad_norm", "env_world_size", "is_distributed", "join", "shard_model"]


def env_world_size() -> int:
    """The number of processes ``torchrun`` started (1 without ``torchrun``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _init(device_name: str | None) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment and return this
    process's device: ``cuda:LOCAL_RANK`` with NCCL where CUDA is used, the CPU with gloo."""
    if not dist.is_available():
        raise RuntimeError("this PyTorch was built without torch.distributed; run a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device_name).type if device_name else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_name}: this PyTorch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                               "start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever --device names
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif kind == "cpu":
        device = torch.device("cpu")
        if not dist.is_gloo_available():
            raise RuntimeError("this PyTorch has no gloo backend, which distributed CPU training needs")
        dist.init_process_group("gloo")
    else:
        raise RuntimeError(f"--device {device_name}: distributed training runs on cuda or cpu")
    return device


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def join(device_name: str | None) -> World:
    """This process's :class:`World`: the process group ``torchrun`` describes (joined
    here, see :func:`_init`), or a world of one on ``device_name`` (default: CUDA when
    available). Raises ``RuntimeError`` naming a device that cannot be used."""
    if env_world_size() > 1:
        device = _init(device_name)
        return World(device, dist.get_rank(), dist.get_world_size())
    try:
        device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise RuntimeError(f"--device {device_name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device_name}: this PyTorch sees no CUDA device")
    return World(device)


@dataclass(frozen=True)
class World:
    """The processes of a run, as the training loop sees them: ``size`` processes, this
    one ``rank``, on ``device``. A world of one (no ``torchrun``) is the trivial case:
    its collectives return their input, ``share`` is the whole batch and ``parallelize``
    leaves the model whole, so the loop never asks how many processes there are."""

    device: torch.device
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that prints, logs and writes shared files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over several processes (FSDP2)."""
        return self.size > 1

    def describe(self) -> str:
        return f"{self.size} processes on {self.device.type} (FSDP)" if self.sharded else str(self.device)

    def share(self, batch_size: int) -> slice:
        """This process's contiguous share of every batch of ``batch_size`` samples
        (``batch_size`` divisible by ``size``)."""
        n = batch_size // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def parallelize(self, model: nn.Module, *, param_dtype: torch.dtype | None, compile: bool,
                    activation_checkpointing: bool) -> Callable:
        """Set ``model`` up for training, before its parameters get memory: sharded with
        FSDP2 over several processes (:func:`shard_model`), whole in one. With ``compile``
        each block is compiled in place, in one process as in many (as torchtitan does):
        blocks of the same config share one compiled graph, so compiling takes one block's
        time per distinct layer config (a hybrid stack has several), not the whole stack's,
        and training runs what ``mmrec.bench model`` times. Returns what the loop calls for
        the forward pass (the model)."""
        if self.sharded:
            return shard_model(model, self.device, param_dtype=param_dtype, compile=compile,
                               activation_checkpointing=activation_checkpointing)
        model.set_activation_checkpointing(activation_checkpointing)
        if compile:
            compile_blocks(model)
        return model

    # collectives: every process calls them, in the same order; in a world of one they
    # return their input

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the processes, in float64 (one all-reduce)."""
        values = values.to(torch.float64, copy=True)
        if self.sharded:
            dist.all_reduce(values)
            values /= self.size
        return values

    def mean_floats(self, values: list[float]) -> list[float]:
        """Each of ``values`` averaged over the processes."""
        return self.mean(torch.tensor(values, device=self.device)).tolist() if self.sharded else list(values)

    def max(self, code: int) -> int:
        """The largest ``code`` over the processes: every one agrees on, e.g., a stop request."""
        if not self.sharded:
            return code
        t = torch.tensor([code], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj: Any) -> list:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.sharded:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every process's ``values``, in rank order (one all-gather of a tensor)."""
        if not self.sharded:
            return [list(values)]
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(out, mine)
        return [t.tolist() for t in out]

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    # random streams

    def seed(self, seed: int, step: int = 0) -> None:
        """Give processes above rank 0 random streams of their own (dropout masks), once the
        model's initial weights, drawn alike on every process, are in place; rank 0 keeps
        the stream a single process would have."""
        if self.rank > 0:
            s = _rank_seed(seed, self.rank, step)
            random.seed(s)
            torch.manual_seed(s)

    def restore_rng(self, trainer_state: dict[str, Any], seed: int, step: int) -> None:
        """Restore the RNG states of a checkpoint's ``trainer_state``: each process its own
        when the checkpoint was saved by as many, otherwise rank 0's (the only one a single
        process saves), with fresh streams (:meth:`seed`) for the others."""
        from mmrec.checkpoint import set_rng_state

        per_rank = trainer_state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.size:
            set_rng_state(per_rank[self.rank])
        else:
            set_rng_state(trainer_state["rng"])
            self.seed(seed, step)

    def leave(self) -> None:
        """Leave the process group (nothing to leave in a world of one)."""
        if self.sharded:
            _teardown()


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each of ``model.blocks`` in place (its parameters and state-dict
    keys stay as they are). The blocks share one code object, so each distinct layer config
    (``layer_overrides``) is a recompilation of it: the limit on those is raised to leave
    room for every config in training and evaluation (grad on and off)."""
    configs = 1 + len(getattr(getattr(model, "config", None), "layer_overrides", ()))
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 4 * configs)
    for block in model.blocks:
        block.compile()


def shard_model(model: nn.Module, device: torch.device, *, param_dtype: torch.dtype | None = None,
                compile: bool = False, activation_checkpointing: bool = False) -> nn.Module:
    """Shard ``model`` (a ``LanguageModel``) in place with FSDP2: each of ``model.blocks``,
    then the root. ``param_dtype`` is the compute dtype of the gathered parameters
    (``None``: the stored fp32); gradients are reduced in fp32 either way.

    The model is best built on the meta device, then sharded here, then given memory with
    ``model.to_empty(device=device)`` and ``model.reset_parameters(seed)``: no process
    ever holds the whole model. Build the optimizer after that: sharding replaces the
    parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.set_activation_checkpointing(activation_checkpointing)
    if compile:
        compile_blocks(model)
    # FSDP2 warns that a block returns a view, which an in-place op could detach from its
    # backward hook; the model only ever passes block outputs on out of place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        # each block's bf16 parameters are freed after its forward and gathered again for its
        # backward, except the last block's, whose backward comes right after its forward
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < last)
    # the root (embedding, final norm, head) keeps its parameters gathered for the backward
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


# --------------------------------------------------------------------------- gradients


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``, for plain gradients and FSDP2's DTensor ones alike: the norm of
    the whole (sharded) gradient, reduced over the ranks, then every shard scaled by the
    same factor. Returns the norm before clipping (0-dim, on the gradients' device, no host
    synchronisation), the same on every rank; ``max_norm`` 0 clips nothing."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the per-rank partial norms, reduced
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm or math.inf, total)
    return total


# --------------------------------------------------------------------------- RNG


def _rank_seed(seed: int, rank: int, step: int) -> int:
    digest = hashlib.sha256(f"mmrec:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
