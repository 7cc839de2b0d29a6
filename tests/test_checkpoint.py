"""Checkpoints: round trip, atomic saves, crash recovery, checksums, load_model."""

import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minidsv3 import checkpoint
from minidsv3.checkpoint import (
    FILES,
    MANIFEST,
    READY,
    TMP,
    has_checkpoint,
    load_model,
    load_state,
    save_checkpoint,
)
from minidsv3.config import ModelConfig
from minidsv3.data import CharTokenizer
from minidsv3.model import DeepSeekV3

VOCAB = "\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _model(seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(ModelConfig.preset("tiny", vocab_size=len(VOCAB)))
    with torch.no_grad():  # routing biases are part of the checkpoint: make them non-zero
        for i, moe in enumerate(model.moe_layers()):
            moe.gate.e_score_correction_bias.copy_(torch.randn(moe.cfg.n_routed_experts) + i)
    return model


def rewrite(run_dir, name: str, data: bytes) -> None:
    """Change a checkpoint file on purpose: its new SHA-256 goes into the manifest."""
    (run_dir / name).write_bytes(data)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["sha256"][name] = hashlib.sha256(data).hexdigest()
    (run_dir / MANIFEST).write_text(json.dumps(manifest))


def _state(step: int) -> dict:
    return {"step": step, "data_rng": torch.Generator().manual_seed(3).get_state(),
            "args": {"lr": 1e-3, "overrides": ["hidden_size=32"], "text": None}}


def test_round_trip_restores_weights_biases_config_and_tokenizer(tmp_path):
    model, tok = _model(), CharTokenizer(VOCAB)
    save_checkpoint(tmp_path, model, tok, _state(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted((*FILES, MANIFEST))

    loaded, loaded_tok = load_model(tmp_path)
    assert loaded_tok == tok and not loaded.training
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randint(0, len(VOCAB), (2, 10))
    model.eval()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)

    # The files are what the contract says: HF config keys, plain JSON tokenizer, safetensors.
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == tok.to_dict()
    assert "layers.1.mlp.gate.e_score_correction_bias" in load_file(
        tmp_path / "model.safetensors")


def test_state_is_readable_with_weights_only(tmp_path):
    save_checkpoint(tmp_path, _model(), CharTokenizer(VOCAB), _state(7))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 7 and state["args"]["overrides"] == ["hidden_size=32"]
    assert torch.equal(state["data_rng"], _state(7)["data_rng"])
    assert load_state(tmp_path)["step"] == 7


def test_stale_tmp_from_a_crashed_save_is_ignored_and_cleared(tmp_path):
    model, tok = _model(), CharTokenizer(VOCAB)
    save_checkpoint(tmp_path, model, tok, _state(1))
    # A save killed half-way: ckpt.tmp/ holds a truncated model file and nothing else.
    (tmp_path / TMP).mkdir()
    (tmp_path / TMP / "model.safetensors").write_bytes(b"\x00garbage")
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert load_state(tmp_path)["step"] == 1
    save_checkpoint(tmp_path, _model(seed=1), tok, _state(2))  # the next save clears it
    assert not (tmp_path / TMP).exists() and load_state(tmp_path)["step"] == 2


def test_crash_while_moving_files_is_read_forward_and_finished_by_the_next_save(tmp_path):
    """ckpt.ready/ is committed, only some files were moved: loading reads the newer
    checkpoint without moving anything (readers never write); the next save finishes."""
    tok = CharTokenizer(VOCAB)
    old, new = _model(seed=0), _model(seed=1)
    save_checkpoint(tmp_path, old, tok, _state(1))
    staging = tmp_path / "staging"
    save_checkpoint(staging, new, tok, _state(2))
    shutil.copytree(staging, tmp_path / READY)
    shutil.move(tmp_path / READY / "model.safetensors", tmp_path / "model.safetensors")
    # Now model.safetensors is step 2 but state.pt still step 1: the crash point.
    assert has_checkpoint(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, new.lm_head.weight)
    assert load_state(tmp_path)["step"] == 2
    assert (tmp_path / READY).is_dir() and load_state(tmp_path / READY)["step"] == 2
    save_checkpoint(tmp_path, new, tok, _state(3))
    assert not (tmp_path / READY).exists() and load_state(tmp_path)["step"] == 3


@pytest.mark.parametrize("moved", [True, False], ids=["whole save", "commit only"])
def test_a_save_landing_in_the_middle_of_a_read_is_read_again(tmp_path, monkeypatch, moved):
    """The trainer saves while a reader is between the manifest and the weights: the mixed
    set fails the manifest check, and the reader reads again and gets the new one whole."""
    tok = CharTokenizer(VOCAB)
    old, new = _model(seed=0), _model(seed=1)
    save_checkpoint(tmp_path, old, tok, _state(1))
    staging = tmp_path / "staging"
    save_checkpoint(staging, new, tok, _state(2))
    real, raced = checkpoint._read_newest, []

    def racing(run_dir, name):
        if name == "model.safetensors" and not raced:
            raced.append(name)
            if moved:
                save_checkpoint(tmp_path, new, tok, _state(2))
            else:  # stopped right after the commit: the new files are all in ckpt.ready/
                shutil.copytree(staging, tmp_path / READY)
        return real(run_dir, name)

    monkeypatch.setattr(checkpoint, "_read_newest", racing)
    loaded, _ = load_model(tmp_path)
    assert raced and torch.equal(loaded.lm_head.weight, new.lm_head.weight)


def test_non_finite_tensors_are_never_saved(tmp_path):
    model, tok = _model(), CharTokenizer(VOCAB)
    save_checkpoint(tmp_path, model, tok, _state(1))
    with torch.no_grad():
        model.lm_head.weight[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"model.safetensors\['lm_head.weight'\] holds NaN"):
        save_checkpoint(tmp_path, model, tok, _state(2))
    adam = {"state": {0: {"exp_avg_sq": torch.tensor([1.0, math.inf])}}}
    with pytest.raises(ValueError, match=r"state.pt\['optimizer'\]\['state'\]\[0\]"):
        save_checkpoint(tmp_path, _model(), tok, {**_state(2), "optimizer": adam})
    assert load_state(tmp_path)["step"] == 1  # the good checkpoint is still the one on disk
    assert torch.isfinite(load_model(tmp_path)[0].lm_head.weight).all()


def test_a_damaged_manifest_is_named(tmp_path):
    save_checkpoint(tmp_path, _model(), CharTokenizer(VOCAB), _state(1))
    (tmp_path / MANIFEST).write_text('{"step": 1, "sha256": ')
    with pytest.raises(ValueError, match="manifest.json is not a valid checkpoint manifest"):
        load_model(tmp_path)


def test_missing_or_mismatched_checkpoint_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(tmp_path)
    save_checkpoint(tmp_path, _model(), CharTokenizer(VOCAB), _state(1))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"] = 4, 2, 1
    rewrite(tmp_path, "config.json", json.dumps(cfg).encode())
    with pytest.raises(ValueError, match="does not match the model of config.json"):
        load_model(tmp_path)
