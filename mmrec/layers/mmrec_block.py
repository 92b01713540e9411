"""The MM-Rec block (docs/design.md section 2) and the config of an MM-Rec model.

``u = RMSNorm(x)``; one fused projection (HEM) gives ``q, k, v`` for the memory, the
candidate ``z`` and, for recurrences that read the input, the gate logits ``g``; MDI turns
``z, k`` into the decay ``γ``; the registered recurrence gives the short-term state ``h``;
the registered memory gives a long-term context; then
``x + dropout(W_o(RMSNorm(h) + context))`` and ``x + FFN(RMSNorm(x))``. The state is
normalised before ``W_o`` because its scale grows up to ``1 / (1 - γ)`` times the input's.

Options from the seeds, off by default (docs/design.md section 2 says what is measured of them):
``gated_integration`` (MDI's ``(1 - ι) ⊙ h + ι ⊙ z + γ ⊙ h`` on the recurrence's output) and
``pe_dim`` (HEM's ``p = W_p u`` and ``e = W_e p``, added to the memory's context before ``W_o``).

Two options beyond the first design (docs/design.md section 8), off by default: ``short_conv`` passes ``z`` through a short
causal convolution (:mod:`mmrec.layers.short_conv`) before MDI and the recurrence, and
``recurrence_dropout`` drops elements of the recurrence's input (not of what MDI reads),
the regularisation recurrent networks over characters need to generalise.

What the block asks of its recurrence and memory is written down in :mod:`mmrec.contracts`
(``Recurrence``, ``Memory``): a recurrence may ask for more than ``z``, ``log γ`` and ``g``
(``projection_widths``: extra outputs of the fused projection, passed by name;
``decay_width``: MDI's decays per token, one per head for ``delta``), or for no MDI at all
(``needs_decay = False``: ``log_decay=None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator,
                      model_serializer, model_validator)
from torch import Tensor, nn

from mmrec import contracts, registry
from mmrec.config import ModelConfigBase
from mmrec.layers.ffn import SwiGLU
from mmrec.layers.mdi import MDI
from mmrec.layers.norm import RMSNorm
from mmrec.layers.planning import Planning
from mmrec.layers.projection import FusedProjection
from mmrec.layers.short_conv import ShortConv
from mmrec.layers.variant import Variant
from mmrec.ops import accumulation_dtype
from mmrec.state import map_tensors


def build_variant(group: str, config: Variant, **kwargs) -> nn.Module:
    """Instantiate the registered ``group`` variant that ``config.kind`` names (with the
    contract's defaults for what a plain ``nn.Module`` variant leaves out)."""
    cls = contracts.with_defaults(registry.get(group, config.kind), group)
    if not isinstance(config, cls.Config):  # a bare Variant: validate it by the variant's own schema
        config = cls.Config.model_validate(config.model_dump())
    return cls(config, **kwargs)


class LayerOverride(BaseModel):
    """Fields of the block that some layers set otherwise: the layers, as ``layers`` (0-based
    indices) or as ``every`` with ``offset`` (layers ``offset``, ``offset + every``, ...: a
    pattern that holds at any depth, as Jamba's attention period and offset), and any of
    ``MMRecBlock.Config.per_layer_fields``, e.g. ``{"every": 4, "recurrence": {"kind":
    "delta"}, "decay_init": [0.9, 0.999]}``. A hybrid stack, as fla's configs put attention
    in a few layers of a linear-attention model. A variant of another kind than the model's
    replaces it (its own defaults fill in the rest); without ``kind``, or with the model's,
    only the fields given change (``{"memory": {"slots": 32}}``)."""

    model_config = ConfigDict(extra="allow")

    layers: list[NonNegativeInt] | None = Field(None, min_length=1, description="the layers, by index")
    every: PositiveInt | None = Field(None, description="or: every this many layers, from offset")
    offset: NonNegativeInt = Field(0, description="the first layer of every")

    @model_validator(mode="after")
    def _layers_named_one_way(self):
        if (self.layers is None) == (self.every is None):
            raise ValueError("name the layers by 'layers' (a list of indices) or by 'every' (and 'offset'), not both")
        if self.layers is not None and self.offset:
            raise ValueError("'offset' goes with 'every'; 'layers' lists the indices themselves")
        return self

    @model_serializer(mode="wrap")
    def _dump_the_way_named(self, handler):
        # only the fields of the way the layers are named, so that a group given as a list
        # dumps (into checkpoints' recipe.json) as it did before 'every' existed
        data = handler(self)
        for name in ("layers",) if self.every is not None else ("every", "offset"):
            data.pop(name, None)
        return data

    def indices(self, n_layers: int) -> Sequence[int]:
        """The layers named, in a model of ``n_layers`` (``layers`` as given)."""
        return self.layers if self.every is None else range(self.offset, n_layers, self.every)

    def names(self, layer: int) -> bool:
        if self.every is None:
            return layer in self.layers
        return layer >= self.offset and (layer - self.offset) % self.every == 0

    def first_shared(self, other: "LayerOverride", n_layers: int) -> int | None:
        """The first layer below ``n_layers`` that both groups name, or None."""
        if self.every is None or other.every is None:
            listed, other = (self, other) if self.every is None else (other, self)
            shared = (set(listed.layers) & set(other.layers) if other.every is None
                      else {layer for layer in listed.layers if other.names(layer)})
            return min((layer for layer in shared if layer < n_layers), default=None)
        # two patterns: x = a (mod p) and x = b (mod q) with x >= max(a, b), by the Chinese
        # remainder theorem (solvable only when gcd(p, q) divides b - a)
        (p, a), (q, b) = (self.every, self.offset), (other.every, other.offset)
        g = math.gcd(p, q)
        if (b - a) % g:
            return None
        period = p // g * q
        x = a + p * ((b - a) // g * pow(p // g, -1, q // g) % (q // g))
        x += -(-(max(a, b) - x) // period) * period if x < max(a, b) else 0
        return x if x < n_layers else None


class MMRecBlock(contracts.Block):
    class Config(ModelConfigBase):
        """An MM-Rec language model: gated recurrence plus long-term memory in each block, or per
        layer what ``layer_overrides`` sets (hybrid stacks)."""

        arch: Literal["mmrec"] = "mmrec"
        chunk_size: PositiveInt = Field(256, description="tokens per memory chunk")
        hem: bool = Field(True, description="fuse the block's input projections into one matmul")
        decay_init: float | tuple[float, float] = Field(
            0.99, description="initial decay γ of the recurrence; or (low, high): time constants spread over the channels"
        )
        recurrence: Variant = Variant(kind="parallel")
        memory: Variant = Variant(kind="hds")
        planning: Planning.Config | None = Field(None, description="UBÖO planning auxiliary loss; null disables it")
        short_conv: int | None = Field(
            None, ge=2, description="kernel size of a causal depthwise convolution on z before MDI and the recurrence; null: none"
        )
        short_conv_init: Literal["identity", "random"] = Field("identity", description="the convolution's initial taps")
        recurrence_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the recurrence's input z (training only)")
        gated_integration: bool = Field(
            False, description="MDI's gated integration (1-ι)⊙h + ι⊙z + γ⊙h of the recurrence's output, ι = σ(W_ι[z; h]) "
                               "(the seeds' MDI)",
        )
        pe_dim: PositiveInt | None = Field(
            None, description="width of HEM's projection p = W_p u, whose e = W_e p is added before W_o "
                              "(the seeds' p, e and pe_dim); null: none",
        )

        layer_overrides: list[LayerOverride] = Field(
            [], description="layers whose recurrence, memory, decay_init, short convolution or recurrence dropout differ from the "
                            "model's: [{\"layers\": [1, 3], \"recurrence\": {\"kind\": \"delta\"}}] (a hybrid stack)",
        )

        variant_groups: ClassVar[dict[str, str]] = {"recurrence": "recurrences", "memory": "memories"}
        # what a layer override may set: the block's own mixing, not the model's shape
        per_layer_fields: ClassVar[tuple[str, ...]] = (
            "recurrence", "memory", "decay_init", "short_conv", "short_conv_init", "recurrence_dropout")

        @field_validator("decay_init")
        @classmethod
        def _decay_in_range(cls, value):
            bounds = value if isinstance(value, tuple) else (value,)
            if not all(0 < g < 1 for g in bounds) or list(bounds) != sorted(bounds):
                raise ValueError("must be in (0, 1), or a range [low, high] with 0 < low <= high < 1")
            return value

        @model_validator(mode="after")
        def _layer_overrides_fit_the_model(self):
            for i, group in enumerate(self.layer_overrides):
                where = f"layer_overrides[{i}]"
                fields = set(group.model_extra or {})
                if not fields:
                    raise ValueError(f"{where} sets nothing for its layers: give one of "
                                     f"{', '.join(self.per_layer_fields)}")
                for name in sorted(fields - set(self.per_layer_fields)):
                    allowed = f"a layer may set {', '.join(self.per_layer_fields)}"
                    if name in type(self).model_fields:
                        raise ValueError(f"{where}.{name}: the same for every layer; {allowed}")
                    hint = registry.closest(name, list(self.per_layer_fields))
                    raise ValueError(f"{where}.{name}: unknown field; " + (f"did you mean {hint!r}?" if hint else allowed))
                for layer in group.layers or ():
                    if layer >= self.n_layers:
                        raise ValueError(f"{where}.layers: layer {layer}, but the model has {self.n_layers} "
                                         f"(0 to {self.n_layers - 1}); name only layers that exist, or give "
                                         "'every' (and 'offset'), which holds at any depth")
                if group.layers is not None and len(set(group.layers)) < len(group.layers):
                    raise ValueError(f"{where}.layers: a layer is listed twice; name each layer once")
                if group.every is not None and group.offset >= self.n_layers:
                    raise ValueError(f"{where}.offset: {group.offset} names no layer of {self.n_layers}")
                for j, earlier in enumerate(self.layer_overrides[:i]):
                    shared = group.first_shared(earlier, self.n_layers)
                    if shared is not None:
                        raise ValueError(f"{where}: layer {shared} is in layer_overrides[{j}] too; "
                                         "name each layer once")
                for slot, group_name in self.variant_groups.items():
                    variant = (group.model_extra or {}).get(slot)
                    if isinstance(variant, dict) and "kind" in variant:
                        try:
                            registry.get(group_name, variant["kind"])
                        except registry.UnknownNameError as error:
                            raise ValueError(f"{where}.{slot}.kind: {error}") from None
                try:
                    self.for_layer(group.indices(self.n_layers)[0])
                except ValidationError as error:
                    raise ValueError("; ".join(f"{where}.{self._override_path(e['loc'])}: {e['msg']}"
                                               for e in error.errors())) from None
            return self

        def comparable_dump(self) -> dict:
            """Each override group written as the sorted layers it names, however the recipe
            wrote it (``every`` or a list, in any order)."""
            data = super().comparable_dump()
            data["layer_overrides"] = [{"layers": sorted(group.indices(self.n_layers)), **(group.model_extra or {})}
                                       for group in self.layer_overrides]
            return data

        def _override_path(self, loc: tuple) -> str:
            """A pydantic error location inside a layer's config as a recipe path (without
            the variant union's tag)."""
            parts = list(loc)
            if len(parts) > 1 and parts[0] in self.variant_groups and parts[1] in registry.entries(self.variant_groups[parts[0]]):
                del parts[1]  # the union member's tag, e.g. "delta"
            return ".".join(map(str, parts))

        def for_layer(self, layer: int) -> "MMRecBlock.Config":
            """This config as layer ``layer`` sees it, validated by this (recipe-narrowed)
            class, so a variant's fields are checked as the model's are. A variant in the
            override without ``kind``, or with the model's, changes only the fields it gives;
            one of another kind replaces the model's (its own defaults fill in the rest)."""
            group = next((g for g in self.layer_overrides if g.names(layer)), None)
            if group is None:
                return self
            merged = self.model_dump(exclude={"layer_overrides"})
            for name, value in group.model_extra.items():
                if name in self.variant_groups and isinstance(value, dict):
                    model_variant = merged[name]
                    if value.get("kind", model_variant["kind"]) == model_variant["kind"]:
                        value = {**model_variant, **value}
                merged[name] = value
            return type(self).model_validate(merged)

        @model_validator(mode="after")
        def _variants_fit_the_model(self):
            # a variant's config may check what it needs of the model (``check_model``), so
            # that a recipe fails validation rather than the build
            for slot in self.variant_groups:
                check = getattr(getattr(self, slot), "check_model", None)
                if check is not None:
                    check(self)
            return self

    def __init__(self, config: Config, layer: int = 0):
        super().__init__()
        config = config.for_layer(layer)
        d = config.d_model
        common = dict(d_model=d, n_heads=config.n_heads, init_std=config.init_std)
        self.chunk_size = config.chunk_size
        self.dropout_p = config.dropout
        self.recurrence = build_variant("recurrences", config.recurrence, **common)
        self.memory = build_variant("memories", config.memory, **common)
        key_dim = self.memory.key_dim
        memory_widths = self.memory.projection_widths(d)
        if memory_widths.get("k") != key_dim or not set(memory_widths) <= {"q", "k", "v"}:
            raise ValueError(f"memory {config.memory.kind!r} asks for projections {memory_widths}: it may ask for q, k "
                             f"and v only, and must ask for a k of its key_dim ({key_dim}), which MDI reads")
        self.widths = {**memory_widths, "z": d}
        if self.recurrence.needs_input_gate:
            self.widths["g"] = d
        # what the recurrence asks for beyond z, log γ and g (see the module docstring)
        self.recurrence_inputs = dict(self.recurrence.projection_widths(d, config.n_heads))
        if taken := set(self.recurrence_inputs) & set(self.widths):
            raise ValueError(f"recurrence {config.recurrence.kind!r} asks for projections named like the block's own: {sorted(taken)}")
        self.widths.update(self.recurrence_inputs)
        if config.pe_dim is not None:  # the seeds' p (HEM) and e = W_e p
            if "p" in self.widths:
                raise ValueError(f"recurrence {config.recurrence.kind!r} asks for a projection named 'p', which pe_dim uses")
            self.widths["p"] = config.pe_dim
        self.pe_out = nn.Linear(config.pe_dim, d, bias=config.bias) if config.pe_dim is not None else None  # W_e: p -> e
        decay_width = self.recurrence.decay_width(d, config.n_heads)
        self.short_conv = ShortConv(d, config.short_conv, config.short_conv_init) if config.short_conv is not None else None
        self.norm = RMSNorm(d, config.norm_eps)
        self.proj = FusedProjection(d, self.widths, fused=config.hem, bias=config.bias)
        # a recurrence with a decay of its own (``needs_decay = False``) gets no MDI
        if config.gated_integration and not self.recurrence.needs_decay:
            raise ValueError(f"gated_integration needs MDI's decay, and recurrence {config.recurrence.kind!r} has a decay "
                             "of its own (no MDI); set gated_integration: false")
        self.mdi = (MDI(d, key_dim, config.decay_init, config.init_std, width=decay_width,
                        integration=config.gated_integration)
                    if self.recurrence.needs_decay else None)
        self.state_norm = RMSNorm(d, config.norm_eps)
        self.out = nn.Linear(d, d, bias=config.bias)  # W_o
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.ffn = SwiGLU(d, config.ffn_dim, config.bias, config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.recurrence_dropout = nn.Dropout(config.recurrence_dropout)
        self.planning = Planning(config.planning, d, config.bias) if config.planning is not None else None

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out, self.ffn.down]

    # static decoding (mmrec.decode): the recurrence's state is fixed-size already; the
    # memory keeps its own buffers (``static_state``, ``step``, ``complete_chunk``), and the
    # decoder calls ``complete_chunk`` after the step of each chunk's last token

    def supports_static(self) -> bool:
        """Whether the memory has a static decode step (``hds``, ``window`` and ``none`` do)."""
        return self.memory.supports_static()

    def static_state(self, layer: dict, *, batch: int, position: int, **unused) -> dict:
        """Buffers that continue the eager ``layer`` state."""
        return {**_fixed_size_copy(layer), "memory": self.memory.static_state(layer["memory"], batch, self.chunk_size)}

    @staticmethod
    def static_capacity(static: dict) -> int | None:
        return None  # any length

    def eager_state(self, static: dict, length: int) -> dict:
        """The eager state equal to ``static`` after ``length`` tokens (a copy)."""
        pending = length % self.chunk_size
        return {**_fixed_size_copy(static), "memory": self.memory.eager_state(static["memory"], pending)}

    def complete_chunk(self, static: dict) -> None:
        self.memory.complete_chunk(static["memory"])

    def mixing_flops(self, length: int) -> float:
        """Training FLOPs per token that no parameter counts: the recurrence's and the
        memory's own (``flops_per_token(length, chunk_size)``; 0 for a variant without it)."""
        return sum(part.flops_per_token(length, self.chunk_size) for part in (self.recurrence, self.memory))

    def log_decay(self, z: Tensor, k: Tensor) -> Tensor | None:
        """MDI's ``log γ``: in the activations' dtype for a recurrence that takes it so
        (``narrow_decay``, e.g. the parallel scan), else in the accumulation dtype."""
        if self.mdi is None:
            return None
        return self.mdi(z, k, None if self.recurrence.narrow_decay else accumulation_dtype(z.dtype))

    def supports_resets(self) -> bool:
        """Whether both variants take document resets (the convolution, MDI and the rest
        of the block do)."""
        return self.recurrence.supports_resets and self.memory.supports_resets

    def forward(
        self, x: Tensor, state: dict | None = None, return_aux_loss: bool = False, position: int | Tensor = 0,
        *, resets: Tensor | None = None,
    ) -> tuple[Tensor, dict, Tensor | None]:
        """``x``: ``[B, T, d_model]`` -> ``(x, state, aux_loss)``.

        ``state`` (from the previous call) carries the recurrence's last ``h`` (``[B, d]``,
        float32; or whatever the recurrence returns as such, e.g. a dict of tensors), the
        memory's state and, with ``short_conv``, the convolution's last inputs
        (``conv``, ``[B, K-1, d]``), so a sequence fed in pieces gives what one pass gives.
        A ``position`` tensor marks a static decode step (one token, ``state`` from
        ``mmrec.decode``): the memory's buffers are then updated in place. ``resets``
        ``[B, T]`` bool: document starts, which nothing before them crosses (the model
        checks :meth:`supports_resets` first).
        """
        state = state or {}
        reset = {} if resets is None else {"resets": resets}  # passed only when given: a variant without it is untouched
        u = self.norm(x)
        p = self.proj(u)
        z, new_state = p["z"], {}
        if self.short_conv is not None:
            z, new_state["conv"] = self.short_conv(z, state.get("conv"), resets)
        log_decay = self.log_decay(z, p["k"])
        extra = {name: p[name] for name in self.recurrence_inputs}
        h, h_last = self.recurrence(self.recurrence_dropout(z), log_decay, p.get("g"), state.get("h"), **reset, **extra)
        dropout = self.dropout_p if self.training else 0.0
        if isinstance(position, Tensor):  # a static decode step (mmrec.decode): buffers updated in place
            context, memory_state = self.memory.step(p.get("q"), p["k"], p.get("v"), self.chunk_size, state["memory"], position)
        else:
            context, memory_state = self.memory(p.get("q"), p["k"], p.get("v"), self.chunk_size, state.get("memory"), dropout,
                                                **reset)
        if self.mdi is not None and self.mdi.integration is not None:
            h = self.mdi.integrate(h, z, log_decay)
        h = self.state_norm(h.to(x.dtype))
        if self.pe_out is not None:
            e = self.pe_out(p["p"])
            context = e if context is None else context + e
        x = x + self.dropout(self.out(h if context is None else h + context))
        x = x + self.ffn(self.ffn_norm(x))
        aux = self.planning(h, u) if (return_aux_loss and self.planning is not None) else None
        return x, {"h": h_last, "memory": memory_state, **new_state}, aux


def _fixed_size_copy(layer: dict) -> dict:
    """Copies of a block's state other than its memory: ``h`` (a tensor, or a dict of
    tensors for a recurrence that carries several) and, with a short convolution,
    ``conv``, which are fixed-size already and need no static form."""
    return {name: map_tensors(value, Tensor.clone) if isinstance(value, dict) else value.clone()
            for name, value in layer.items() if name != "memory"}
