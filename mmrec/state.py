"""``State``: everything a model carries from one piece of a sequence to the next.

For an MM-Rec model, per layer: the recurrence's last state ``h`` ``[B, d]``, the memory
``[B, banks, M, dim]`` after the last complete chunk, and the keys/values of the chunk in
progress; for a Transformer, its KV cache. Its size does not grow with the length for
MM-Rec. A state saves to and loads from safetensors, stamped with a format version and the
model config that made it, so it is never fed to another model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT_VERSION = 1


class StateError(ValueError):
    """A state that does not belong to this model, or a damaged state file."""


@dataclass
class State:
    layers: list[dict]  # per block: nested dicts of tensors
    position: int  # tokens consumed so far
    model_config: str  # JSON of the model config that made it

    @property
    def batch_size(self) -> int:
        return next(iter(_flatten(self.layers[0]).values())).shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in _flatten(layer).values())

    def to(self, device: torch.device | str) -> State:
        return State([_map(layer, lambda t: t.to(device)) for layer in self.layers], self.position, self.model_config)

    def detach(self) -> State:
        return State([_map(layer, Tensor.detach) for layer in self.layers], self.position, self.model_config)

    def check_compatible(self, model_config: str) -> None:
        """Refuse a state made by a model of another config, naming the fields that differ."""
        if model_config == self.model_config:
            return
        mine, theirs = json.loads(self.model_config), json.loads(model_config)
        diffs = [f"{k}: state {mine.get(k)!r} vs model {theirs.get(k)!r}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        raise StateError("this state was made by a model with another config (" + "; ".join(diffs) + ")")

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (atomically: a temporary name, then a rename)."""
        path = Path(path)
        tensors = {f"{i}.{key}": t.contiguous() for i, layer in enumerate(self.layers) for key, t in _flatten(layer).items()}
        metadata = {"format": "mmrec.State", "version": str(FORMAT_VERSION), "position": str(self.position),
                    "n_layers": str(len(self.layers)), "model_config": self.model_config}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, model=None, device: str | torch.device = "cpu") -> State:
        """Read a saved state; with ``model``, refuse one made by another model config."""
        try:
            tensors = load_file(str(path), device=str(device))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (OSError, SafetensorError) as error:
            raise StateError(f"cannot read state file {str(path)!r}: {error}") from None
        if metadata.get("format") != "mmrec.State":
            raise StateError(f"{str(path)!r} is not an mmrec state file")
        if int(metadata.get("version", -1)) != FORMAT_VERSION:
            raise StateError(f"{str(path)!r} has state format version {metadata.get('version')}; this mmrec reads version {FORMAT_VERSION}")
        layers: list[dict] = [{} for _ in range(int(metadata["n_layers"]))]
        for key, tensor in tensors.items():
            index, _, name = key.partition(".")
            _insert(layers[int(index)], name.split("."), tensor)
        state = cls(layers, int(metadata["position"]), metadata["model_config"])
        if model is not None:
            state.check_compatible(model.config_json)
        return state


def _flatten(tree: dict, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _map(tree: dict, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _insert(tree: dict, keys: list[str], value: Tensor) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
