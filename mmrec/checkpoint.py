"""Training checkpoints: one folder per step, written whole or not at all.

``<run>/step_000100/`` holds

- the weights and the optimizer state, in one of two layouts (below);
- ``trainer.pt``: scheduler, RNG states and data position (and, in the single-file
  layout, the optimizer state);
- ``recipe.json``: the recipe, readable;
- ``tokenizer.json``: the BPE tokenizer, when one was trained;
- ``manifest.json``: size and SHA-256 of each file above, written last.

The folder is written as ``step_000100.tmp``, fsynced, and renamed (:mod:`mmrec.atomic`);
a folder without the ``.tmp`` suffix is therefore complete. Loading checks the manifest
before reading anything, so a truncated or damaged file is reported by name instead of
surfacing as a cryptic library error. Weights that are not finite are never saved.

Why two layouts. A single process writes ``model.safetensors``: the whole model in one
file with the recipe JSON, the step and the tokenizer kind as metadata, which
``safetensors``, ``transformers`` (``mmrec.hf``) and any other tool read without mmrec.
Several processes (``torchrun``, FSDP2: see ``mmrec.distributed``) hold a shard each,
and gathering the whole model and optimizer state on one of them would need the memory
sharding exists to avoid; so they write one ``torch.distributed.checkpoint`` (DCP)
checkpoint in ``dcp/`` (``.metadata`` and a ``__<rank>_0.distcp`` file per rank, every
rank writing its own shard), marked ``"layout": "dcp"`` in the manifest, with
``trainer.pt`` also holding every rank's RNG state. :func:`save_training_checkpoint`
picks the layout from the model (sharded or not).

Loading has one way in for both layouts and for plain and sharded models alike
(:meth:`Checkpoint.load_training_state`, :meth:`Checkpoint.load_model`): the stored
state is read, as whole tensors from ``model.safetensors`` or as the shards this model
needs from ``dcp/`` (DCP re-shards on load, also into one process), and handed to
``torch.distributed.checkpoint.state_dict``'s setters, which keep each process's part.
So either layout resumes on any number of processes, and ``python -m
mmrec.recipes.generate`` reads either as it is. :func:`export_checkpoint` (``python -m
mmrec.recipes.train --export CHECKPOINT``) turns a DCP checkpoint into the single-file
layout, optimizer state included, for tools that want one ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmrec import atomic

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "export_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "model_differences",
    "prune_checkpoints",
    "remove_stale_tmp",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "save_training_checkpoint",
    "set_rng_state",
]

FORMAT = "mmrec-checkpoint-1"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
RECIPE_FILE = "recipe.json"
MANIFEST_FILE = "manifest.json"
DCP_DIR = "dcp"  # the distributed layout's DCP checkpoint, inside the step folder
LAYOUT_SINGLE, LAYOUT_DCP = "single", "dcp"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged, or does not fit the current run."""


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every random number generator training draws from (data order does not: it is a
    function of seed and step)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_rng_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        elif cuda:
            torch.cuda.set_rng_state(cuda[0])


def _as_python_rng_state(s):
    version, internal, gauss = s
    return int(version), tuple(int(x) for x in internal), gauss


# --------------------------------------------------------------------------- paths


def _step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders in ``run_dir`` (by name; not verified), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest one in a run folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path} (no such file or directory)")
    if p.is_file():
        p = p.parent  # e.g. --resume runs/tiny/step_000100/model.safetensors
    if (p / MANIFEST_FILE).exists() or (p / MODEL_FILE).exists() or _STEP_DIR.match(p.name):
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        tmp = sorted(p.glob("step_*.tmp"))
        extra = f" (only unfinished {tmp[-1].name}, which an interrupted save left)" if tmp else ""
        raise CheckpointError(f"no checkpoint in {path}{extra}")
    return ckpts[-1][1]


def remove_stale_tmp(run_dir: str | Path) -> None:
    """Delete what a crash during a save left in ``run_dir`` and its ``best/``: ``step_*.tmp``
    folders (a save in progress) and ``.step_*.<id>.old`` ones (a checkpoint being replaced,
    :mod:`mmrec.atomic`)."""
    for folder in (Path(run_dir), Path(run_dir) / "best"):
        for p in [*folder.glob("step_*.tmp"), *folder.glob(".step_*.old")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns what was deleted."""
    ckpts = list_checkpoints(run_dir)
    doomed = [p for _, p in ckpts[: max(len(ckpts) - keep_last, 0)]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- save


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_record(f: Path) -> dict[str, Any]:
    atomic.fsync(f)  # several processes: each fsyncs its share of the files
    return {"bytes": f.stat().st_size, "sha256": _sha256(f)}


def _step_paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    """``(final, tmp)``: the folder of ``step`` and the one it is written as."""
    final = run_dir / _step_dir_name(step)
    return final, run_dir / (final.name + ".tmp")


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def _write_common(tmp: Path, recipe, trainer_state: dict[str, Any], tokenizer) -> None:
    torch.save(trainer_state, tmp / TRAINER_FILE)
    (tmp / RECIPE_FILE).write_text(recipe.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tokenizer.save(tmp)


def _local_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """This process's parameters (its shards, under FSDP), without the empty ones."""
    local = ((name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters())
    return [(name, t.detach()) for name, t in local if t.numel()]


def weights_finite(model: torch.nn.Module) -> torch.Tensor:
    """Whether this process's parameters are all finite, as a 0-dim bool on their device (no
    host synchronisation): one fused max-abs reduction, through which nan and inf pass."""
    tensors = [t for _, t in _local_weights(model)]
    if not tensors:
        return torch.tensor(True)
    return torch.nn.utils.get_total_norm(tensors, math.inf).isfinite()


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of this process's parameters that hold inf or nan."""
    return [name for name, t in _local_weights(model) if not bool(t.isfinite().all())]


def name_some(names: list[str], shown: int = 3) -> str:
    """``a, b, c, ...``: the first ``shown`` names, for a message."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe,
    trainer_state: dict[str, Any],
    tokenizer,
    keep_last: int | None = None,
) -> Path:
    """Save a training run's ``model`` and ``optimizer`` in the layout its processes can
    write (module docstring): the single-file one for a plain model, the DCP one for a
    sharded model (a collective then: every process calls it). Returns the folder."""
    if _is_sharded(model):
        return save_distributed_checkpoint(run_dir, step, model, optimizer, recipe, trainer_state, tokenizer,
                                           keep_last)
    return save_checkpoint(run_dir, step, model, recipe, {**trainer_state, "optimizer": optimizer.state_dict()},
                           tokenizer, keep_last)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    recipe,
    trainer_state: dict[str, Any],
    tokenizer,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/step_NNNNNN`` in the single-file layout and return it. ``recipe`` is
    the pydantic recipe; ``tokenizer`` anything with ``kind`` and ``save(dir)``;
    ``keep_last`` prunes older checkpoints after the new one is in place."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    if not bool(weights_finite(model)):
        raise CheckpointError(f"refusing to save step {step} under {run_dir}: the weights "
                              f"{name_some(non_finite_parameters(model))} are not finite")
    run_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = _step_paths(run_dir, step)
    metadata = {"format": FORMAT, "recipe": recipe.model_dump_json(), "step": str(step), "tokenizer": tokenizer.kind}
    with atomic.replacing(final, tmp):  # a failed save leaves no half-written folder behind
        tmp.mkdir()
        save_model(model, str(tmp / MODEL_FILE), metadata=metadata)
        _write_common(tmp, recipe, trainer_state, tokenizer)
        files = {f.name: _file_record(f) for f in sorted(tmp.iterdir())}
        _write_manifest(tmp, {"format": FORMAT, "step": step, "tokenizer": tokenizer.kind, "files": files})
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def save_distributed_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe,
    trainer_state: dict[str, Any],
    tokenizer,
    keep_last: int | None = None,
) -> Path:
    """The DCP layout (module docstring) of a sharded ``model`` and its ``optimizer``: a
    collective, every rank calls it with the same arguments (only rank 0's
    ``trainer_state`` is written, with every rank's RNG state added as ``rng_per_rank``).
    Returns the final folder on every rank, once it is in place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = _step_paths(run_dir, step)
    rng_per_rank = [None] * world
    dist.all_gather_object(rng_per_rank, rng_state())
    model_state, optim_state = get_state_dict(model, optimizer)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    # rank 0 renames the folder once every rank has written its files into it
    with atomic.replacing(final, tmp) if rank == 0 else contextlib.nullcontext(tmp):
        if rank == 0:
            tmp.mkdir()
        dist.barrier()
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / DCP_DIR)
        if rank == 0:
            _write_common(tmp, recipe, {**trainer_state, "rng_per_rank": rng_per_rank}, tokenizer)
        dist.barrier()
        # every rank hashes its share of the files
        names = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
        shares = [None] * world
        dist.all_gather_object(shares, {name: _file_record(tmp / name) for name in names[rank::world]})
        if rank == 0:
            files = {name: record for share in shares for name, record in share.items()}
            _write_manifest(tmp, {"format": FORMAT, "layout": LAYOUT_DCP, "step": step, "tokenizer": tokenizer.kind,
                                  "world_size": world, "files": dict(sorted(files.items()))})
    if rank == 0 and keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    dist.barrier()
    return final


# --------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    path: Path
    step: int
    recipe: dict[str, Any]  # the stored recipe, as JSON data
    tokenizer: str  # "byte" or "bpe"
    layout: str = LAYOUT_SINGLE  # or LAYOUT_DCP: saved by several processes (module docstring)

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    def trainer_state(self) -> dict[str, Any]:
        f = self.path / TRAINER_FILE
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load the trainer state in {f}: {_one_line(e)}") from None

    def load_model(self, model: torch.nn.Module) -> None:
        """Copy the stored weights into ``model``, plain or sharded (same architecture: see
        ``model_differences``)."""
        self._load(model, None, None)

    def load_training_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict[str, Any]) -> None:
        """Weights and optimizer state into ``model`` (plain, or sharded with FSDP2 in a
        process group: a collective then) and ``optimizer``, built over it, whatever
        layout and number of processes the checkpoint was saved with. ``trainer_state`` is
        ``self.trainer_state()``."""
        self._load(model, optimizer, trainer_state)

    def _load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              trainer_state: dict[str, Any] | None) -> None:
        """Read the stored state the layout's way, then set it the one way (module docstring)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if self.layout == LAYOUT_DCP:
            where = self.path / DCP_DIR
            unfit = f"cannot load the distributed checkpoint {where}"
            model_state, optim_state = self._read_dcp(model, optimizer, unfit)
        else:
            where = self.path / MODEL_FILE
            unfit = f"the weights in {where} do not fit the model"
            model_state, optim_state = self._read_single(model, optimizer, trainer_state)
        # whole tensors: each process keeps its shard; DCP's are this process's shards already
        options = StateDictOptions(full_state_dict=self.layout == LAYOUT_SINGLE)
        try:
            set_model_state_dict(model, model_state, options=options)
        except Exception as e:  # noqa: BLE001 - torch raises various types
            raise CheckpointError(f"{unfit}: {_state_dict_error(e)}") from None
        if optimizer is None:
            return
        try:
            set_optimizer_state_dict(model, optimizer, optim_state,
                                     options=StateDictOptions(full_state_dict=options.full_state_dict, strict=False))
        except (ValueError, KeyError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"the optimizer state in {self.path} does not fit this model: {e}") from None
        # a parameter that had no optimizer state when saved (it never had a gradient) gets
        # a placeholder from the setter: forget it
        _drop_optimizer_state(model, optimizer, set(optim_state["state"]))

    def _read_single(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                     trainer_state: dict[str, Any] | None) -> tuple[dict, dict | None]:
        """Whole tensors: the weights from ``model.safetensors``, the optimizer state from
        ``trainer.pt``, keyed by parameter name."""
        from safetensors.torch import load_file

        f = self.path / MODEL_FILE
        try:
            model_state = load_file(f)
        except Exception as e:  # noqa: BLE001 - safetensors raises various types
            raise CheckpointError(f"cannot load the weights in {f}: {_one_line(e)}") from None
        missing, unexpected = _names_unmatched(model, set(model_state))
        if missing or unexpected:
            parts = [f"{what} {', '.join(names[:5])}" for what, names in (("missing", missing), ("unexpected", unexpected))
                     if names]
            raise CheckpointError(f"the weights in {f} do not fit the model: {'; '.join(parts)}")
        if optimizer is None:
            return model_state, None
        try:
            return model_state, _optimizer_state_by_name(model, optimizer, trainer_state["optimizer"])
        except (KeyError, IndexError, TypeError) as e:
            raise CheckpointError(f"the optimizer state in {self.path} does not fit this model: {e}") from None

    def _read_dcp(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  unfit: str) -> tuple[dict, dict | None]:
        """The shards of ``dcp/`` that this process's ``model`` (and ``optimizer``) hold,
        re-sharded to the current processes; without a process group, into one process."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
        )

        where = self.path / DCP_DIR
        try:
            stored = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
            if optimizer is None:
                state = {"model": get_model_state_dict(model)}
            else:
                model_state, optim_state = get_state_dict(model, optimizer)
                # only the parameters that had optimizer state when saved
                optim_state["state"] = {name: value for name, value in optim_state["state"].items()
                                        if f"optim.state.{name}.step" in stored}
                state = {"model": model_state, "optim": optim_state}
            single = not (dist.is_available() and dist.is_initialized())
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=where, no_dist=single)
        except Exception as e:  # noqa: BLE001 - DCP wraps what went wrong in various types
            raise CheckpointError(f"{unfit}: {_one_line(e)}") from None
        return state["model"], state.get("optim")


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _names_unmatched(model: torch.nn.Module, stored: set[str]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)``: the model's tensors of which ``stored`` names none, and the
    names in ``stored`` that are none of the model's. A tensor the model holds under
    several names (a head tied to the embedding) is stored under one of them
    (``safetensors.torch.save_model``)."""
    aliases: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(name)
    missing = sorted(names[0] for names in aliases.values() if not stored.intersection(names))
    unexpected = sorted(stored.difference(name for names in aliases.values() for name in names))
    return missing, unexpected


def _optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` keys parameters by their position in the optimizer's
    groups; ``torch.distributed.checkpoint.state_dict`` by their names. ``optimizer`` is
    built the same way as the one that made ``state``, so the positions agree."""
    names = {id(p): name for name, p in model.named_parameters()}
    by_position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {by_position[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [by_position[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _drop_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kept: set[str]) -> None:
    """Forget the state of parameters that had none in the checkpoint."""
    names = {id(p): name for name, p in model.named_parameters()}
    for p in list(optimizer.state):
        if names.get(id(p)) not in kept:
            del optimizer.state[p]


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _state_dict_error(e: BaseException) -> str:
    """``load_state_dict``'s "Error(s) in loading state_dict for X:" and its reasons, on one line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return "; ".join(lines)[:500] if lines else type(e).__name__


def _damaged(file: Path, what: str) -> CheckpointError:
    """An error naming the damaged file, and the previous checkpoint if there is one."""
    msg = f"damaged checkpoint: {what}"
    ckpt = next((p for p in file.parents if _STEP_DIR.match(p.name)), file.parent)
    m = _STEP_DIR.match(ckpt.name)
    older = [p for s, p in list_checkpoints(ckpt.parent) if m and s < int(m.group(1))]
    if older:
        msg += f"; the previous checkpoint is {older[-1]} (--resume {older[-1]})"
    return CheckpointError(msg)


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Open a checkpoint folder (or the newest in a run folder) and check every file
    against the manifest (``verify``: their SHA-256 too, not only their sizes). Raises
    ``CheckpointError`` naming the first bad file."""
    from safetensors import safe_open

    ckpt = resolve_checkpoint(path)
    if ckpt.name.endswith(".tmp"):
        raise CheckpointError(f"{ckpt} is an unfinished checkpoint (a save was interrupted)")
    manifest_path = ckpt / MANIFEST_FILE
    if not manifest_path.is_file():
        raise _damaged(manifest_path, f"{manifest_path} is missing, so {ckpt} is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(manifest_path, f"{manifest_path} is unreadable ({_one_line(e)})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unknown checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    layout = manifest.get("layout", LAYOUT_SINGLE)
    if layout not in (LAYOUT_SINGLE, LAYOUT_DCP):
        raise CheckpointError(f"{manifest_path}: unknown checkpoint layout {layout!r}")
    weights = MODEL_FILE if layout == LAYOUT_SINGLE else f"{DCP_DIR}/.metadata"
    for required in (weights, TRAINER_FILE, RECIPE_FILE):
        if required not in files:
            raise _damaged(manifest_path, f"{manifest_path} does not list {required}")
    for name, info in files.items():
        f = ckpt / name
        if not f.is_file():
            raise _damaged(f, f"{f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            kind = "truncated" if size < info["bytes"] else "has the wrong size"
            raise _damaged(f, f"{f} is {kind} ({size} bytes, expected {info['bytes']})")
        if verify and _sha256(f) != info["sha256"]:
            raise _damaged(f, f"{f} is corrupted (its SHA-256 does not match {manifest_path})")

    if layout == LAYOUT_DCP:
        recipe_file = ckpt / RECIPE_FILE
        try:
            recipe = json.loads(recipe_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise _damaged(recipe_file, f"{recipe_file} is unreadable ({_one_line(e)})") from None
        return Checkpoint(path=ckpt, step=step, recipe=recipe, tokenizer=manifest.get("tokenizer", "byte"),
                          layout=LAYOUT_DCP)

    model_file = ckpt / MODEL_FILE
    try:
        with safe_open(str(model_file), framework="pt") as st:
            meta = st.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise _damaged(model_file, f"{model_file} is not a readable safetensors file ({_one_line(e)})") from None
    try:
        recipe = json.loads(meta["recipe"])
    except (KeyError, ValueError):
        raise _damaged(model_file, f"{model_file} carries no recipe in its metadata") from None
    return Checkpoint(path=ckpt, step=step, recipe=recipe, tokenizer=meta.get("tokenizer", "byte"))


def export_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """Convert a checkpoint of the DCP layout (or the newest in a run folder) into the
    single-file layout, written as ``run_dir/step_NNNNNN`` and returned, optimizer state
    included, so that a single process resumes the export as it would the original.
    Runs in one process, which needs the memory of the whole model and optimizer state."""
    import mmrec
    from mmrec.optim import build_optimizer
    from mmrec.tokenizer import load_tokenizer

    ckpt = load_checkpoint(path)
    if ckpt.layout != LAYOUT_DCP:
        raise CheckpointError(f"{ckpt.path} is already a single-file checkpoint ({MODEL_FILE})")
    recipe = mmrec.recipes.load(ckpt.recipe)
    model = mmrec.build(recipe)
    optimizer = build_optimizer(model, recipe.train)
    state = ckpt.trainer_state()
    ckpt.load_training_state(model, optimizer, state)
    tokenizer = load_tokenizer(ckpt.tokenizer, ckpt.path)
    out = Path(run_dir)
    if (out / _step_dir_name(ckpt.step)).resolve() == ckpt.path.resolve():
        raise CheckpointError(f"the export would replace {ckpt.path} itself: pick another folder")
    return save_training_checkpoint(out, ckpt.step, model, optimizer, recipe, state, tokenizer)


# --------------------------------------------------------------------------- compare


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    if isinstance(d, (list, tuple)):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        if not d:
            out[prefix] = []
        return out
    return {prefix: d}


def model_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "model") -> list[str]:
    """``["model.n_layers: 2 in the checkpoint, 4 now", ...]`` for two model sections
    given as JSON data (``recipe.model.model_dump(mode="json")``)."""
    a, b = _flatten(stored, prefix), _flatten(current, prefix)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append(f"{key}: {json.dumps(va) if va != '<absent>' else va} in the checkpoint, "
                       f"{json.dumps(vb) if vb != '<absent>' else vb} now")
    return out
