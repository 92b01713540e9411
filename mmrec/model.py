"""A language model: token embedding, a stack of registered blocks, final norm, LM head.

The block class comes from the registry by the recipe's ``arch`` (``mmrec`` or
``transformer`` built in), so an MM-Rec model and its Transformer baseline differ only in
their blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmrec import registry
from mmrec.config import ModelConfigBase
from mmrec.layers.norm import RMSNorm


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, vocab]
    state: object | None = None  # streaming state to continue from (not yet carried: None)
    aux_loss: Tensor | None = None  # mean planning loss over layers, when asked for


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfigBase):
        super().__init__()
        self.config = config
        block = registry.get("layers", config.arch)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(block(config, layer=i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) linears and embeddings, residual outputs scaled by depth (GPT-2)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()
        for block in self.blocks:
            for linear in block.residual_projections():
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(self, input_ids: Tensor, state=None, return_aux_loss: bool = False) -> ModelOutput:
        """``input_ids``: ``[B, T]`` token ids."""
        if state is not None:
            raise NotImplementedError("streaming state is not implemented yet; call with state=None")
        x = self.embed(input_ids)
        aux_losses = []
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x, _, aux = checkpoint(block, x, None, return_aux_loss, use_reentrant=False)
            else:
                x, _, aux = block(x, None, return_aux_loss)
            if aux is not None:
                aux_losses.append(aux)
        logits = self.head(self.norm(x))
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else (logits.new_zeros(()) if return_aux_loss else None)
        return ModelOutput(logits=logits, state=None, aux_loss=aux_loss)
