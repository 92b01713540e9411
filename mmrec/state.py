"""``State``: everything a model carries from one piece of a sequence to the next.

For an MM-Rec model, per layer: the recurrence's last state ``h`` ``[B, d]``, the memory
``[B, banks, M, dim]`` after the last complete chunk, and the keys/values of the chunk in
progress; for a Transformer, its KV cache. Its size does not grow with the length for
MM-Rec. A state saves to and loads from safetensors, stamped with a format version and the
model config that made it, so it is never fed to another model.

File format, version 2: a safetensors file whose tensors are named ``<layer>.<key>``
(nested keys joined by dots) and whose metadata holds ``format`` ("mmrec.State"),
``version``, ``position``, ``n_layers``, ``model_config`` and ``sha256``: a SHA-256 over
those metadata fields and every tensor's name, dtype, shape and bytes, in name order (see
:func:`checksum`). ``State.load`` recomputes it and refuses a file whose checksum differs
("is corrupted: checksum mismatch"). Version 1 files (no checksum) still load, with a
warning that damage to them cannot be detected; saving such a state again adds one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmrec import atomic

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no checksum (loads with a warning)


class StateError(ValueError):
    """A state that does not belong to this model, or a damaged state file."""


class UncheckedStateWarning(UserWarning):
    """A state file of format version 1, which has no checksum to verify."""


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
        return State([map_tensors(layer, lambda t: t.to(device)) for layer in self.layers], self.position, self.model_config)

    def detach(self) -> State:
        return State([map_tensors(layer, Tensor.detach) for layer in self.layers], self.position, self.model_config)

    def check_compatible(self, model_config: str) -> None:
        """Refuse a state made by a model of another config, naming the fields that differ."""
        if model_config == self.model_config:
            return
        mine, theirs = json.loads(self.model_config), json.loads(model_config)
        diffs = [f"{k}: state {mine.get(k)!r} vs model {theirs.get(k)!r}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        raise StateError("this state was made by a model with another config (" + "; ".join(diffs) + ")")

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        """Write to a safetensors file, with a checksum (format version 2).

        Atomic: written under a temporary name in the same folder, then renamed, so an
        existing file is replaced whole or not at all. As ``torch.save`` does, the folder
        must exist (it is not created) and an existing file is replaced, unless
        ``overwrite=False``, which refuses it. Any failure is a ``StateError`` naming
        ``path``."""
        path = Path(path)
        check_writable(path, overwrite)
        tensors, seen = {}, set()
        for i, layer in enumerate(self.layers):
            for key, t in _flatten(layer).items():
                t = t.detach().contiguous()
                identity = (t.device, t.data_ptr(), t.dtype, tuple(t.shape))
                if t.numel() and identity in seen:  # safetensors refuses one tensor stored twice
                    t = t.clone()
                seen.add(identity)
                tensors[f"{i}.{key}"] = t
        metadata = {"format": "mmrec.State", "version": str(FORMAT_VERSION), "position": str(self.position),
                    "n_layers": str(len(self.layers)), "model_config": self.model_config}
        # subtrees without tensors (a variant with nothing to carry, e.g. the `none` memory's
        # {}) leave no entry among the tensors: their paths keep the layers' shape
        if empty := [f"{i}.{key}" for i, layer in enumerate(self.layers) for key in _empty_subtrees(layer)]:
            metadata["empty"] = json.dumps(empty)
        metadata["sha256"] = checksum(tensors, metadata)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # never a name the user has
        try:
            with atomic.replacing(path, tmp, durable=False):
                save_file(tensors, str(tmp), metadata=metadata)
        except (OSError, SafetensorError, RuntimeError) as error:
            raise StateError(f"cannot write state file {str(path)!r}: {error}") from None

    @classmethod
    def load(cls, path: str | Path, model=None, device: str | torch.device = "cpu") -> State:
        """Read a saved state; with ``model``, refuse one made by another model config.

        A file that is not a state, is truncated, or whose checksum does not match (it was
        damaged after saving) is refused with a ``StateError`` naming it; a version-1 file,
        which has no checksum, loads with an ``UncheckedStateWarning``."""
        name = str(path)
        try:
            from safetensors import safe_open

            with safe_open(name, framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(name, device="cpu")  # checked on the CPU, then moved
        except (OSError, SafetensorError) as error:
            raise StateError(f"cannot read state file {name!r}: {error}"
                             + ("" if isinstance(error, OSError) else " (it is truncated, damaged, or not a safetensors file)")) from None
        if metadata.get("format") != "mmrec.State":
            raise StateError(f"{name!r} is not an mmrec state file")
        try:
            version = int(metadata.get("version", ""))
        except ValueError:
            raise StateError(f"{name!r} is corrupted: its state format version {metadata.get('version')!r} is not a number") from None
        if version not in READABLE_VERSIONS:
            newer = " (made by a newer mmrec; upgrade mmrec to read it)" if version > FORMAT_VERSION else ""
            raise StateError(f"{name!r} has state format version {version}{newer}; this mmrec reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        if version == 1:
            warnings.warn(f"state file {name!r} has format version 1, which carries no checksum, so damage to it "
                          "cannot be detected; save the state again to add one", UncheckedStateWarning, stacklevel=2)
        else:
            stored = metadata.get("sha256")
            if stored is None:
                raise StateError(f"{name!r} is corrupted: its checksum (sha256) is missing")
            if checksum(tensors, {k: v for k, v in metadata.items() if k != "sha256"}) != stored:
                raise StateError(f"{name!r} is corrupted: checksum mismatch (its data changed after it was saved); "
                                 "it cannot be used: save the state again from its source")
        try:
            n_layers, position, model_config = int(metadata["n_layers"]), int(metadata["position"]), metadata["model_config"]
            layers: list[dict] = [{} for _ in range(n_layers)]
            for key, tensor in tensors.items():
                index, _, rest = key.partition(".")
                _insert(layers[int(index)], rest.split("."), tensor.to(device))
            for key in json.loads(metadata.get("empty", "[]")):
                index, _, rest = key.partition(".")
                _insert(layers[int(index)], rest.split("."), {})
        except (KeyError, ValueError, IndexError, TypeError) as error:
            raise StateError(f"{name!r} is corrupted: malformed state ({type(error).__name__}: {error})") from None
        state = cls(layers, position, model_config)
        if model is not None:
            state.check_compatible(model.config_json)
        return state


def check_writable(path: str | Path, overwrite: bool = True) -> None:
    """Raise a ``StateError`` unless a state can be written to ``path``: its folder exists
    and is writable, ``path`` is not a folder, and (with ``overwrite=False``) no file is
    there yet. ``State.save`` calls it; a program can call it before long work."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise StateError(f"cannot write state file {str(path)!r}: it is a folder; give a file name")
    if not parent.is_dir():
        raise StateError(f"cannot write state file {str(path)!r}: the folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StateError(f"cannot write state file {str(path)!r}: the folder {str(parent)!r} is not writable")
    if path.exists() and not overwrite:
        raise StateError(f"state file {str(path)!r} already exists; choose another name or allow overwriting it")


def checksum(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 (hex) of a state file's content: the metadata fields that describe the state,
    then each tensor's name, dtype, shape and bytes (little-endian, as safetensors stores
    them), in name order."""
    digest = hashlib.sha256(b"mmrec.State\n")
    fields = {k: metadata.get(k) for k in ("format", "version", "position", "n_layers", "model_config")}
    if "empty" in metadata:  # only in files that have empty subtrees, so older checksums still match
        fields["empty"] = metadata["empty"]
    digest.update(json.dumps(fields, sort_keys=True).encode() + b"\n")
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode() + b"\n")
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _flatten(tree: dict, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _empty_subtrees(tree: dict, prefix: str = "") -> list[str]:
    """The dotted paths of the dicts in ``tree`` that hold no tensor at any depth."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _empty_subtrees(value, f"{prefix}{key}.") if _flatten(value) else [f"{prefix}{key}"]
    return out


def map_tensors(tree: dict, fn) -> dict:
    """A layer's state (a tree of dicts with tensor leaves) with ``fn`` applied to every
    tensor: moving, detaching, cloning or selecting rows of a whole state at once."""
    return {k: map_tensors(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _insert(tree: dict, keys: list[str], value: Tensor) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
