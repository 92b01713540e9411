"""Training checkpoints: one folder per step, written under a temporary name and renamed.

``<run>/step_000100/`` holds

- ``model.safetensors``: the weights, with the recipe JSON, the step and the tokenizer
  kind as metadata (``safetensors.safe_open(...).metadata()``);
- ``trainer.pt``: optimizer, scheduler, RNG states and data position;
- ``recipe.json``: the same recipe, readable;
- ``tokenizer.json``: the BPE tokenizer, when one was trained;
- ``manifest.json``: size and SHA-256 of each file above, written last.

The folder is first written as ``step_000100.tmp``, every file and the folder fsynced,
then renamed with ``os.replace``; a folder without the ``.tmp`` suffix is therefore
complete. Loading checks the manifest before reading anything, so a truncated or
damaged file is reported by name instead of surfacing as a cryptic library error.
``save_checkpoint`` refuses weights that are not finite (a run that diverged has nothing
to save; the trainer checks the sharded weights of a distributed run after every update).

A run of several processes (``torchrun``, FSDP2: see ``mmrec.distributed``) saves with
``save_distributed_checkpoint`` instead: the same folder, ``.tmp`` and rename (by rank 0,
after every rank has written), manifest (``"layout": "dcp"``), ``recipe.json`` and
tokenizer, but the weights and the optimizer state are one ``torch.distributed.checkpoint``
(DCP) checkpoint in ``dcp/`` (``.metadata`` and a ``__<rank>_0.distcp`` file per rank),
made from ``torch.distributed.checkpoint.state_dict.get_state_dict``; ``trainer.pt`` then
holds the rest (scheduler, the RNG states of every rank, data position). DCP re-shards
on load, so such a checkpoint resumes on any number of processes, a single one included
(``Checkpoint.load_training_state``), and ``Checkpoint.load_model`` reads its weights
into a plain model (``python -m mmrec.recipes.generate`` works on it as it is).
``export_checkpoint`` turns it into the single-file layout above (``python -m
mmrec.recipes.train --export CHECKPOINT``), optimizer state included, for tools that want
one ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    """Delete ``step_*.tmp`` folders that a crash during a save left behind."""
    for p in Path(run_dir).glob("step_*.tmp"):
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _start(run_dir: Path, step: int) -> tuple[Path, Path]:
    """``(final, tmp)`` folders for ``step``; ``tmp`` created empty."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / _step_dir_name(step)
    tmp = run_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return final, tmp


def _file_record(f: Path) -> dict[str, Any]:
    _fsync_file(f)
    return {"bytes": f.stat().st_size, "sha256": _sha256(f)}


def _finish(run_dir: Path, final: Path, tmp: Path, manifest: dict[str, Any], keep_last: int | None) -> None:
    """Write the manifest into ``tmp``, fsync, rename ``tmp`` to ``final``, prune."""
    with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    for folder in {tmp, *(p.parent for p in tmp.rglob("*"))}:
        _fsync_dir(folder)

    if final.exists():  # saving the same step again: move the old one aside first
        old = run_dir / (final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(run_dir)

    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)


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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    recipe,
    trainer_state: dict[str, Any],
    tokenizer,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/step_NNNNNN`` atomically and return it. ``recipe`` is the pydantic
    recipe; ``tokenizer`` anything with ``kind`` and ``save(dir)``; ``keep_last`` prunes
    older checkpoints after the new one is in place."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    if not bool(weights_finite(model)):
        raise CheckpointError(f"refusing to save step {step} under {run_dir}: the weights "
                              f"{name_some(non_finite_parameters(model))} are not finite")
    final, tmp = _start(run_dir, step)
    metadata = {
        "format": FORMAT,
        "recipe": recipe.model_dump_json(),
        "step": str(step),
        "tokenizer": tokenizer.kind,
    }
    try:
        save_model(model, str(tmp / MODEL_FILE), metadata=metadata)
        _write_common(tmp, recipe, trainer_state, tokenizer)
        files = {f.name: _file_record(f) for f in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "step": step, "tokenizer": tokenizer.kind, "files": files}
    except BaseException:  # a failed save leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _finish(run_dir, final, tmp, manifest, keep_last)
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
    """The distributed layout (module docstring) of a sharded ``model`` and its
    ``optimizer``: a collective, every rank calls it with the same arguments (only rank
    0's ``trainer_state`` is written). Returns the final folder on every rank, once it is
    in place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    final = run_dir / _step_dir_name(step)
    tmp = run_dir / (final.name + ".tmp")
    model_state, optim_state = get_state_dict(model, optimizer)
    if rank == 0:
        _start(run_dir, step)
    dist.barrier()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / DCP_DIR)
    if rank == 0:
        _write_common(tmp, recipe, trainer_state, tokenizer)
    dist.barrier()
    # every rank fsyncs and hashes its share of the files
    names = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
    mine = {name: _file_record(tmp / name) for name in names[rank::world]}
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    if rank == 0:
        files = {name: record for share in shares for name, record in share.items()}
        manifest = {"format": FORMAT, "layout": LAYOUT_DCP, "step": step, "tokenizer": tokenizer.kind,
                    "world_size": world, "files": dict(sorted(files.items()))}
        _finish(run_dir, final, tmp, manifest, keep_last)
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

    def load_model(self, model: torch.nn.Module) -> None:
        """Copy the stored weights into ``model`` (same architecture: see ``model_differences``),
        a plain one or, for a checkpoint of the distributed layout, a sharded one."""
        if self.layout == LAYOUT_DCP:
            self._load_dcp(model, None)
            return
        from safetensors.torch import load_model

        f = self.path / MODEL_FILE
        try:
            missing, unexpected = load_model(model, str(f), strict=False)
        except Exception as e:  # noqa: BLE001 - safetensors and torch raise various types
            raise CheckpointError(f"cannot load the weights in {f}: {_one_line(e)}") from None
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(sorted(missing)[:5])}")
            if unexpected:
                parts.append(f"unexpected {', '.join(sorted(unexpected)[:5])}")
            raise CheckpointError(f"the weights in {f} do not fit the model: {'; '.join(parts)}")

    def trainer_state(self) -> dict[str, Any]:
        f = self.path / TRAINER_FILE
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load the trainer state in {f}: {_one_line(e)}") from None

    def load_training_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict[str, Any]) -> None:
        """Weights and optimizer state into ``model`` (plain, or sharded with FSDP2 in a
        process group: a collective then) and ``optimizer``, built over it, whatever
        layout and number of processes the checkpoint was saved with. ``trainer_state`` is
        ``self.trainer_state()``."""
        if self.layout == LAYOUT_DCP:
            self._load_dcp(model, optimizer)
            return
        if not _is_sharded(model):
            self.load_model(model)
            try:
                optimizer.load_state_dict(trainer_state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise self._unfit_optimizer(e) from None
            return
        # a single-process checkpoint, resumed by several processes: full states, each rank
        # keeping its shards (every rank reads the files)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        f = self.path / MODEL_FILE
        try:
            set_model_state_dict(model, load_file(f), options=StateDictOptions(full_state_dict=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot load the weights in {f}: {_one_line(e)}") from None
        try:
            state = _optimizer_state_by_name(model, optimizer, trainer_state["optimizer"])
            kept = set(state["state"])
            set_optimizer_state_dict(model, optimizer, state,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        except (ValueError, KeyError, RuntimeError, IndexError) as e:
            raise self._unfit_optimizer(e) from None
        _drop_optimizer_state(model, optimizer, kept)

    def _unfit_optimizer(self, e: BaseException) -> CheckpointError:
        return CheckpointError(f"the optimizer state in {self.path} does not fit this model: {e}")

    def _load_dcp(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Read ``dcp/`` into ``model`` (and ``optimizer``), re-sharding to the current
        processes; without a process group, into one process."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        where = self.path / DCP_DIR
        try:
            stored = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
            if optimizer is None:
                state = {"model": get_model_state_dict(model)}
            else:
                model_state, optim_state = get_state_dict(model, optimizer)
                # only the parameters that had optimizer state when saved (a parameter that
                # never had a gradient has none, and gets none here either)
                optim_state["state"] = {name: value for name, value in optim_state["state"].items()
                                        if f"optim.state.{name}.step" in stored}
                state = {"model": model_state, "optim": optim_state}
            single = not (dist.is_available() and dist.is_initialized())
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=where, no_dist=single)
            set_model_state_dict(model, state["model"])
            if optimizer is not None:
                set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
                _drop_optimizer_state(model, optimizer, set(state["optim"]["state"]))
        except Exception as e:  # noqa: BLE001 - DCP wraps what went wrong in various types
            raise CheckpointError(f"cannot load the distributed checkpoint {where}: {_one_line(e)}") from None


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


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
    """Forget the state of parameters that had none in the checkpoint (loading fills in a
    placeholder for them)."""
    names = {id(p): name for name, p in model.named_parameters()}
    for p in list(optimizer.state):
        if names.get(id(p)) not in kept:
            del optimizer.state[p]


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


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
    against the manifest. Raises ``CheckpointError`` naming the first bad file."""
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
    """Convert a checkpoint of the distributed layout (or the newest in a run folder) into
    the single-file layout, written as ``run_dir/step_NNNNNN`` and returned: the weights
    as ``model.safetensors`` with the recipe metadata, and a ``trainer.pt`` with the
    optimizer state, so that a single process resumes the export as it would the original.
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
    state["optimizer"] = optimizer.state_dict()
    tokenizer = load_tokenizer(ckpt.tokenizer, ckpt.path)
    out = Path(run_dir)
    if (out / _step_dir_name(ckpt.step)).resolve() == ckpt.path.resolve():
        raise CheckpointError(f"the export would replace {ckpt.path} itself: pick another folder")
    return save_checkpoint(out, ckpt.step, model, recipe, state, tokenizer)


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
