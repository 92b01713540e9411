"""mmrec models as Hugging Face transformers models (``pip install "mmrec[hf]"``).

    import mmrec.hf                                   # registers "mmrec" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported/")
    ids = model.generate(**AutoTokenizer.from_pretrained("exported/")(["The "], return_tensors="pt"))

``MMRecConfig`` holds the mmrec recipe (name, model and train sections) and
``MMRecForCausalLM`` wraps the same ``mmrec.LanguageModel`` that mmrec trains, so the
weights are mmrec's, under the prefix ``model.``. The streaming ``mmrec.State`` is the
cache: ``generate`` feeds one token a step whatever the context length.

Padding. A recurrent state must never see a pad token, so rows are run by the span of
their real tokens: rows whose ``attention_mask`` marks the same span run together, each
group carrying its own ``State`` (a ``BatchState``). A batch without padding is one group
and one call; a left-padded batch of prompts of k different lengths takes k calls a step.
The logits at padded positions are zeros, and the loss skips them. Padding must be a prefix
and/or a suffix of each row in the first call (the prompt); a continuation of a state is
never padded. ``generate`` reads each row's next token from the last column, so it needs
prompts padded on the left (``padding_side='left'``, as transformers' decoder-only models
do) and refuses one whose row ends in padding.

Folders written by ``save_pretrained`` carry ``modeling_mmrec.py``, two lines that import
these classes from the installed mmrec, and an ``auto_map`` naming it, so a process that
never imported ``mmrec.hf`` (``lm_eval --model hf``) loads them with ``trust_remote_code``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError('mmrec.hf needs transformers: pip install "mmrec[hf]"') from None

import mmrec
from mmrec.data.prepare import EOD_TOKEN
from mmrec.model import LanguageModel
from mmrec.state import State, map_tensors
from mmrec.tokenizer import TOKENIZER_FILE

__all__ = ["LOADER_FILE", "BatchState", "MMRecCausalLMOutput", "MMRecConfig", "MMRecForCausalLM", "end_of_document",
           "hf_tokenizer"]

LOADER_FILE = "modeling_mmrec.py"
LOADER_SOURCE = '''"""Loads mmrec's transformers classes from the installed mmrec package (pip install "mmrec[hf]")."""

from mmrec.hf import MMRecConfig, MMRecForCausalLM  # noqa: F401
'''
AUTO_MAP = {"AutoConfig": "modeling_mmrec.MMRecConfig", "AutoModelForCausalLM": "modeling_mmrec.MMRecForCausalLM"}


class _FromRecipe:
    """A transformers name (``vocab_size``, ...) for a field of the recipe's model section.
    transformers sets these names from keyword arguments (``from_pretrained(...,
    vocab_size=...)``): the recipe's own value is taken, another is refused, naming the
    recipe field to change."""

    def __init__(self, field: str, convert=None):
        self.field, self.convert = field, convert

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, config, owner=None):
        if config is None:
            return self
        value = None if config.recipe is None else config.recipe["model"][self.field]
        return value if self.convert is None else self.convert(value)

    def __set__(self, config, value):
        have = self.__get__(config)
        if value != have:
            where = "it has no recipe" if config.recipe is None else f"its recipe has model.{self.field} = {have!r}"
            raise ValueError(f"MMRecConfig reads {self.name} from its recipe, and {where}: to change it, set "
                             f"model.{self.field} in the recipe (not {self.name}={value!r})")


class MMRecConfig(PretrainedConfig):
    """The recipe, as JSON data; the usual transformers names (``vocab_size``,
    ``hidden_size``, ...) are read from its model section. A recipe that names a variant
    of a plugin that is not installed is refused here, naming the package."""

    model_type = "mmrec"

    recipe: dict | None = None

    def __init__(self, recipe=None, **kwargs):
        if recipe is not None and not isinstance(recipe, dict):  # a shipped name, a path or a recipe object
            recipe = mmrec.recipes.load(recipe).model_dump(mode="json")
        if recipe is not None:
            mmrec.recipes.load(recipe)  # validated now: a RecipeError names each problem
        self.recipe = recipe
        kwargs.pop("auto_map", None)
        super().__init__(**kwargs)
        self.auto_map = dict(AUTO_MAP)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to do: importing ``mmrec.hf`` registers the class, and ``save_pretrained``
        writes the loader file itself (transformers would copy this module instead)."""

    vocab_size = _FromRecipe("vocab_size")
    hidden_size = _FromRecipe("d_model")
    num_hidden_layers = _FromRecipe("n_layers")
    num_attention_heads = _FromRecipe("n_heads")
    max_position_embeddings = _FromRecipe("max_seq_len")
    tie_word_embeddings = _FromRecipe("tie_embeddings", bool)


@dataclass
class BatchState:
    """The cache of ``MMRecForCausalLM``: for each group of rows that share a span of real
    tokens, their row indices and their ``mmrec.State``. ``length`` counts the input
    columns consumed, padding included (the prefix of ``generate``'s ``input_ids`` that
    the state has seen)."""

    groups: list[tuple[Tensor, State]]  # (row indices [n], the State of those n rows)
    batch_size: int
    length: int

    @classmethod
    def of(cls, state: State) -> BatchState:
        """A plain ``mmrec.State`` (e.g. ``mmrec_model(ids).state``) as one group."""
        rows = torch.arange(state.batch_size)
        return cls([(rows, state)], state.batch_size, state.position)

    def select(self, index: Tensor) -> BatchState:
        """The state of rows ``index`` (new row ``j`` is old row ``index[j]``), as beam search reorders it."""
        where = {}  # old row -> (group, position in the group)
        for g, (rows, _) in enumerate(self.groups):
            for k, row in enumerate(rows.tolist()):
                where[row] = (g, k)
        picked: dict[int, tuple[list[int], list[int]]] = {}
        for j, old in enumerate(index.tolist()):
            g, k = where[old]
            picked.setdefault(g, ([], []))[0].append(j)
            picked[g][1].append(k)
        groups = []
        for g, (new_rows, members) in sorted(picked.items()):
            state = self.groups[g][1]
            take = torch.tensor(members)
            layers = [map_tensors(layer, lambda t, take=take: t.index_select(0, take.to(t.device))) for layer in state.layers]
            groups.append((torch.tensor(new_rows), State(layers, state.position, state.model_config)))
        return BatchState(groups, len(index), self.length)


@dataclass
class MMRecCausalLMOutput(ModelOutput):
    loss: Tensor | None = None  # mean next-token cross-entropy over labels that real tokens predict (exp: perplexity)
    logits: Tensor | None = None  # [B, T, vocab]; zeros at padded positions
    state: BatchState | None = None  # the cache: pass it back as state= with the next tokens
    aux_loss: Tensor | None = None  # the UBÖO planning loss, with return_aux_loss=True


def _spans(mask: Tensor) -> list[tuple[Tensor, int, int]]:
    """``(rows, start, end)`` for each group of rows whose real tokens (``mask`` [B, T], 1 =
    real) are the columns ``start:end``; a ``ValueError`` if a row's are not contiguous."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, values in enumerate(mask.tolist()):
        ones = [i for i, v in enumerate(values) if v]
        if not ones:
            raise ValueError(f"attention_mask row {row} masks every token: each row needs at least one real token")
        start, end = ones[0], ones[-1] + 1
        if len(ones) != end - start:
            raise ValueError(f"attention_mask row {row} has padding between real tokens ({values}); mmrec models "
                             "take padding only before and/or after each row's tokens (e.g. padding_side='left')")
        groups.setdefault((start, end), []).append(row)
    return [(torch.tensor(rows), start, end) for (start, end), rows in groups.items()]


class MMRecForCausalLM(PreTrainedModel, GenerationMixin):
    """``mmrec.LanguageModel`` behind the transformers API: ``labels`` for the loss,
    ``generate`` with the streaming state as its cache, ``attention_mask`` for padding."""

    config_class = MMRecConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.head.weight": "model.embed.weight"}  # when tied
    _is_stateful = True  # no assisted decoding: a state cannot be rolled back
    supports_gradient_checkpointing = True

    def __init__(self, config: MMRecConfig, model: LanguageModel | None = None):
        super().__init__(config)
        if config.recipe is None:
            raise ValueError("MMRecConfig has no recipe: give one, e.g. MMRecConfig(recipe='tiny') or a recipe dict")
        recipe = mmrec.recipes.load(config.recipe)
        if model is not None and model.config_json != recipe.model.model_dump_json():
            raise ValueError("the LanguageModel given was not built from this config's recipe")
        self.model = model if model is not None else LanguageModel(recipe.model)
        self.post_init()

    @classmethod
    def from_mmrec(cls, model: LanguageModel, recipe) -> MMRecForCausalLM:
        """Wrap an mmrec model (sharing its weights); ``recipe`` is the recipe it was built from."""
        return cls(MMRecConfig(recipe=mmrec.recipes.load(recipe).model_dump(mode="json")), model=model)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """Nothing to do: see ``MMRecConfig.register_for_auto_class``."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own state, made by forward

    def _init_weights(self, module):
        if module is self.model:
            self.model.reset_parameters()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """mmrec's activation checkpointing: each block recomputed in the backward pass."""
        self.model.set_activation_checkpointing(True)

    def gradient_checkpointing_disable(self):
        self.model.set_activation_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.activation_checkpointing

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus the loader file that ``auto_map`` names."""
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / LOADER_FILE).write_text(LOADER_SOURCE, encoding="utf-8")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        state: BatchState | State | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_aux_loss: bool = False,
        return_dict: bool | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs,
    ) -> MMRecCausalLMOutput:
        """``input_ids`` [B, T], continuing ``state`` when given. ``attention_mask`` [B, T],
        or [B, state.length + T] as ``generate`` passes it. ``labels`` [B, T]: the loss is the
        cross-entropy of token t+1 from position t, skipping labels of -100 and labels after
        a padded position (nothing real predicts them): each row's loss is that of the row
        alone, without its padding. The state is
        returned unless ``use_cache=False`` (default: returned when no labels are given).
        mmrec's own training objective adds the planning loss: ``out.loss + out.aux_loss``
        with ``return_aux_loss=True``."""
        if inputs_embeds is not None:
            raise ValueError("mmrec models take input_ids, not inputs_embeds")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, length] tensor of token ids")
        vocab = self.config.vocab_size
        batch, length = input_ids.shape
        want_state = use_cache if use_cache is not None else labels is None
        if isinstance(state, State):
            state = BatchState.of(state)
        mask = None if attention_mask is None else attention_mask[:, -length:].bool()
        if state is not None:
            if state.batch_size != batch:
                raise ValueError(f"state holds {state.batch_size} rows but input_ids has {batch}")
            if mask is not None and not bool(mask.all()):
                raise ValueError("a continuation of a state cannot be padded: pad the prompt (the first call) only")
            runs = [(rows, group_state, 0, length) for rows, group_state in state.groups]
        elif mask is None or bool(mask.all()):
            runs = [(None, None, 0, length)]
        else:
            runs = [(rows, None, start, end) for rows, start, end in _spans(mask)]

        logits, states, aux = None, [], []
        for rows, group_state, start, end in runs:
            ids = input_ids if rows is None else input_ids[rows.to(input_ids.device), start:end]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(f"input_ids hold ids outside the model's vocabulary [0, {vocab}) at unmasked positions; "
                                 "mark padding with attention_mask")
            out = self.model(ids, state=group_state, return_aux_loss=return_aux_loss, return_state=want_state)
            if rows is None:
                logits = out.logits
            else:
                if logits is None:
                    logits = out.logits.new_zeros(batch, length, out.logits.shape[-1])
                logits[rows.to(logits.device), start:end] = out.logits
            if want_state:
                states.append((torch.arange(batch) if rows is None else rows, out.state))
            if out.aux_loss is not None:
                aux.append(out.aux_loss)

        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            if mask is not None:  # a padded position's logits are zeros: what follows it is not predicted
                targets = targets.masked_fill(~mask[:, :-1].to(logits.device), -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        next_state = None
        if want_state:
            next_state = BatchState(states, batch, (state.length if state is not None else 0) + length)
        out = MMRecCausalLMOutput(loss=loss, logits=logits, state=next_state,
                                  aux_loss=torch.stack(aux).mean() if aux else None)
        return out.to_tuple() if return_dict is False else out

    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, use_cache=None, **kwargs):
        """The tokens the state has not seen yet (all of them on the first step). The next
        token is read from the last column, so every row's prompt must end there."""
        if state is not None:
            input_ids = input_ids[:, state.length :]
        elif attention_mask is not None and not bool(attention_mask[:, -1].all()):
            rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
            raise ValueError(f"generate continues each row from its last column, but attention_mask rows {rows} end "
                             "in padding: pad prompts on the left for generation (tokenizer padding_side='left'), "
                             "as transformers' decoder-only models expect")
        inputs = {"input_ids": input_ids, "state": state, "attention_mask": attention_mask}
        if use_cache is not None:
            inputs["use_cache"] = use_cache
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        if outputs.state is not None:
            model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    def _reorder_cache(self, state: BatchState | None, beam_idx: Tensor) -> BatchState | None:
        return None if state is None else state.select(beam_idx)


AutoConfig.register(MMRecConfig.model_type, MMRecConfig, exist_ok=True)
AutoModelForCausalLM.register(MMRecConfig, MMRecForCausalLM, exist_ok=True)


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` of an mmrec tokenizer."""
    import tokenizers as tk

    if tokenizer.kind == "byte":
        # every byte is the token of its value: a BPE with no merges whose vocabulary is the
        # 256 byte-fallback tokens, so each character falls back to its UTF-8 bytes
        vocab = {f"<0x{b:02X}>": b for b in range(256)}
        backend = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        backend.decoder = tk.decoders.Sequence([tk.decoders.ByteFallback(), tk.decoders.Fuse()])
        return backend
    if tokenizer.kind == "bpe":
        with tempfile.TemporaryDirectory() as folder:  # through its own file, tokenizer.json
            tokenizer.save(folder)
            return tk.Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))
    raise ValueError(f"no transformers tokenizer for mmrec tokenizer kind {tokenizer.kind!r}")


def end_of_document(tokenizer, eod_token: str | None = None) -> str | None:
    """The special token that ends each document of the token shards (``mmrec.data.prepare``)
    a model trained on: ``eod_token``, or by default ``<|endoftext|>`` when the tokenizer
    has it as a special token; ``None`` for a tokenizer without one (mmrec's byte
    tokenizer, a BPE trained on raw text). A ``ValueError`` if it has no ``eod_token``."""
    return _end_of_document(_backend(tokenizer), eod_token)


def _end_of_document(backend, eod_token: str | None) -> str | None:
    specials = sorted(t.content for t in backend.get_added_tokens_decoder().values() if t.special)
    if eod_token is None:
        return EOD_TOKEN if EOD_TOKEN in specials else None
    if eod_token not in specials:
        raise ValueError(f"the tokenizer has no special token {eod_token!r} to end documents with "
                         f"(its special tokens: {', '.join(map(repr, specials)) or 'none'})")
    return eod_token


def hf_tokenizer(tokenizer, eod_token: str | None = None):
    """The transformers tokenizer of an mmrec tokenizer (``mmrec.tokenizer``).

    Its ids are those the model trained on: ``tokenizer.encode``'s, and for a model
    trained on token shards (``mmrec.data.prepare``) the shards'. Text is only text: a
    special token's spelling in it (a literal ``<|endoftext|>``) is encoded as ordinary
    tokens (``split_special_tokens``), as prepare and ``BPETokenizer.encode`` do.

    transformers pads, and lm-evaluation-harness starts and ends text, with special tokens.
    A shards' tokenizer has one: its end-of-document token (see :func:`end_of_document`)
    is all three, as each document the model saw ended with it. A tokenizer without one
    uses the NUL byte's token, which text does not contain."""
    from transformers import PreTrainedTokenizerFast

    backend = _backend(tokenizer)
    special = _end_of_document(backend, eod_token)
    if special is None:
        nul = backend.encode("\x00", add_special_tokens=False)
        if len(nul.ids) != 1 or backend.decode(nul.ids) != "\x00":
            raise ValueError("the tokenizer has no end-of-document token and no single token for the NUL byte "
                             "to pad with")
        special = nul.tokens[0]
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=special, bos_token=special, eos_token=special,
                                   split_special_tokens=True)
