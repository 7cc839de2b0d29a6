"""The benchmark CLIs refuse bad options with a usage error before any work is done."""

import re

import pytest

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3.bench.__main__ import main as bench
from minidsv3.bench.decode import PROMPTS
from minidsv3.checkpoint import save_checkpoint
from minidsv3.data import CharTokenizer

BAD_OPTIONS = [
    (["train", "--steps", "0"], "--steps: '0' is not an integer >= 1"),
    (["train", "--batch-size", "-2"], "--batch-size: '-2' is not an integer >= 1"),
    (["train", "--warmup", "-1"], "--warmup: '-1' is not an integer >= 0"),
    (["train", "--threads", "0"], "--threads: '0' is not an integer >= 1"),
    (["train", "--vocab-size", "0"], "--vocab-size: '0' is not an integer >= 1"),
    (["train", "--seq-len", "1000"], "--seq-len 1000 .*max_position_embeddings=256"),
    (["train", "--preset", "tiny"], "--preset tiny.*dense twin.*intermediate_size=64"),
    (["train", "--preset", "deepseek-v3"],
     "--preset deepseek-v3 has [0-9,]{15} parameters.*at most 100,000,000"),
    (["decode", "--steps", "0"], "--steps: '0' is not an integer >= 1"),
    (["decode", "--chunk", "0"], "--chunk: '0' is not an integer >= 1"),
    (["decode", "--repeats", "0"], "--repeats: '0' is not an integer >= 1"),
    (["decode", "--contexts", "256", "0"], "--contexts: '0' is not an integer >= 1"),
    (["decode", "--fallback-steps", "0"], "--fallback-steps: '0' is not an integer >= 1"),
]


@pytest.mark.parametrize("argv, match", BAD_OPTIONS, ids=["_".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench(argv)
    assert exit_.value.code == 2  # argparse's usage error, before any benchmark ran
    err = capsys.readouterr().err
    assert f"python -m minidsv3.bench {argv[0]}: error:" in err
    assert re.search(match, err), err


FAST_DECODE = ["decode", "--contexts", "8", "--steps", "1", "--chunk", "8"]


def tiny_run(path, chars, **changes):
    tokenizer = CharTokenizer(chars)
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, **changes)
    save_checkpoint(path, DeepSeekV3(cfg), tokenizer, {"step": 0})
    return str(path)


def test_decode_refuses_runs_it_cannot_use(tmp_path):
    """Each a message naming --run (after the quick attention part), not a traceback."""
    prompt_chars = "".join(sorted(set("".join(PROMPTS))))
    run = tiny_run(tmp_path / "no-mtp", prompt_chars, num_nextn_predict_layers=0)
    with pytest.raises(SystemExit, match=f"--run {re.escape(run)} .*num_nextn_predict_layers=0"):
        bench([*FAST_DECODE, "--run", run])
    run = tiny_run(tmp_path / "digits", "0123456789")
    with pytest.raises(SystemExit, match=f"--run {re.escape(run)}: .*cannot encode"):
        bench([*FAST_DECODE, "--run", run])
    (tmp_path / "digits" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match=f"--run {re.escape(run)}: "):
        bench([*FAST_DECODE, "--run", run])
