"""The byte-level BPE: round trip, training split only, determinism, the per-character
loss, and a tiny `train --tokenizer bpe` run that resumes and samples."""

import hashlib
import json
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel

from minidsv3 import sample, train
from minidsv3.checkpoint import load_config, load_model, load_tokenizer
from minidsv3.config import ModelConfig
from minidsv3.data import CharTokenizer, split_train_val
from minidsv3.generate import generate
from minidsv3.model import DeepSeekV3
from minidsv3.tokenizer import BPETokenizer, bytes_to_unicode, tokenizer_from_dict

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# Only in the validation part of the generated corpus: the BPE must never learn it.
VAL_ONLY_WORD = "Zounds"
VERSE = ("ROMEO.\nBut soft, what light through yonder window breaks?\n"
         "JULIET.\nCafé naïve: “O Romeo, Romeo!” — wherefore art thou Romeo?\n")


def _play(rng: random.Random, n: int, words: list[str]) -> str:
    speakers = ["KING HENRY", "PORTIA", "OTHELLO"]
    return "\n".join(f"{rng.choice(speakers)}.\n"
                     + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + ".\n"
                     for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A generated play whose last twentieth says VAL_ONLY_WORD over and over: (file, data dir)."""
    rng = random.Random(0)
    words = "the king queen love death night day sword crown heart lord lady fair sweet".split()
    text = _play(rng, 300, words) + "\n" + _play(rng, 15, [VAL_ONLY_WORD] * 5 + words)
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "play.txt").write_text(text, encoding="utf-8")
    return folder / "play.txt", folder / "data"


def _argv(corpus, out, *extra):
    text, data_dir = corpus
    return ["--preset", "tiny", "--text", str(text), "--data-dir", str(data_dir),
            "--out", str(out), "--batch-size", "8", "--seq-len", "32", "--steps", "12",
            "--warmup", "2", "--eval-every", "6", "--eval-batches", "2", "--log-every", "1",
            "--ckpt-every", "6", "--sample-chars", "20", *extra]


@pytest.fixture(scope="module")
def bpe_run(corpus, tmp_path_factory):
    """A BPE run stopped after step 6 of 12, then resumed to the end."""
    out = tmp_path_factory.mktemp("runs") / "bpe"
    bpe = ["--tokenizer", "bpe", "--vocab-size", "300"]
    assert train.main(_argv(corpus, out, *bpe, "--stop-after", "6")) == 0
    assert train.main(_argv(corpus, out, "--resume")) == 0  # the options come from the run
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the tokenizer itself

def test_round_trip_of_shakespeare_like_text_with_non_ascii_characters():
    tok = BPETokenizer.train(VERSE * 20, 300)
    # Byte-level: characters the training text never had encode and decode too.
    for text in (VERSE, "Ærgerlich, Œdipus! 日本語 🎭 tab\tand  spaces\n\n", " leading", ""):
        ids = tok.encode(text)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert tok.decode(ids) == text
        assert tok.decode(ids.tolist()) == text


def test_merges_make_tokens_of_several_characters():
    tok = BPETokenizer.train(VERSE * 20, 320)
    assert tok.vocab_size == 320
    assert len(tok.encode(VERSE)) < len(VERSE) / 2
    # A short text runs out of pairs to merge before a large vocabulary is full.
    assert 256 < BPETokenizer.train(VERSE * 20, 1000).vocab_size < 1000


def test_decode_refuses_ids_outside_the_vocabulary():
    tok = BPETokenizer.train(VERSE, 260)
    with pytest.raises(ValueError, match=r"token id 260 at position 1 is outside the vocabulary "
                                         r"\(valid ids are 0..259\)"):
        tok.decode([0, 260])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


@pytest.mark.parametrize("size", [256, 65537])
def test_train_refuses_a_vocabulary_size_out_of_range(size):
    with pytest.raises(ValueError, match=f"must have 257..65536 tokens .* got {size}"):
        BPETokenizer.train(VERSE, size)


def test_bytes_to_unicode_is_the_table_of_the_tokenizers_library():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(ByteLevel.alphabet())
    # Each token's bytes, read through the table, decode as the library decodes the token.
    tok = BPETokenizer.train(VERSE * 20, 400)
    byte_of = {c: b for b, c in table.items()}
    for symbol, i in tok.hf.get_vocab().items():
        raw = bytes(byte_of[c] for c in symbol)
        assert raw.decode("utf-8", errors="replace") == tok.decode([i])


@pytest.mark.parametrize("text", [VERSE, "é日🎭 ü", "\n"])
def test_chars_per_token_sums_to_the_length_of_the_text(text):
    # Tokens trained on ASCII only: "é" and "🎭" are split into bytes, mid-character.
    for tok in (BPETokenizer.train("the king and the queen " * 20, 300),
                BPETokenizer.train(VERSE * 20, 400), CharTokenizer.from_text(VERSE + text)):
        assert tok.chars_per_token[tok.encode(text)].sum().item() == len(text)
    assert CharTokenizer("ab").chars_per_token.tolist() == [1, 1]


def test_training_is_deterministic_even_in_another_process():
    text = VERSE * 30
    first, second = BPETokenizer.train(text, 350), BPETokenizer.train(text, 350)
    assert first == second and first.hf.to_str() == second.hf.to_str()
    # A new process has new hash-table seeds, which must not change the merges either.
    code = ("import hashlib, sys; from minidsv3.tokenizer import BPETokenizer; "
            "print(hashlib.sha256(BPETokenizer.train(sys.stdin.read(), 350).hf.to_str()"
            ".encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], input=text, cwd=ROOT, text=True,
                           capture_output=True, check=True, encoding="utf-8").stdout.strip()
    assert other == hashlib.sha256(first.hf.to_str().encode()).hexdigest()
    assert BPETokenizer.train(text + "Zounds " * 50, 350) != first  # equality has teeth


def test_tokenizer_json_of_either_kind_is_told_apart():
    char = CharTokenizer("ab\n")
    bpe = BPETokenizer.train(VERSE, 280)
    assert tokenizer_from_dict(char.to_dict()) == char  # {"type": "char", ...} as before
    assert tokenizer_from_dict(bpe.to_dict()) == bpe
    assert char != bpe and bpe != char
    with pytest.raises(ValueError, match="neither a character tokenizer"):
        tokenizer_from_dict({"vocab": "ab"})
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer"):
        tokenizer_from_dict({**bpe.to_dict(), "pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(ValueError, match="not a valid tokenizers-library file"):
        tokenizer_from_dict({**bpe.to_dict(), "model": {"type": "BPE"}})


# ---------------------------------------------------------------- the loss per character

def test_loss_per_char_is_the_loss_per_token_times_tokens_over_chars():
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    V = model.cfg.vocab_size
    val_ids = torch.arange(33) % V
    # Odd ids stand for 3 characters, even ids for 1: the targets, ids 1..32, hold 16 of
    # each, so 32 tokens spell 16 * 3 + 16 = 64 characters.
    chars_per_token = torch.where(torch.arange(V) % 2 == 1, 3, 1)
    ev = train.evaluate(model, val_ids, batch_size=2, seq_len=16, max_batches=None,
                        device=torch.device("cpu"), autocast=nullcontext(),
                        chars_per_token=chars_per_token)
    assert ev["val_loss_per_char"] == pytest.approx(ev["val_loss"] * 32 / 64)
    ones = train.evaluate(model, val_ids, 2, 16, None, torch.device("cpu"), nullcontext(),
                          torch.ones(V, dtype=torch.long))
    assert ones["val_loss_per_char"] == pytest.approx(ones["val_loss"])  # a char tokenizer


# ---------------------------------------------------------------- train --tokenizer bpe

def test_bpe_run_writes_a_tokenizer_json_the_library_reads(bpe_run):
    hf = HFTokenizer.from_file(str(bpe_run / "tokenizer.json"))
    saved = load_tokenizer(bpe_run)
    assert isinstance(saved, BPETokenizer)
    assert hf.get_vocab_size() == saved.vocab_size == load_config(bpe_run).vocab_size == 300
    assert hf.encode(VERSE).ids == saved.encode(VERSE).tolist()


def test_bpe_is_trained_on_the_training_split_only(corpus, bpe_run):
    text = corpus[0].read_text(encoding="utf-8")
    train_text, val_text = split_train_val(text)
    assert VAL_ONLY_WORD not in train_text and VAL_ONLY_WORD in val_text
    saved = load_tokenizer(bpe_run)
    assert saved == BPETokenizer.train(train_text, 300)  # the training part alone
    assert saved != BPETokenizer.train(text, 300)  # the validation text would change it
    # With room for more merges, the whole text would make the word one token; the
    # training part alone never does, however large the vocabulary.
    assert BPETokenizer.train(text, 400).hf.encode(" " + VAL_ONLY_WORD).tokens == ["ĠZounds"]
    assert len(BPETokenizer.train(train_text, 400).encode(" " + VAL_ONLY_WORD)) == 7


def test_bpe_run_records_the_loss_per_token_and_per_char(bpe_run, corpus):
    evaluations = [r for r in _records(bpe_run) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [6, 12]  # the resumed run went on to the end
    tok = load_tokenizer(bpe_run)
    _, val_text = split_train_val(corpus[0].read_text(encoding="utf-8"))
    tokens_per_char = len(tok.encode(val_text)) / len(val_text)
    assert tokens_per_char < 0.7
    for r in evaluations:  # nats per char = nats per token x tokens per char, about
        assert r["val_loss_per_char"] < r["val_loss"]
        assert r["val_loss_per_char"] == pytest.approx(r["val_loss"] * tokens_per_char, rel=0.3)


def test_bpe_run_refuses_a_resume_with_other_tokenizer_options(corpus, bpe_run, capsys):
    for option, saved in (["--vocab-size", "400"], "300"), (["--tokenizer", "char"], "bpe"):
        with pytest.raises(SystemExit):
            train.main(_argv(corpus, bpe_run, "--resume", "--steps", "12", *option))
        assert (f"{option[0]}={option[1]} differs from the resumed run's {saved}"
                in capsys.readouterr().err)


def test_resume_refuses_a_corpus_that_gives_another_tokenizer(corpus, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(corpus[0].read_text(encoding="utf-8"), encoding="utf-8")
    mine = ((book, tmp_path / "data"), tmp_path / "run")
    assert train.main(_argv(*mine, "--tokenizer", "bpe", "--vocab-size", "300",
                            "--stop-after", "1")) == 0
    book.write_text(book.read_text(encoding="utf-8").replace("king", "duke"), encoding="utf-8")
    with pytest.raises(SystemExit):  # same options, but another text: other merges
        train.main(_argv(*mine, "--resume"))
    assert "differs from the one of the run in" in capsys.readouterr().err


def test_sample_and_generate_from_a_bpe_run(bpe_run, capsys):
    prompt = "KING HENRY.\nCafé — "
    assert sample.main(["--run", str(bpe_run), "--prompt", prompt, "--tokens", "30",
                        "--seed", "3"]) == 0
    streamed = capsys.readouterr().out
    # What was streamed piece by piece is the one-shot decode of the same tokens: no
    # multi-byte character was cut where a token ended inside it.
    model, tok = load_model(bpe_run)
    new = generate(model, tok.encode(prompt), 30, temperature=0.8, seed=3).tokens
    assert streamed == prompt + tok.decode(new) + "\n"
    assert len(new) == 30
    samples = (bpe_run / "samples.txt").read_text(encoding="utf-8")
    assert samples.startswith("KING HENRY.\n")


@pytest.mark.parametrize("option, message", [
    (["--vocab-size", "300"], "--vocab-size sets the size of a BPE vocabulary; add --tokenizer "
                              "bpe"),
    (["--tokenizer", "bpe"], "--tokenizer bpe needs --vocab-size N (257..65536)"),
    (["--tokenizer", "bpe", "--vocab-size", "256"], "must have 257..65536 tokens"),
    (["--tokenizer", "bpe", "--vocab-size", "65537"], "must have 257..65536 tokens"),
])
def test_vocab_size_usage_errors(corpus, tmp_path, capsys, option, message):
    with pytest.raises(SystemExit):
        train.main(_argv(corpus, tmp_path / "run", *option))
    assert message in capsys.readouterr().err
