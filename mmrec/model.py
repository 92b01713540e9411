"""A language model: token embedding, a stack of registered blocks, final norm, LM head.

The block class comes from the registry by the recipe's ``arch`` (``mmrec`` or
``transformer`` built in), so an MM-Rec model and its Transformer baseline differ only in
their blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmrec import registry
from mmrec.config import ModelConfigBase
from mmrec.contracts import Block, with_defaults
from mmrec.layers.norm import RMSNorm
from mmrec.loss import IGNORE_INDEX, linear_cross_entropy
from mmrec.state import State, StateError


@dataclass
class ModelOutput:
    logits: Tensor | None  # [B, T, vocab]; None when the loss was asked for (targets given)
    state: State | None  # to continue from: model(next_ids, state=out.state); None with return_state=False
    aux_loss: Tensor | None = None  # mean planning loss over layers, when asked for
    loss: Tensor | None = None  # mean next-token cross-entropy (fp32 softmax), when targets are given


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfigBase):
        super().__init__()
        self.config = config
        self.config_json = config.model_dump_json()  # identifies the states this model makes
        self.stream_piece = 32768  # without gradients, longer inputs run in pieces of this many tokens
        block = with_defaults(registry.get("layers", config.arch), "layers")
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(block(config, layer=i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) linears and embeddings, residual outputs scaled by depth (GPT-2).

        The model is initialised part by part (the embedding, each block, the final norm,
        the head). With ``seed`` each part draws from its own stream, seeded by ``seed`` and
        the part's name, and the parameters may be FSDP shards (DTensors): each part is
        drawn whole on this process's device and every process keeps its own shard, so the
        weights are the same whatever the number of processes, one included. Without
        ``seed`` the parts draw from the global RNG in turn. This is the initialisation
        after ``to_empty`` of a model built on the meta device.
        """
        if any(True for _ in self.buffers()):
            # nothing initialises buffers here: a block that adds one must add its values too
            raise NotImplementedError("LanguageModel.reset_parameters does not initialise buffers")
        for name, part in self._parts():
            if seed is None:
                self._init_part(part)
                continue
            first = next(part.parameters(), None)
            if first is None:
                continue
            device = first.device
            # the CPU stream always, and this process's GPU's when the part is there
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(_part_seed(seed, name))
                with _whole_parameters(part):
                    self._init_part(part)

    def parameters_left_to_constructor(self) -> list[str]:
        """Parameters that ``reset_parameters`` does not set: those held directly by a module
        that is not a Linear, Embedding or RMSNorm and has no ``init_weights``. They keep
        their constructor's values, so a model with any cannot be initialised after being
        built on the meta device."""
        known = (nn.Linear, nn.Embedding, RMSNorm)
        return [
            f"{module_name}.{name}" if module_name else name
            for module_name, module in self.named_modules()
            if not isinstance(module, known) and not hasattr(module, "init_weights")
            for name, _ in module.named_parameters(recurse=False)
        ]

    def to_empty(self, *, device, recurse: bool = True) -> LanguageModel:
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_embeddings and self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight  # leaving the meta device unties them
        return self

    def _parts(self):
        yield "embed", self.embed
        for i, block in enumerate(self.blocks):
            yield f"blocks.{i}", block
        yield "norm", self.norm
        yield "head", self.head

    def _init_part(self, part: nn.Module) -> None:
        std = self.config.init_std
        for module in part.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in part.modules():
            if hasattr(module, "init_weights"):
                module.init_weights()
        if isinstance(part, Block):
            for linear in part.residual_projections():
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def flops_per_token(self, length: int) -> float:
        """Training FLOPs per token (forward and backward) at sequence ``length``: 6 per
        parameter, plus each block's work that no parameter counts (``mixing_flops``:
        attention scores, memory reads, a matrix state's updates). Activation
        checkpointing's recomputation is not counted, as MFU conventionally leaves it out."""
        return 6 * self.num_parameters() + sum(block.mixing_flops(length) for block in self.blocks)

    def supports_resets(self) -> bool:
        """Whether every block takes document resets (``forward(..., resets=...)``)."""
        return not self.unsupported_resets()

    def unsupported_resets(self) -> str:
        """The layers that cannot take document resets, and which part of each, for an
        error message (empty when all can)."""
        described = []
        for i, block in enumerate(self.blocks):
            if block.supports_resets():
                continue
            parts = [f"its {name} {type(getattr(block, name)).__name__}" for name in ("recurrence", "memory")
                     if not getattr(getattr(block, name, None), "supports_resets", True)]
            described.append(f"layer {i}" + (f" ({' and '.join(parts)})" if parts else ""))
        return "; ".join(described)

    def check_resets(self, resets: Tensor, input_ids: Tensor) -> None:
        """Refuse ``resets`` of the wrong shape or type, or for a model that cannot take them."""
        if resets.dtype != torch.bool or resets.shape != input_ids.shape:
            raise ValueError(f"resets must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, got "
                             f"{resets.dtype} {tuple(resets.shape)}; mmrec.documents.document_starts(input_ids, eod_id) makes one")
        if unsupported := self.unsupported_resets():
            raise ValueError(f"document resets are not supported by {unsupported}: use variants that take "
                             "them (contracts' supports_resets), or train without train.reset_at_documents")

    def forward(
        self, input_ids: Tensor, state: State | None = None, return_aux_loss: bool = False, return_state: bool = True,
        targets: Tensor | None = None, logits_at: Tensor | None = None, resets: Tensor | None = None,
    ) -> ModelOutput:
        """``input_ids``: ``[B, T]`` token ids, continuing ``state`` when given.

        Feeding a sequence in pieces with the state carried over gives the logits of one
        pass. Without gradients, inputs longer than ``stream_piece`` tokens run in pieces
        so that activation memory stays bounded. ``return_state=False`` (training and
        scoring) drops each layer's state as soon as the layer is done: a Transformer's
        is its whole KV cache, which a training step has no use for.

        With ``targets`` (``[B, T]``, ``-100`` ignored) the output holds the loss and no
        logits: the head and the cross-entropy run chunk by chunk (:mod:`mmrec.loss`), so
        the ``[B, T, vocab]`` fp32 logits never exist, whatever the vocabulary. It is
        the only path, with no size threshold: the loss and gradients are those of
        ``F.cross_entropy(logits.float(), targets)``, and below a few thousand tokens of
        vocabulary the whole batch is one chunk, the cost one more head matmul.

        With ``logits_at`` (``[B, P]`` positions) the logits are ``[B, P, vocab]``, those of
        the positions named (the head runs on them only): what a task scored at a few
        positions per sequence needs.

        With ``resets`` (``[B, T]`` bool, ``True`` at the first token of each document of a
        packed sequence: :func:`mmrec.documents.document_starts`) nothing before a document's
        start reaches it or its later tokens: every layer resets its state there
        (:mod:`mmrec.contracts`, "Document resets"). Every block must support it.
        """
        if targets is not None and logits_at is not None:
            raise ValueError("give targets (for the loss) or logits_at (for logits at some positions), not both")
        if resets is not None:
            self.check_resets(resets, input_ids)
        if state is not None:
            state.check_compatible(self.config_json)
            if state.batch_size != input_ids.shape[0]:
                raise StateError(f"state has batch size {state.batch_size}, input has {input_ids.shape[0]}")
        length = input_ids.shape[1]
        if length > self.stream_piece and not torch.is_grad_enabled():
            logits, loss_sum, counted = [], 0.0, 0
            for start in range(0, length, self.stream_piece):
                piece = slice(start, start + self.stream_piece)
                out = self(input_ids[:, piece], state, return_aux_loss,
                           targets=None if targets is None else targets[:, piece],
                           resets=None if resets is None else resets[:, piece])
                if targets is None:
                    logits.append(out.logits)
                else:  # the mean over all valid tokens, from each piece's mean
                    valid = (targets[:, piece] != IGNORE_INDEX).sum()
                    loss_sum, counted = loss_sum + out.loss.nan_to_num() * valid, counted + valid
                state = out.state
            if targets is not None:
                return ModelOutput(None, state if return_state else None, out.aux_loss, loss_sum / counted)
            logits = torch.cat(logits, dim=1)
            if logits_at is not None:
                logits = logits.gather(1, logits_at[..., None].expand(-1, -1, logits.shape[-1]))
            return ModelOutput(logits, state if return_state else None, out.aux_loss)
        x = self.embed(input_ids)
        layer_states = state.layers if state is not None else [None] * len(self.blocks)
        position = state.position if state is not None else 0
        next_states, aux_losses = [], []
        reset = {} if resets is None else {"resets": resets}  # passed only when given
        for block, layer_state in zip(self.blocks, layer_states):
            if self.activation_checkpointing and self.training:
                x, layer_state, aux = checkpoint(block, x, layer_state, return_aux_loss, position, use_reentrant=False,
                                                 **reset)
            else:
                x, layer_state, aux = block(x, layer_state, return_aux_loss, position, **reset)
            if return_state:
                next_states.append(layer_state)
            if aux is not None:
                aux_losses.append(aux)
        x = self.norm(x)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else (x.new_zeros(()) if return_aux_loss else None)
        next_state = State(next_states, position + length, self.config_json) if return_state else None
        if targets is not None:
            return ModelOutput(None, next_state, aux_loss, linear_cross_entropy(x, self.head.weight, targets))
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))  # [B, P, d]
        return ModelOutput(self.head(x), next_state, aux_loss)


def _part_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"mmrec-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _whole_parameters(part: nn.Module):
    """Inside, the FSDP-sharded parameters (DTensors) of ``part`` are whole, plain tensors
    on this process's device; on leaving, each process copies its own shard back."""
    if not torch.distributed.is_available():  # builds without distributed support: nothing is sharded
        yield
        return
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    sharded, whole = {}, {}  # id(parameter) -> the DTensor parameter, its whole stand-in
    slots = []  # (module, name, DTensor parameter): tied parameters appear once per owner
    for module in part.modules():
        for name, p in module._parameters.items():
            if isinstance(p, DTensor):
                if id(p) not in whole:
                    sharded[id(p)] = p
                    whole[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device),
                                                requires_grad=False)
                slots.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield
    finally:
        for module, name, p in slots:
            module._parameters[name] = p
    for key, p in sharded.items():
        # Replicate -> the parameter's placements is local slicing, no communication
        full = distribute_tensor(whole[key].data, p.device_mesh, [Replicate()] * p.device_mesh.ndim, src_data_rank=None)
        p.to_local().copy_(full.redistribute(p.device_mesh, p.placements).to_local())
