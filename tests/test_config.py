import json

import pytest
import torch

from minidsv3 import ModelConfig
from minidsv3.config import PRESETS, RopeScaling


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
        (dict(topk_group=5), "topk_group"),
        # 2 groups of 2 experts kept = 4 experts < 6 per token
        (dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=6), "topk_group"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(first_k_dense_replace=3), "first_k_dense_replace"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(mtp_loss_lambda=-0.1), "mtp_loss_lambda"),
        (dict(rope_scaling={"factor": 0.5}), "rope_scaling.factor"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.preset("tiny", **changes)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="deepseek-v3"):
        ModelConfig.preset("gpt4")


def test_released_preset_matches_design_facts():
    c = ModelConfig.preset("deepseek-v3")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.moe_intermediate_size) == (
        129280, 7168, 18432, 2048)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.num_attention_heads) == (61, 3, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim,
            c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (c.n_shared_experts, c.n_routed_experts, c.num_experts_per_tok, c.n_group,
            c.topk_group) == (1, 256, 8, 8, 4)
    assert c.routed_scaling_factor == 2.5 and c.scoring_func == "sigmoid" and c.norm_topk_prob
    assert c.rope_scaling == RopeScaling(40, 4096, 32, 1, 1.0, 1.0)
    assert c.max_position_embeddings == 163840 and c.num_nextn_predict_layers == 1
    assert not c.tie_word_embeddings and c.rms_norm_eps == 1e-6 and c.rope_theta == 1e4


def test_json_round_trip_and_hf_layout(tmp_path):
    cfg = ModelConfig.preset("deepseek-v3")
    path = tmp_path / "config.json"
    cfg.to_json(path)
    raw = json.loads(path.read_text())
    assert raw["model_type"] == "deepseek_v3"
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert raw["rope_scaling"]["type"] == "yarn" and raw["rope_scaling"]["factor"] == 40
    assert ModelConfig.from_json(path) == cfg


def test_from_dict_reads_a_released_style_config():
    """Extra HF keys are ignored, null q_lora_rank means no query compression."""
    d = {**PRESETS["tiny"], "q_lora_rank": None, "torch_dtype": "bfloat16",
         "quantization_config": {"fmt": "e4m3"}, "model_type": "deepseek_v3",
         "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                          "mscale_all_dim": 1.0}}
    cfg = ModelConfig.from_dict(d)
    assert cfg.q_lora_rank == 0
    assert cfg.rope_scaling.factor == 4


@pytest.mark.parametrize("d", [[], [("hidden_size", 8)], "{}", None])
def test_from_dict_needs_a_dict(d):
    with pytest.raises(ValueError, match="must be a JSON object"):
        ModelConfig.from_dict(d)


def test_other_architecture_is_refused():
    with pytest.raises(ValueError, match="llama"):
        ModelConfig.from_dict({"model_type": "llama", "hidden_size": 8})


def test_replace_validates():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="topk_group"):
        cfg.replace(topk_group=99)


# -- the model family and both config.json layouts ---------------------------------------

def test_v2_presets_match_the_released_configs():
    """Values of DeepSeek-V2 / V2-Lite's config.json (and inference/configs/config_{236B,16B})."""
    v2, lite = ModelConfig.preset("deepseek-v2"), ModelConfig.preset("deepseek-v2-lite")
    assert (v2.vocab_size, v2.hidden_size, v2.intermediate_size, v2.moe_intermediate_size,
            v2.num_hidden_layers, v2.num_attention_heads, v2.q_lora_rank) == (
        102400, 5120, 12288, 1536, 60, 128, 1536)
    assert (v2.n_shared_experts, v2.n_routed_experts, v2.num_experts_per_tok, v2.n_group,
            v2.topk_group, v2.routed_scaling_factor) == (2, 160, 6, 8, 3, 16.0)
    assert (lite.hidden_size, lite.intermediate_size, lite.moe_intermediate_size,
            lite.num_hidden_layers, lite.num_attention_heads, lite.q_lora_rank) == (
        2048, 10944, 1408, 27, 16, 0)
    assert (lite.n_shared_experts, lite.n_routed_experts, lite.num_experts_per_tok,
            lite.n_group, lite.routed_scaling_factor) == (2, 64, 6, 1, 1.0)
    for c in (v2, lite):
        assert c.scoring_func == "softmax" and not c.norm_topk_prob
        assert c.first_k_dense_replace == 1 and c.num_nextn_predict_layers == 0
        assert (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
            512, 128, 64, 128)
        assert c.rope_scaling == RopeScaling(40, 4096, 32, 1, 0.707, 0.707)
        assert c.model_type == "deepseek_v2"
    assert (v2.topk_method, lite.topk_method) == ("group_limited_greedy", "greedy")
    assert ModelConfig.preset("deepseek-v3").topk_method == "noaux_tc"


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite"])
def test_family_round_trips_through_config_json(tmp_path, name):
    cfg = ModelConfig.preset(name)
    cfg.to_json(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == cfg.model_type and raw["topk_method"] == cfg.topk_method
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


def v5_file(**rope_parameters):
    """A tiny config.json as transformers >= 5 writes it: no rope_theta, no rope_scaling."""
    d = ModelConfig.preset("tiny").to_hf_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = rope_parameters
    return d


def test_v5_layout_plain_rope_with_long_context_stays_plain():
    """8,192 positions and rope_type default: no YaRN, plain 1/sqrt(d) softmax scale."""
    from minidsv3.layers import precompute_freqs_cis, rope_inv_freq, softmax_scale, uses_yarn
    d = v5_file(rope_type="default", rope_theta=50000.0)
    d["max_position_embeddings"] = 8192
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is None and not uses_yarn(cfg)
    assert softmax_scale(cfg) == cfg.qk_head_dim ** -0.5
    angle = precompute_freqs_cis(cfg, 2)[1].angle().double()  # position 1: theta_i itself
    assert torch.allclose(angle, rope_inv_freq(cfg.qk_rope_head_dim, 50000.0), atol=1e-7)


def test_v5_layout_yarn_equals_the_release_layout():
    yarn = dict(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                mscale=0.707, mscale_all_dim=0.707)
    v5 = ModelConfig.from_dict({**v5_file(rope_type="yarn", rope_theta=25000.0, **yarn),
                                "max_position_embeddings": 8192})
    old = ModelConfig.from_dict({**ModelConfig.preset("tiny").to_hf_dict(), "rope_theta": 25000.0,
                                 "rope_scaling": {"type": "yarn", **yarn},
                                 "max_position_embeddings": 8192})
    assert v5 == old and v5.rope_theta == 25000.0
    assert v5.rope_scaling == RopeScaling(40, 4096, 32, 1, 0.707, 0.707)


def test_the_release_layout_with_other_theta_and_no_scaling():
    d = {**ModelConfig.preset("tiny").to_hf_dict(), "rope_theta": 50000.0}
    del d["rope_scaling"]  # absent means plain RoPE to HF, not V3's YaRN block
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is None


@pytest.mark.parametrize("d, match", [
    (v5_file(rope_type="linear", factor=2.0, rope_theta=1e4), "rope_type='linear' is not impl"),
    (v5_file(rope_type="llama3", rope_theta=1e4), "'llama3' is not implemented"),
    ({**v5_file(rope_type="default", rope_theta=5e4), "rope_theta": 1e4}, "layouts disagree"),
    ({**v5_file(rope_type="yarn", type="default", factor=4.0)}, "rope_type and type disagree"),
    ({**v5_file(rope_type="default"), "rope_parameters": [1, 2]}, "must be a JSON object"),
    ({**ModelConfig.preset("tiny").to_hf_dict(), "rope_scaling": {"type": "dynamic"}},
     "'dynamic' is not implemented"),
    ({**ModelConfig.preset("tiny").to_hf_dict(), "rope_interleave": False}, "rope_interleave"),
    ({**ModelConfig.preset("tiny").to_hf_dict(), "moe_layer_freq": 2}, "moe_layer_freq"),
    ({**ModelConfig.preset("tiny").to_hf_dict(), "topk_method": "greedy"}, "n_group"),
    ({**ModelConfig.preset("tiny", n_group=1, topk_group=1).to_hf_dict(), "topk_method": "greedy"},
     "deepseek_v3 models route with noaux_tc"),
])
def test_config_files_that_cannot_be_read_faithfully_are_refused(d, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(d)


def test_v2_file_without_mtp_field_has_no_mtp():
    d = ModelConfig.preset("deepseek-v2-lite").to_hf_dict()
    del d["num_nextn_predict_layers"], d["topk_method"], d["norm_topk_prob"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.num_nextn_predict_layers == 0 and cfg.topk_method == "greedy"
    assert cfg.norm_topk_prob is False  # softmax: the release does not renormalise


def test_yarn_file_without_mscale_all_dim_means_zero_as_in_hf():
    d = ModelConfig.preset("tiny").to_hf_dict()
    d["rope_scaling"] = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16}
    assert ModelConfig.from_dict(d).rope_scaling.mscale_all_dim == 0.0


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field", [
    "mtp_loss_lambda", "aux_loss_alpha", "expert_aux_loss_alpha", "routed_scaling_factor",
    "rms_norm_eps", "rope_theta", "initializer_range"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, "0.5", True, None, [1.0]])
def test_float_fields_refuse_non_finite_and_non_numbers(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.*finite number"):
        ModelConfig.preset("tiny", **{field: value})


@pytest.mark.parametrize("field", [
    "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, "2", False])
def test_rope_scaling_floats_refuse_non_finite_and_non_numbers(field, value):
    with pytest.raises(ValueError, match=rf"^rope_scaling\.{field}="):
        RopeScaling(**{field: value})
    with pytest.raises(ValueError, match=rf"^rope_scaling\.{field}="):  # the dict form too
        ModelConfig.preset("tiny", rope_scaling={field: value})


@pytest.mark.parametrize("changes, field", [
    (dict(rope_scaling={"beta_fast": INF}), "rope_scaling.beta_fast"),  # was "math domain error"
    (dict(rope_scaling={"beta_fast": 2e308 / 10}), "rope_scaling.beta_fast"),
    (dict(rope_scaling={"beta_slow": 1e-320}), "rope_scaling.beta_slow"),
    (dict(rope_scaling={"mscale_all_dim": -1.0}), "rope_scaling.mscale_all_dim"),
    (dict(rope_scaling={"original_max_position_embeddings": "4096"}),
     "rope_scaling.original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.rope_type"),  # not dropped
    (dict(rope_theta=1.0), "rope_theta"),  # ln(theta) = 0: no RoPE frequencies
    # finite, but the forward overflows to NaN
    (dict(rope_scaling={"mscale_all_dim": 1e200}), "rope_scaling.mscale_all_dim"),
    (dict(mtp_loss_lambda=1e300), "mtp_loss_lambda"),
    (dict(aux_loss_alpha=1e300), "aux_loss_alpha"),
    (dict(routed_scaling_factor=1e39), "routed_scaling_factor"),
    (dict(initializer_range=100.0), "initializer_range"),
])
def test_more_bad_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field.replace('.', r'[.]')}="):
        ModelConfig.preset("tiny", **changes)


@pytest.mark.parametrize("value", [[40.0, 4096], "yarn", 40, 4.0, True])
def test_rope_scaling_must_be_an_object_or_null(value):
    with pytest.raises(ValueError, match="rope_scaling=.*must be null .*or an object"):
        ModelConfig.preset("tiny", rope_scaling=value)


@pytest.mark.parametrize("key", ["facter", "rope_theta", "attn_factor"])
def test_unknown_rope_scaling_keys_are_refused(key):
    with pytest.raises(ValueError, match=f"rope_scaling: unknown key.*'{key}'.*allowed.*beta_fast"):
        ModelConfig.preset("tiny", rope_scaling={"factor": 4, key: 1.0})
    # both spellings of the scaling type are known keys (HF writes rope_type, the release type)
    cfg = ModelConfig.preset("tiny", rope_scaling={"rope_type": "yarn", "type": "yarn",
                                                   "factor": 4})
    assert cfg.rope_scaling.factor == 4


# norm_topk_prob=None is allowed: it means "as the release does for this gate".
@pytest.mark.parametrize("field, value", [
    *[("norm_topk_prob", v) for v in ("false", "true", 0, 1)],
    *[("tie_word_embeddings", v) for v in ("false", "true", 0, 1, None)]])
def test_bool_fields_take_only_bools(field, value):
    with pytest.raises(ValueError, match=f"^{field}=.*true or false"):
        ModelConfig.preset("tiny", **{field: value})


def test_tied_embeddings_are_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings=True.*untied"):
        ModelConfig.preset("tiny", tie_word_embeddings=True)


@pytest.mark.parametrize("changes, field", [
    (dict(num_hidden_layers=10**6, first_k_dense_replace=1), "num_hidden_layers"),
    (dict(num_nextn_predict_layers=10**6), "num_nextn_predict_layers"),
    (dict(n_routed_experts=10**6, n_group=1, topk_group=1), "n_routed_experts"),
    # each count allowed, their product (the experts actually built) not
    (dict(num_hidden_layers=1000, n_routed_experts=512, n_group=1, topk_group=1),
     "n_routed_experts"),
])
def test_absurd_sizes_are_refused_at_once(changes, field):
    with pytest.raises(ValueError, match=f"^{field}=.*at most"):
        ModelConfig.preset("tiny", **changes)
    # The bounds leave room: 4x the release's layers, or its experts, still validate.
    ModelConfig.preset("deepseek-v3", num_hidden_layers=4 * 61)
    ModelConfig.preset("deepseek-v3", n_routed_experts=4 * 256)
