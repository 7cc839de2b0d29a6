"""Checkpoints: a run directory that training resumes from and inference loads.

A run directory ``runs/NAME/`` holds the latest checkpoint as five files:

* ``model.safetensors`` -- the model's ``state_dict`` (routing biases included);
* ``config.json``       -- ``ModelConfig.to_hf_dict()``;
* ``tokenizer.json``    -- the tokenizer's ``to_dict()``: ``{"type": "char", ...}`` for
  characters, the ``tokenizers`` library's own file for a byte-level BPE (tokenizer.py);
* ``state.pt``          -- step, optimizer, scheduler, RNG and data-position state,
  only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it;
* ``manifest.json``     -- the step and the SHA-256 of each of the four files above,
  computed from the bytes as they were written. Every load checks them, so a flipped
  or truncated byte is refused with the file's name instead of loading silently.

Writing (only training does it, holding the run's lock, see rundir.py) is atomic as a
whole, not just file by file: the files are written into ``ckpt.tmp/``, which is
renamed to ``ckpt.ready/`` once complete (a rename is atomic: the commit point), and
only then moved into place, the manifest last. A crash while writing leaves a stale
``ckpt.tmp/`` that is ignored; a crash while moving leaves ``ckpt.ready/``, which the
next save finishes moving. No tensor holding NaN or infinity is ever written.

Reading (``load_model``, ``load_state``... in any number of processes, while training
runs) never changes the run directory, so a read-only one can be read too. A reader
takes each file from ``ckpt.ready/`` while that holds it, else from the top, and
accepts the set only if every file matches the manifest read with it; a set caught
half-moved by a concurrent save is simply read again. Run directories written before
manifests existed are still read, unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import ModelConfig
from .model import DeepSeekV3
from .tokenizer import Tokenizer, tokenizer_from_dict

FILES = ("model.safetensors", "config.json", "tokenizer.json", "state.pt")
MANIFEST = "manifest.json"
TMP, READY = "ckpt.tmp", "ckpt.ready"
# A reader whose files changed under it (a save was moving them) reads them again; a
# move takes milliseconds, so this many tries, 10 ms apart, outlast any real one.
READ_ATTEMPTS = 100


class NonFiniteTensor(ValueError):
    """A tensor to be saved holds NaN or infinite values."""


def check_finite(obj: Any, name: str) -> None:
    """Raise NonFiniteTensor naming the first floating-point tensor in ``obj`` (a tensor,
    or dicts and lists of them, as in a state_dict) that holds a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not torch.isfinite(obj).all():
            raise NonFiniteTensor(f"{name} holds NaN or infinite values")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            check_finite(value, f"{name}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_finite(value, f"{name}[{i}]")


# ---------------------------------------------------------------- writing (training only)

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def save_checkpoint(run_dir: str | Path, model: DeepSeekV3, tokenizer: Tokenizer,
                    state: dict[str, Any], weights: dict[str, torch.Tensor] | None = None
                    ) -> None:
    """Write the model, its config and tokenizer, the training ``state`` and their manifest
    atomically. Raises NonFiniteTensor, writing nothing, if any tensor is NaN or infinite:
    a diverged model must never replace the last good checkpoint.

    ``weights`` (default ``model.state_dict()``) is the full state of a sharded model,
    gathered by ``sharding.full_state``.
    """
    run_dir = Path(run_dir)
    weights = model.state_dict() if weights is None else weights
    # safetensors refuses tensors that share memory; clone + contiguous gives each its own.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    check_finite(tensors, "model.safetensors")
    check_finite(state, "state.pt")
    state_bytes = io.BytesIO()
    torch.save(state, state_bytes)
    step = state.get("step", 0)
    blobs = {"model.safetensors": save_safetensors(tensors, metadata={"step": str(step)}),
             "config.json": _json_bytes(model.cfg.to_hf_dict()),
             "tokenizer.json": _json_bytes(tokenizer.to_dict()),
             "state.pt": state_bytes.getvalue()}
    blobs[MANIFEST] = _json_bytes({"step": step,
                                   "sha256": {name: _sha256(b) for name, b in blobs.items()}})
    tmp = run_dir / TMP
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crash
    tmp.mkdir(parents=True)
    for name, data in blobs.items():
        _write(tmp / name, data)
    _fsync_dir(tmp)
    _move_into_place(run_dir)  # an earlier save that crashed while moving goes first
    os.replace(tmp, run_dir / READY)  # the commit point: from here on this checkpoint wins
    _fsync_dir(run_dir)
    _move_into_place(run_dir)


def _move_into_place(run_dir: Path) -> None:
    """Move a committed ``ckpt.ready/`` to the top of the run directory (the writer only).

    The manifest goes last, so top-level files change only while ``ckpt.ready/`` exists
    and before the manifest does: what ``read_files`` relies on to tell a save in
    progress from a corrupt file. Files already moved before a crash are skipped.
    """
    ready = run_dir / READY
    if ready.is_dir():
        for name in (*FILES, MANIFEST):
            if (ready / name).exists():
                os.replace(ready / name, run_dir / name)
        _fsync_dir(run_dir)
        shutil.rmtree(ready)


# ---------------------------------------------------------------- reading (never writes)

def has_checkpoint(run_dir: str | Path) -> bool:
    """True if ``run_dir`` holds a committed checkpoint (it is verified only when read)."""
    run_dir = Path(run_dir)
    return all((run_dir / READY / n).is_file() or (run_dir / n).is_file() for n in FILES)


def _read_newest(run_dir: Path, name: str) -> bytes | None:
    """``name`` of the newest committed checkpoint: from ``ckpt.ready/`` while it holds it."""
    for folder in (run_dir / READY, run_dir):
        try:
            return (folder / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def _problem(run_dir: Path, manifest: bytes | None, blobs: dict[str, bytes | None]
             ) -> Exception | None:
    """Why ``blobs`` are not one verified checkpoint, or None if they are."""
    missing = [name for name, data in blobs.items() if data is None]
    if missing:
        return FileNotFoundError(
            f"{run_dir} holds no complete checkpoint (missing {', '.join(missing)}); train "
            f"one with `python -m minidsv3.train --out {run_dir}`")
    if manifest is None:
        return None  # written before manifests existed: read unverified
    try:
        recorded = json.loads(manifest)["sha256"]
        bad = [name for name, data in blobs.items() if recorded[name] != _sha256(data)]
    except (ValueError, KeyError, TypeError):
        return ValueError(f"{run_dir / MANIFEST} is not a valid checkpoint manifest, so the "
                          "checkpoint cannot be verified; restore the run directory from a "
                          "copy or train again into a new --out")
    if bad:
        return ValueError(
            f"{run_dir / bad[0]} does not match the SHA-256 recorded in {MANIFEST} when the "
            "checkpoint was saved: it is truncated, corrupt or was modified. Restore the run "
            "directory from a copy, or train again into a new --out")
    return None


def read_files(run_dir: str | Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of ``names``, all from one committed checkpoint and checked against its
    manifest. Reads only: safe while training writes the same run directory.

    Top-level files change only while ``ckpt.ready/`` exists, manifest last. So if
    ``ckpt.ready/`` was absent before and after reading and the manifest did not change,
    no save touched the files, and a mismatch means a damaged file. Otherwise a save may
    have been moving them, and we read again.
    """
    run_dir = Path(run_dir)
    for _ in range(READ_ATTEMPTS):
        moving = (run_dir / READY).exists()
        manifest = _read_newest(run_dir, MANIFEST)
        blobs = {name: _read_newest(run_dir, name) for name in names}
        moving = (moving or (run_dir / READY).exists()
                  or _read_newest(run_dir, MANIFEST) != manifest)
        problem = _problem(run_dir, manifest, blobs)
        if problem is None:
            return blobs
        if not moving:
            break
        time.sleep(0.01)
    raise problem


def _json_object(data: bytes) -> dict[str, Any]:
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got a {type(obj).__name__}")
    return obj


# How each file becomes an object, and the errors that mean "this file is damaged".
PARSERS: dict[str, Callable[[bytes], Any]] = {
    "model.safetensors": load_safetensors,
    "config.json": lambda data: ModelConfig.from_dict(_json_object(data)),
    "tokenizer.json": lambda data: tokenizer_from_dict(_json_object(data)),
    "state.pt": lambda data: torch.load(io.BytesIO(data), map_location="cpu",
                                        weights_only=True),
}
PARSE_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, EOFError,
                pickle.UnpicklingError, SafetensorError)


def _parse(run_dir: Path, name: str, data: bytes) -> Any:
    try:
        return PARSERS[name](data)
    except PARSE_ERRORS as err:
        why = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"{run_dir / name} cannot be read: {why}") from None


def _load(run_dir: str | Path, name: str) -> Any:
    run_dir = Path(run_dir)
    return _parse(run_dir, name, read_files(run_dir, (name,))[name])


def _copy_weights(model: DeepSeekV3, run_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(tensors)) + [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise ValueError(f"{run_dir / 'model.safetensors'} does not match the model of "
                         f"config.json: {', '.join(problems[:5])}")
    model.load_state_dict(tensors)


def load_weights(model: DeepSeekV3, run_dir: str | Path) -> None:
    """Copy the checkpoint's tensors into ``model``; every key and shape must match."""
    _copy_weights(model, Path(run_dir), _load(run_dir, "model.safetensors"))


def load_config(run_dir: str | Path) -> ModelConfig:
    return _load(run_dir, "config.json")


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """The training state of the latest checkpoint (plain tensors and values only)."""
    return _load(run_dir, "state.pt")


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    return _load(run_dir, "tokenizer.json")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[DeepSeekV3, Tokenizer]:
    """The trained model (in eval mode, on ``device``) and its tokenizer, for inference."""
    run_dir = Path(run_dir)
    blobs = read_files(run_dir, ("config.json", "tokenizer.json", "model.safetensors"))
    parsed = {name: _parse(run_dir, name, data) for name, data in blobs.items()}
    model = DeepSeekV3(parsed["config.json"])
    _copy_weights(model, run_dir, parsed["model.safetensors"])
    return model.to(device).eval(), parsed["tokenizer.json"]
