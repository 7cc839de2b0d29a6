"""Run directories under faults: readers never write, one trainer at a time, checksums,
torn records, interrupted saves, bad options and bad files give clear messages."""

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minidsv3 import checkpoint, rundir, sample, train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text file, data dir): a short generated dialogue, long enough for --seq-len 16."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [f"ROMEO.\nThe {i % 7} stars of night are fair, {i % 5} lords.\n" for i in range(80)]
    (folder / "night.txt").write_text("".join(lines), encoding="utf-8")
    return folder / "night.txt", folder / "data"


def argv(corpus, out, *extra):
    text, data_dir = corpus
    return ["--preset", "tiny", "--text", str(text), "--data-dir", str(data_dir),
            "--out", str(out), "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16",
            "--eval-every", "100", "--eval-batches", "1", "--log-every", "1",
            "--ckpt-every", "2", "--sample-chars", "5", "--warmup", "2", *extra]


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished tiny run (trained once); tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(argv(corpus, out)) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def snapshot(folder):
    """Every path below ``folder`` with its size, modification time and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(folder).rglob("*"))}


# ---------------------------------------------------------------- readers never write

def test_readers_never_change_the_run_directory(run, monkeypatch):
    """A committed ckpt.ready/ (a save stopped before moving it into place) is read as is,
    and reading works where nothing may be written (a read-only run directory)."""
    newer = run.parent / "newer"
    model, tokenizer = checkpoint.load_model(run)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    state = checkpoint.load_state(run)
    checkpoint.save_checkpoint(newer, model, tokenizer, {**state, "step": STEPS + 1})
    # The run as a crash between the commit and the first move leaves it.
    shutil.copytree(newer, run / checkpoint.READY)
    before = snapshot(run)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system", str(args[0]))

    with monkeypatch.context() as m:  # any attempt to write, move or delete fails
        for module, name in ((os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"),
                             (os, "mkdir"), (shutil, "rmtree"), (shutil, "move")):
            m.setattr(module, name, read_only)
        loaded, _ = checkpoint.load_model(run)
        assert sample.main(["--run", str(run), "--tokens", "3", "--seed", "0"]) == 0
        assert checkpoint.load_state(run)["step"] == STEPS + 1
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # the newest checkpoint
    assert snapshot(run) == before


def test_a_reader_sampling_in_a_loop_does_not_disturb_training(corpus, tmp_path, monkeypatch):
    """The issue's race: `sample --run R` in a loop while R checkpoints every step."""
    monkeypatch.setattr(train, "save_plots", lambda run_dir: [])  # slow and beside the point
    steps = ["--steps", "10", "--ckpt-every", "1"]
    out = tmp_path / "watched"
    done, codes = threading.Event(), []

    def reader():
        while not done.is_set():
            if checkpoint.has_checkpoint(out):
                codes.append(sample.main(["--run", str(out), "--tokens", "2", "--seed", "0"]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert train.main(argv(corpus, out, *steps)) == 0
    finally:
        done.set()
        thread.join()
    assert train.main(argv(corpus, tmp_path / "alone", *steps)) == 0
    assert losses(out) == losses(tmp_path / "alone")
    assert len(codes) >= 5 and set(codes) == {0}, codes


# ---------------------------------------------------------------- divergence

def test_a_diverging_run_never_saves_non_finite_weights(corpus, tmp_path, capsys):
    """--lr 1e6: the gradients turn NaN while the loss is still finite."""
    out = tmp_path / "run"
    assert train.main(argv(corpus, out, "--lr", "1e6", "--ckpt-every", "1", "--steps", "12")) == 1
    err = capsys.readouterr().err
    last = checkpoint.load_state(out)["step"]
    assert f"The last good checkpoint (step {last}) in {out} is intact" in err
    checkpoint.check_finite(load_file(out / "model.safetensors"), "model.safetensors")
    checkpoint.check_finite(checkpoint.load_state(out), "state.pt")
    assert sample.main(["--run", str(out), "--tokens", "3", "--seed", "0"]) == 0


# ---------------------------------------------------------------- one trainer at a time

DEAD = json.dumps({"pid": 4_194_304, "host": "elsewhere", "since": "yesterday"})


def test_one_trainer_at_a_time_and_a_dead_ones_lock_is_taken_over(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.claim(out, resume=False):  # as a first trainer holds it
        with pytest.raises(SystemExit):
            train.main(argv(corpus, out))
        err = capsys.readouterr().err
        assert f"is in use by another trainer (PID {os.getpid()} on host" in err
        assert [p.name for p in out.iterdir()] == [rundir.LOCK]  # the second touched nothing
        assert json.loads((out / rundir.LOCK).read_text())["pid"] == os.getpid()  # nor its name
    # A trainer killed while holding the lock leaves its PID in the file, but no lock.
    (out / rundir.LOCK).write_text(DEAD)
    assert train.main(argv(corpus, out)) == 0
    err = capsys.readouterr().err
    assert "taking over" in err and "(PID 4194304 on host elsewhere since yesterday)" in err
    assert (out / rundir.LOCK).read_text() == ""  # released on exit


def test_a_file_system_without_locks_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):  # what flock does on some network mounts
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with rundir.claim(tmp_path / "run", resume=False):
        pass
    err = capsys.readouterr().err
    assert f"cannot lock {tmp_path / 'run' / rundir.LOCK} (No locks available)" in err


# ---------------------------------------------------------------- checksums

def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_weight_bytes_are_refused_naming_the_file(run, capsys):
    flip(run / "model.safetensors", -5)  # inside the last tensor's data, not the header
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the SHA-256"):
        checkpoint.load_model(run)
    assert sample.main(["--run", str(run)]) == 2
    assert "model.safetensors does not match the SHA-256" in capsys.readouterr().err
    # A run directory from before manifests existed is still read, unverified.
    (run / checkpoint.MANIFEST).unlink()
    checkpoint.load_model(run)


def test_flipped_state_bytes_are_refused_on_resume(corpus, run, capsys):
    flip(run / "state.pt", (run / "state.pt").stat().st_size // 2)
    with pytest.raises(SystemExit):
        train.main(argv(corpus, run, "--resume"))
    assert "state.pt does not match the SHA-256" in capsys.readouterr().err


# ---------------------------------------------------------------- torn and damaged files

def interrupt(corpus, out, at_step):
    """Train like ``finished`` but die, as if killed, when step ``at_step`` begins."""
    real, calls = train.train_step, iter(range(1, STEPS + 1))

    def dying(*args, **kwargs):
        if next(calls) == at_step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "train_step", dying)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv(corpus, out))


def test_a_torn_last_metrics_line_is_dropped_on_resume(corpus, finished, tmp_path, capsys):
    out = tmp_path / "run"
    interrupt(corpus, out, at_step=4)  # after the step-2 checkpoint and the step-3 record
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 4.1')  # the kill cut this record short
    assert train.main(argv(corpus, out, "--resume")) == 0
    assert losses(out) == losses(finished)
    assert "dropped 1 damaged line(s)" in capsys.readouterr().err


def test_a_first_save_cut_short_leaves_a_run_that_starts_cleanly(corpus, finished, tmp_path,
                                                                 capsys):
    out = tmp_path / "run"
    (out / checkpoint.TMP).mkdir(parents=True)  # killed while writing the step-0 checkpoint
    (out / checkpoint.TMP / "model.safetensors").write_bytes(b"\0" * 10)
    (out / rundir.LOCK).write_text(DEAD)
    with pytest.raises(SystemExit):
        train.main(argv(corpus, out, "--resume"))
    assert "start the run again without --resume" in capsys.readouterr().err
    assert train.main(argv(corpus, out)) == 0
    assert losses(out) == losses(finished)


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "not JSON": lambda data: b'{"hidden_size": 3',
    "a JSON list": lambda data: b"[]",
}


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", "truncated"), ("state.pt", "truncated"),
    ("config.json", "not JSON"), ("tokenizer.json", "a JSON list"),
])
@pytest.mark.parametrize("manifest", [True, False], ids=["verified", "older run"])
def test_damaged_files_are_named_by_resume_and_sample(corpus, run, capsys, name, damage,
                                                      manifest):
    path = run / name
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    if not manifest:  # not caught by a checksum: the file itself must fail to parse
        (run / checkpoint.MANIFEST).unlink()
    with pytest.raises(SystemExit):
        train.main(argv(corpus, run, "--resume"))
    assert f"{path} " in capsys.readouterr().err
    code = sample.main(["--run", str(run), "--tokens", "2"])
    err = capsys.readouterr().err
    assert (code, f"{path} " in err) == ((0, False) if name == "state.pt" else (2, True))


def test_a_checkpoint_of_another_shape_is_refused_on_resume(corpus, run, capsys):
    config = run / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 48}))
    (run / checkpoint.MANIFEST).unlink()  # an older run directory: no checksum to fail
    with pytest.raises(SystemExit):
        train.main(argv(corpus, run, "--resume"))
    assert "model.safetensors does not match the model of config.json" in (
        capsys.readouterr().err)


# ---------------------------------------------------------------- bad options

def test_out_must_be_a_writable_directory(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit):
        train.main(argv(corpus, tmp_path / "file"))
    assert f"--out {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(argv(corpus, tmp_path / "file" / "run"))
    assert "cannot be written (Not a directory)" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("content, message", [
    (b"", "book.txt is empty"),
    (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff", "book.txt is not valid UTF-8"),
    (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "book.txt holds a NUL character"),
    (b"ROMEO.\nShort.\n", "book.txt has 14 characters, too few for --seq-len 16"),
])
def test_unusable_text_is_refused(tmp_path, capsys, content, message):
    (tmp_path / "book.txt").write_bytes(content)
    with pytest.raises(SystemExit):
        train.main(argv((tmp_path / "book.txt", tmp_path / "data"), tmp_path / "run"))
    assert message in capsys.readouterr().err


def test_sample_on_a_missing_device_says_so(run, capsys):
    assert sample.main(["--run", str(run), "--device", "cuda:99"]) == 2
    assert "--device cuda:99 is not available on this machine" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--steps", "1500"], ["--preset", "toy"]])
def test_resume_refuses_an_explicit_default_that_differs_from_the_run(corpus, run, capsys,
                                                                      option):
    """The values are the parser's defaults, but were written: the user means them."""
    with pytest.raises(SystemExit):
        train.main([*argv(corpus, run, "--resume"), *option])
    err = capsys.readouterr().err
    assert f"{option[0]}={option[1]} differs from the resumed run's" in err
    assert f"leave out {option[0]}" in err
