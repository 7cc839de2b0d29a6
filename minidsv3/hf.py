"""The DeepSeek-V3 checkpoint format: ``config.json`` + safetensors, FP8 included.

This is the layout of the official release and of HF transformers; DeepSeek-V2 and
V2-Lite checkpoints (``model_type: deepseek_v2``) use the same key names, less the
routing bias and the MTP layers, and load through the same code. Our module
names already follow it; the differences are a ``model.`` prefix and the MTP
modules, which the checkpoint stores as extra decoder layers after the main ones:

    ours                         checkpoint (L = num_hidden_layers)
    embed_tokens / layers.i / norm   model.embed_tokens / model.layers.i / model.norm
    lm_head                      lm_head
    mtp.k.{enorm,hnorm,eh_proj}  model.layers.{L+k}.{enorm,hnorm,eh_proj}
    mtp.k.norm                   model.layers.{L+k}.shared_head.norm
    mtp.k.block.X                model.layers.{L+k}.X
    (shared with the main model) model.layers.{L+k}.embed_tokens, .shared_head.head

The release stores most matrices as float8_e4m3fn with one ``weight_scale_inv``
per 128x128 block (w = q * scale_inv); ``load_pretrained`` dequantises them. It
builds the model on the meta device and materialises one tensor at a time, so the
same code path loads the 671B release on a machine with enough memory, and
``device="meta"`` checks a checkpoint against its config without reading any data.
Only safetensors are read: pickled ``.bin`` files can run code when opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ARCHITECTURES, ModelConfig
from .model import DeepSeekV3

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
SCALE_SUFFIX = "_scale_inv"  # "X.weight" is dequantised with "X.weight_scale_inv"
KEEP_FP32 = "e_score_correction_bias"  # the routing bias stays float32, as in the release


# ---------------------------------------------------------------- key names

def hf_name(name: str, num_hidden_layers: int) -> str:
    """Checkpoint key of one of our ``state_dict`` names."""
    if name == "lm_head.weight":
        return name
    if name.startswith("mtp."):
        _, k, rest = name.split(".", 2)
        layer = f"model.layers.{num_hidden_layers + int(k)}"
        if rest.startswith("block."):
            return f"{layer}.{rest.removeprefix('block.')}"
        if rest.startswith("norm."):
            return f"{layer}.shared_head.{rest}"
        return f"{layer}.{rest}"  # enorm, hnorm, eh_proj
    return f"model.{name}"


def key_map(model: DeepSeekV3, names: Iterable[str] | None = None) -> dict[str, str]:
    """Every checkpoint key -> the ``state_dict`` name it holds (MTP copies included).

    ``names`` defaults to ``model.state_dict()``'s (a sharded model passes its full ones).
    """
    L = model.cfg.num_hidden_layers
    keys = {hf_name(name, L): name for name in (model.state_dict() if names is None else names)}
    for k in range(len(model.mtp)):  # the release repeats the shared tensors per MTP layer
        keys[f"model.layers.{L + k}.embed_tokens.weight"] = "embed_tokens.weight"
        keys[f"model.layers.{L + k}.shared_head.head.weight"] = "lm_head.weight"
    return keys


# ---------------------------------------------------------------- saving

def save_pretrained(model: DeepSeekV3, save_dir: str | Path, max_shard_size: int = 5 * 10**9,
                    dtype: torch.dtype | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` and the weights in the checkpoint layout.

    Past ``max_shard_size`` bytes the weights are split into
    ``model-0000i-of-0000n.safetensors`` files listed in ``model.safetensors.index.json``.
    ``dtype`` (e.g. ``torch.bfloat16``) casts floating tensors, the routing bias excepted.
    A model sharded over processes passes its full ``state``, gathered on rank 0 by
    ``sharding.full_model_state``, and rank 0 writes it.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state

    def prepared(name: str) -> torch.Tensor:
        t = state[name].detach()
        if dtype is not None and t.is_floating_point() and not name.endswith(KEEP_FP32):
            t = t.to(dtype)
        return t.cpu().contiguous().clone()  # own memory: safetensors refuses shared storage

    keys = key_map(model, state)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, name in keys.items():
        size = prepared_size(state[name], name, dtype)
        if shards[-1] and shard_bytes + size > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += size

    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, shard in zip(names, shards):
        _atomic(save_dir / file, lambda p, s=shard: save_file(
            {k: prepared(keys[k]) for k in s}, p, metadata={"format": "pt"}))
    # Remove what an earlier save in this directory left that would now mislead a loader.
    stale = [p for p in save_dir.iterdir() if p.name not in names
             and (p.name in (SINGLE_FILE, INDEX_FILE) or SHARD_PATTERN.fullmatch(p.name))]
    for p in stale:
        p.unlink()
    if len(shards) > 1:
        total = sum(prepared_size(state[n], n, dtype) for n in keys.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        _atomic_text(save_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    config = model.cfg.to_hf_dict()
    config["torch_dtype"] = str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch.")
    _atomic_text(save_dir / "config.json", json.dumps(config, indent=2) + "\n")


def prepared_size(t: torch.Tensor, name: str, dtype: torch.dtype | None) -> int:
    """Bytes a tensor takes in the file after the optional cast."""
    cast = dtype is not None and t.is_floating_point() and not name.endswith(KEEP_FP32)
    return t.numel() * (dtype.itemsize if cast else t.element_size())


def _atomic(path: Path, write) -> None:
    """Write through a temporary file and rename it: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    _atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- loading

def read_config(path: Path) -> tuple[ModelConfig, tuple[int, int]]:
    """ModelConfig of a checkpoint directory and its FP8 block size (rows, cols)."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a checkpoint directory needs config.json")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file} must hold a JSON object {{...}} of config fields; it holds "
                         f"{json.dumps(d)[:60]}")
    model_type = d.get("model_type")
    architecture = ARCHITECTURES.get(model_type)
    architectures = d.get("architectures") or [architecture]
    if architecture is None or architecture not in architectures:
        raise ValueError(
            f"{file}: model_type={model_type!r}, architectures={architectures}: not a DeepSeek-V3 "
            f"or V2 checkpoint (expected one of {ARCHITECTURES})"
        )
    # The release ships quantization_config = {quant_method: fp8, fmt: e4m3, weight_block_size:
    # [128, 128], activation_scheme: dynamic}. Only the block size matters here: FP8 weights
    # are dequantised to ``dtype`` on load, and activations are never quantised.
    quant = d.pop("quantization_config", None) or {}
    if not isinstance(quant, dict):
        raise ValueError(f"{file}: quantization_config={quant!r} must be a JSON object")
    if quant and quant.get("quant_method") != "fp8":
        raise ValueError(f"{file}: quantization_config.quant_method="
                         f"{quant.get('quant_method')!r} is not supported (only 'fp8')")
    block = _block_size(file, quant.get("weight_block_size", [128, 128]))
    try:
        return ModelConfig.from_dict(d), block
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def _block_size(file: Path, block) -> tuple[int, int]:
    """quantization_config.weight_block_size: the (rows, cols) of the block one scale covers."""
    if not (isinstance(block, list) and len(block) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):
        raise ValueError(f"{file}: quantization_config.weight_block_size={block!r} must be two "
                         "positive integers [rows, cols] (the release has [128, 128])")
    return tuple(block)


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads hook: a repeated key would silently keep only its last value."""
    d: dict[str, object] = {}
    for key, value in pairs:
        if key in d:
            raise ValueError(f"{key} is listed twice, in {d[key]!r} and {value!r}")
        d[key] = value
    return d


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: from the index if there is one.

    Index entries must be plain file names, so a checkpoint reads only its own directory.
    (A plain name may still be a symlink: the HF cache links every file into its blobs/.)
    """
    index = path / INDEX_FILE
    if index.is_file():
        try:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            content = json.loads(index.read_text(encoding="utf-8"),
                                 object_pairs_hook=_refuse_repeated_keys)
        except ValueError as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f'{index}: needs a "weight_map" object of tensor key -> file name')
        for key, name in weight_map.items():
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise ValueError(f"{index}: {key} -> {name!r} is not a plain file name in "
                                 f"{path}; a checkpoint may only read its own directory")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt*"))
        hint = (f" ({', '.join(pickles)} are pickle files, which can run code when loaded; "
                "minidsv3 reads safetensors only)") if pickles else ""
        raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {missing}")
    return files


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """w = q * scale_inv per block: q (R, C) float8_e4m3fn -> float32 (R, C).

    scale_inv has ceil(R/128) x ceil(C/128) entries; edge blocks are smaller than 128.
    """
    R, C = weight.shape
    expected = (math.ceil(R / block[0]), math.ceil(C / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                         f"{(R, C)} in {block[0]}x{block[1]} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * scale[:R, :C]  # (R, C): crop the padding of the edge blocks


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> DeepSeekV3:
    """A ``DeepSeekV3`` in eval mode from a checkpoint directory (config.json + safetensors).

    Every key and shape is checked against the config before any weight is read, so
    a mismatch raises ``ValueError`` and nothing is half-loaded.
    """
    path, device = Path(path), torch.device(device)
    cfg, block = read_config(path)
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)  # shapes only: no memory, no random init
    expected = {name: t.shape for name, t in model.state_dict().items()}
    keys = key_map(model)

    with ExitStack() as stack:
        header: dict[str, tuple] = {}  # key -> (open file, shape, dtype name)
        source: dict[str, Path] = {}  # key -> the file that holds it
        for file in files:
            try:
                f = stack.enter_context(safe_open(file, framework="pt"))
                for k in f.keys():
                    if k in source:
                        raise ValueError(f"{k} is stored in both {source[k]} and {file}; a "
                                         "checkpoint holds each tensor once")
                    s = f.get_slice(k)
                    header[k], source[k] = (f, tuple(s.get_shape()), s.get_dtype()), file
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be "
                                 "truncated or corrupt: download or save it again") from None
        _check_keys(header, keys, expected, block)
        state: dict[str, torch.Tensor] = {}
        for key, name in keys.items():
            f, shape, _ = header[key]
            if device.type == "meta":
                t = torch.empty(shape, device="meta")
            else:
                t = _finite(key, f.get_tensor(key), source)
                if t.dtype == torch.float8_e4m3fn:
                    scale_key = key + SCALE_SUFFIX
                    scale = _finite(scale_key, header[scale_key][0].get_tensor(scale_key), source)
                    t = _finite(key, dequantize_fp8(t, scale, block), source)
            t = t.to(device, torch.float32 if name.endswith(KEEP_FP32) else dtype)
            if name in state:  # an MTP layer's copy of the embedding or head
                if not t.is_meta and not torch.equal(state[name], t):
                    raise ValueError(f"{key} differs from the main model's {hf_name(name, 0)}; "
                                     "minidsv3 shares them, as DeepSeek-V3 does")
                continue
            state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers derived from the config are not in the checkpoint: build them for real.
    model.rope.to_empty(device=device)  # RopeTable recomputes its table there
    for moe in model.moe_layers():
        moe.expert_load = torch.zeros_like(moe.expert_load, device=device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta != (device.type == "meta")]
    if left:
        raise RuntimeError(f"load_pretrained left tensors on the wrong device: {left}")
    return model.eval()


def _finite(key: str, t: torch.Tensor, source: dict[str, Path]) -> torch.Tensor:
    """Refuse a tensor with NaN or inf: one such weight (or FP8 scale) makes every logit NaN."""
    if t.dtype == torch.float8_e4m3fn:
        return t  # checked once dequantised (float32), where its scale is applied
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{key}: {bad} non-finite value(s) (NaN or inf) in {source[key]}; the "
                         "file is corrupt: download or save it again")
    return t


def _check_keys(header: dict[str, tuple], keys: dict[str, str],
                expected: dict[str, torch.Size], block: tuple[int, int]) -> None:
    """Refuse missing, unexpected or misshapen tensors, listing every one of them."""
    scales = {k for k in header if k.endswith(SCALE_SUFFIX)}
    missing = sorted(set(keys) - set(header))
    unexpected = sorted(set(header) - set(keys) - scales)
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for scale in sorted(scales):
        if scale.removesuffix(SCALE_SUFFIX) not in keys:
            problems.append(f"{scale} scales no known weight")
    for key in sorted(set(keys) & set(header)):
        _, shape, dtype = header[key]
        want = tuple(expected[keys[key]])
        if shape != want:
            problems.append(f"{key}: checkpoint shape {shape} != model shape {want}")
        elif dtype == "F8_E4M3":
            scale = header.get(key + SCALE_SUFFIX)
            grid = tuple(math.ceil(n / b) for n, b in zip(shape, block))
            if len(shape) != 2 or scale is None or scale[1] != grid:
                got = None if scale is None else scale[1]
                problems.append(f"{key}: FP8 weight needs {key}{SCALE_SUFFIX} of shape {grid} "
                                f"({block[0]}x{block[1]} blocks); got {got}")
        elif dtype not in ("F32", "F16", "BF16"):
            problems.append(f"{key}: unsupported dtype {dtype}")
    if problems:
        raise ValueError("checkpoint does not match config.json:\n  " + "\n  ".join(problems))
