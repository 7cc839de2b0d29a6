"""Checkpoints: a run directory that training resumes from and inference loads.

A run directory ``runs/NAME/`` holds the latest checkpoint as four files:

* ``model.safetensors`` -- the model's ``state_dict`` (routing biases included);
* ``config.json``       -- ``ModelConfig.to_hf_dict()``;
* ``tokenizer.json``    -- ``CharTokenizer.to_dict()``;
* ``state.pt``          -- step, optimizer, scheduler, RNG and data-position state,
  only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it.

Saving is atomic as a whole, not just file by file: the four files are written into
``ckpt.tmp/``, which is renamed to ``ckpt.ready/`` once complete (a rename is
atomic), and only then moved into place. A crash while writing leaves a stale
``ckpt.tmp/`` that is ignored; a crash while moving leaves ``ckpt.ready/``, which
the next load finishes moving. Either way the run directory never mixes the
weights of one step with the optimizer state of another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .data import CharTokenizer
from .model import DeepSeekV3

FILES = ("model.safetensors", "config.json", "tokenizer.json", "state.pt")
TMP, READY = "ckpt.tmp", "ckpt.ready"


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


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, model: DeepSeekV3, tokenizer: CharTokenizer,
                    state: dict[str, Any]) -> None:
    """Write the model, its config and tokenizer, and the training ``state`` atomically."""
    run_dir = Path(run_dir)
    tmp, ready = run_dir / TMP, run_dir / READY
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crash
    tmp.mkdir(parents=True)
    # safetensors refuses tensors that share memory; clone + contiguous gives each its own.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, tmp / "model.safetensors", metadata={"step": str(state.get("step", 0))})
    _write_json(tmp / "config.json", model.cfg.to_hf_dict())
    _write_json(tmp / "tokenizer.json", tokenizer.to_dict())
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(ready, ignore_errors=True)  # only possible if recover() was never called
    os.replace(tmp, ready)  # the commit point: from here on this checkpoint wins
    _fsync_dir(run_dir)
    recover(run_dir)


def recover(run_dir: str | Path) -> None:
    """Finish an interrupted save by moving a complete ``ckpt.ready/`` into place.

    A stale ``ckpt.tmp/`` is left alone: it may belong to a save in progress, and the
    next ``save_checkpoint`` clears it.
    """
    run_dir = Path(run_dir)
    ready = run_dir / READY
    if ready.is_dir():
        for name in FILES:
            if (ready / name).exists():  # already moved before the crash otherwise
                os.replace(ready / name, run_dir / name)
        _fsync_dir(run_dir)
        shutil.rmtree(ready)


def has_checkpoint(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / READY).is_dir() or all((run_dir / n).is_file() for n in FILES)


def _require(run_dir: Path) -> None:
    recover(run_dir)
    missing = [n for n in FILES if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} holds no complete checkpoint (missing {', '.join(missing)}); "
            "train one with `python -m minidsv3.train --out " + str(run_dir) + "`")


def load_weights(model: DeepSeekV3, run_dir: str | Path) -> None:
    """Copy the checkpoint's tensors into ``model``; every key must match."""
    run_dir = Path(run_dir)
    _require(run_dir)
    tensors = load_file(run_dir / "model.safetensors")
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(tensors)) + [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise ValueError(f"{run_dir / 'model.safetensors'} does not match the model of "
                         f"config.json: {', '.join(problems[:5])}")
    model.load_state_dict(tensors)


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """The training state of the latest checkpoint (plain tensors and values only)."""
    run_dir = Path(run_dir)
    _require(run_dir)
    return torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True)


def load_tokenizer(run_dir: str | Path) -> CharTokenizer:
    run_dir = Path(run_dir)
    _require(run_dir)
    return CharTokenizer.from_dict(json.loads((run_dir / "tokenizer.json").read_text("utf-8")))


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[DeepSeekV3, CharTokenizer]:
    """The trained model (in eval mode, on ``device``) and its tokenizer, for inference."""
    run_dir = Path(run_dir)
    _require(run_dir)
    model = DeepSeekV3(ModelConfig.from_json(run_dir / "config.json"))
    load_weights(model, run_dir)
    return model.to(device).eval(), load_tokenizer(run_dir)
