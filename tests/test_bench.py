"""The benchmark CLIs refuse bad options with a usage error before any work is done;
the wall-clock comparison tables what its runs recorded; the HF comparison skips
cleanly without transformers, and maps our config to HF's."""

import builtins
import json
import re
import sys
import types

import pytest

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3.bench.__main__ import main as bench
from minidsv3.bench.decode import PROMPTS
from minidsv3.bench.hf import hf_config_kwargs, hf_equivalent
from minidsv3.checkpoint import load_config, save_checkpoint
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
    (["wallclock", "--seconds", "0"], "--seconds: '0' is not a number of seconds > 0"),
    (["wallclock", "--seconds", "nan"], "--seconds: 'nan' is not a number of seconds > 0"),
    (["wallclock", "--steps", "100"], "--steps is set by the bench .*; leave it out"),
    (["wallclock", "--resume"], "--resume is set by the bench"),
    (["wallclock", "hiden_size=8"], "unknown config field 'hiden_size'"),
    (["wallclock", "--preset", "tiny"], "--preset tiny has no dense twin: intermediate_size=64"),
    (["hf", "--steps", "0"], "--steps: '0' is not an integer >= 1"),
    (["hf", "--threads", "0"], "--threads: '0' is not an integer >= 1"),
    (["hf", "--seq-len", "1000"], "--seq-len 1000 .*max_position_embeddings=256"),
    (["hf", "--attn-implementation", "flash"], "--attn-implementation: invalid choice: 'flash'"),
    (["hf", "--preset", "deepseek-v2-lite"],
     "--preset deepseek-v2-lite: .*routes only as DeepSeek-V3 does .*'noaux_tc'"),
    (["hf", "--preset", "deepseek-v3"],
     "--preset deepseek-v3 has [0-9,]{15} parameters.*at most 100,000,000"),
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


RECIPES = {"MoE + MTP": "moe-mtp", "MoE": "moe", "dense twin": "dense"}


@pytest.mark.usefixtures("one_thread")
def test_wallclock_tables_what_its_three_runs_recorded(tmp_path, capsys, step_clock):
    text = tmp_path / "night.txt"
    text.write_text("".join(f"ROMEO.\nThe {i % 7} stars of night are fair, {i % 5} lords.\n"
                            for i in range(80)), encoding="utf-8")
    out_dir = tmp_path / "bench"
    # The tiny preset's dense FFN made as wide as its activated experts: 16 x (1 + 2).
    argv = ["wallclock", "--seconds", "2", "--out-dir", str(out_dir), "--preset", "tiny",
            "intermediate_size=48", "--text", str(text), "--data-dir", str(tmp_path / "data"),
            "--batch-size", "8", "--seq-len", "32", "--warmup", "13", "--eval-batches", "2",
            "--sample-chars", "5"]
    step_clock(lambda i: 1 / 16)  # 13 + (2 - 13/16) x 16 = 32 steps for every run
    assert bench(argv) == 0
    printed = capsys.readouterr().out
    lines = printed[printed.index("\nrecipe  "):].strip().splitlines()[1:1 + len(RECIPES)]
    rows = {cells[0]: cells[1:] for cells in (re.split(r" {2,}", line) for line in lines)}
    assert rows.keys() == RECIPES.keys()
    finals = {label: json.loads((out_dir / run / "metrics.jsonl").read_text().splitlines()[-1])
              for label, run in RECIPES.items()}
    ref = finals["MoE + MTP"]
    for label, final in finals.items():
        assert rows[label] == [
            str(final["step"]), str(final["planned_steps"]), f"{final['train_seconds']:.1f}",
            f"{final['train_tokens_per_s']:,.0f}", f"{final['val_loss']:.4f}",
            f"{final['val_loss'] - ref['val_loss']:+.4f}",
            f"{final['train_tokens_per_s'] / ref['train_tokens_per_s']:.2f}x"], label
        assert rows[label][:4] == ["32", "32", "2.0", "4,096"]  # 32 x 8 x 32 tokens in 2 s
    assert len({final["val_loss"] for final in finals.values()}) == 3  # three models
    figure = out_dir / "wallclock.png"
    assert f"plot: {figure}" in printed and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The three models: MTP or not, MoE or the dense twin of the tiny preset's 2 layers.
    configs = {label: load_config(out_dir / run) for label, run in RECIPES.items()}
    assert [(c.num_nextn_predict_layers, c.first_k_dense_replace, c.intermediate_size)
            for c in configs.values()] == [(1, 1, 48), (0, 1, 48), (0, 2, 48)]

    # The runs are compared only when trained back to back: they are never reused.
    with pytest.raises(SystemExit) as exit_:
        bench(argv)
    assert exit_.value.code == 2
    assert (f"--out-dir {out_dir} already holds moe-mtp, moe, dense; the runs are compared only "
            "when trained back to back") in capsys.readouterr().err
SKIP_LINES = {
    "absent": "transformers is not installed: pip install transformers to compare minidsv3's "
              "training step with HF's DeepseekV3ForCausalLM; skipped",
    "too old": "transformers 4.40.0 is too old: this comparison needs >= 5, whose "
               "DeepseekV3ForCausalLM it was written against; pip install -U transformers to "
               "compare; skipped",
}


@pytest.mark.parametrize("transformers", SKIP_LINES)
def test_hf_benchmark_skips_cleanly_without_transformers(transformers, monkeypatch, capsys):
    """One line and exit 0, whether or not transformers is really installed here."""
    # Forget transformers and the benchmark module, so both are imported again below.
    for name in [n for n in sys.modules
                 if n.split(".")[0] == "transformers" or n == "minidsv3.bench.hf"]:
        monkeypatch.delitem(sys.modules, name)
    if transformers == "absent":
        real_import = builtins.__import__

        def import_without_transformers(name, *args, **kwargs):
            if name.split(".")[0] == "transformers":
                raise ModuleNotFoundError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", import_without_transformers)
    else:
        old = types.ModuleType("transformers")
        old.__version__ = "4.40.0"
        monkeypatch.setitem(sys.modules, "transformers", old)
    assert bench(["hf", "--steps", "1"]) == 0
    # Nothing else printed: the skip comes before any model is built or timed.
    assert capsys.readouterr().out.splitlines() == [SKIP_LINES[transformers]]


def test_hf_config_kwargs_are_the_release_fields_plus_training_ones():
    cfg = ModelConfig.preset("toy", vocab_size=84)
    kwargs = hf_config_kwargs(cfg)
    # What HF's DeepseekV3Config reads, stated by hand from the toy preset.
    assert {k: kwargs[k] for k in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace",
        "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
        "norm_topk_prob", "rope_interleave", "use_cache")} == dict(
        model_type="deepseek_v3", vocab_size=84, hidden_size=128, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, use_cache=False)
    assert "torch_dtype" not in kwargs  # the release's bfloat16; the benchmark trains in fp32
    assert ModelConfig.from_dict(kwargs) == cfg  # our reader gets the same model back


@pytest.mark.parametrize("routing", [
    dict(topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax"),  # V2-Lite
    dict(topk_method="group_limited_greedy"),  # V2
    dict(scoring_func="softmax"),  # V3's rule on softmax scores: HF's V3 hard-codes sigmoid
])
def test_hf_config_kwargs_refuse_routing_hf_v3_lacks(routing):
    with pytest.raises(ValueError, match="routes only as DeepSeek-V3 does"):
        hf_config_kwargs(ModelConfig.preset("tiny", **routing))


def test_hf_equivalent_drops_only_mtp_and_the_balance_losses():
    cfg = ModelConfig.preset("toy", expert_aux_loss_alpha=0.01)
    same = hf_equivalent(cfg)
    assert (same.num_nextn_predict_layers, same.aux_loss_alpha, same.expert_aux_loss_alpha) \
        == (0, 0.0, 0.0)
    assert same.replace(num_nextn_predict_layers=1, aux_loss_alpha=0.0001,
                        expert_aux_loss_alpha=0.01) == cfg
