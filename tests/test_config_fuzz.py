"""Property-based config fuzz: a config either builds a model whose forward is finite,
or is refused with a ValueError that starts by naming the field.

Each example changes up to four fields of the ``tiny`` preset to values inside their
documented ranges (whose combinations may still break a rule, e.g. n_routed_experts %
n_group), and often one more field to a bad value: out of range, NaN, inf, a string, a
bool, null, a list. Hypothesis is derandomized, so CI sees the same examples every run.
"""

import dataclasses
import re
from collections import Counter

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3.config import ROPE_SCALING_KEYS

NAN, INF = float("nan"), float("inf")
# Wrong kinds a config.json can hold, tried on every field.
WRONG_KINDS = st.sampled_from([NAN, INF, -INF, "1", "false", None, [1], {}])


def count(low: int, high: int):
    """(in range, out of range) for an integer field whose smallest valid value is ``low``."""
    return st.integers(low, high), st.sampled_from([low - 1, -7, 2.0, True])


def number(low: float, high: float, bad: list):
    """(in range, out of range) for a float field."""
    return st.floats(low, high) | st.sampled_from([low, high]), st.sampled_from(bad)


def choice(good: list, bad: list):
    return st.sampled_from(good), st.sampled_from(bad)


ROPE_SCALING = st.fixed_dictionaries({}, optional={
    "factor": st.floats(1.0, 64.0),
    "original_max_position_embeddings": st.integers(1, 64),
    "beta_fast": st.floats(8.0, 64.0),
    "beta_slow": st.floats(0.5, 4.0),
    "mscale": st.floats(0.0, 2.0),
    "mscale_all_dim": st.floats(0.0, 2.0),
    "type": st.just("yarn"),
})  # {"type": "default"} alone means plain RoPE; an empty block is V3-style YaRN
BAD_ROPE_SCALING = st.sampled_from([
    [40.0], "yarn", 4, {"type": "linear"}, {"rope_type": "linear"}, {"rope_theta": 1e4},
    {"factor": 0.5}, {"factor": NAN}, {"beta_fast": INF}, {"beta_slow": 0.0},
    {"beta_fast": 1.0, "beta_slow": 2.0}, {"mscale_all_dim": -1.0}, {"mscale_all_dim": 1e200},
    {"mscale": "1"}, {"original_max_position_embeddings": 0}])

FIELDS = {
    "vocab_size": count(1, 96),
    "hidden_size": count(1, 48),
    "intermediate_size": count(1, 64),
    "moe_intermediate_size": count(1, 32),
    "num_hidden_layers": count(1, 3),
    "first_k_dense_replace": count(0, 2),
    "num_attention_heads": count(1, 4),
    "q_lora_rank": count(0, 24),
    "kv_lora_rank": count(1, 24),
    "qk_nope_head_dim": count(1, 16),
    "qk_rope_head_dim": (count(1, 16)[0], st.sampled_from([0, 3, 2.0])),  # RoPE pairs
    "v_head_dim": count(1, 16),
    "n_shared_experts": count(0, 2),
    "n_routed_experts": count(1, 16),
    "num_experts_per_tok": count(1, 4),
    "n_group": count(1, 4),
    "topk_group": count(1, 4),
    "routed_scaling_factor": number(0.1, 10.0, [0.0, -1.0, 1e39]),
    "scoring_func": choice(["sigmoid", "softmax"], ["relu", 1]),
    "topk_method": choice(["noaux_tc", "group_limited_greedy", "greedy"], ["topk", 3]),
    "norm_topk_prob": choice([True, False, None], ["true", 0, 1]),
    "rms_norm_eps": number(1e-8, 1.0, [0.0, -1e-6]),
    "max_position_embeddings": count(1, 64),
    "rope_theta": number(2.0, 1e6, [1.0, 0.5, -1e4]),
    "rope_scaling": (st.none() | ROPE_SCALING, BAD_ROPE_SCALING),
    "num_nextn_predict_layers": count(0, 3),
    "tie_word_embeddings": choice([False], [True, "false"]),
    "initializer_range": number(1e-4, 0.5, [0.0, -0.02, 100.0]),
    "mtp_loss_lambda": number(0.0, 10.0, [-0.1, 1e300]),
    "aux_loss_alpha": number(0.0, 10.0, [-0.1, 1e300]),
    "expert_aux_loss_alpha": number(0.0, 10.0, [-0.1, 1e300]),
}
assert set(FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)}  # none left out
NAMES = st.sampled_from(sorted(FIELDS))
IN_RANGE = st.lists(NAMES, max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: FIELDS[name][0] for name in names}))
ONE_BAD = NAMES.flatmap(lambda name: st.fixed_dictionaries({name: FIELDS[name][1] | WRONG_KINDS}))
CHANGES = st.builds(lambda good, bad: {**good, **bad}, IN_RANGE, st.just({}) | ONE_BAD)

FIELD_NAMES = {f.name for f in dataclasses.fields(ModelConfig)} | {
    f"rope_scaling.{key}" for key in ROPE_SCALING_KEYS}


def build_and_run(changes: dict) -> str:
    """'refused' (a ValueError naming the field first) or 'built' (finite forward)."""
    try:
        cfg = ModelConfig.preset("tiny", **changes)
    except ValueError as e:
        named = re.match(r"([a-z_.]+)[=:]", str(e))
        assert named and named.group(1) in FIELD_NAMES, f"{changes}: {e}"
        return "refused"
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    T = min(cfg.max_position_embeddings, 8)
    tokens = torch.randint(0, cfg.vocab_size, (2, T))
    targets = tokens.roll(-1, 1) if T > cfg.num_nextn_predict_layers else None  # MTP needs T > D
    out = model(tokens, targets)
    assert torch.isfinite(out.logits).all(), changes
    assert targets is None or torch.isfinite(out.loss), changes
    return "built"


def test_every_config_builds_a_finite_model_or_names_the_field():
    outcomes = Counter()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(CHANGES)
    def check(changes):
        outcomes[build_and_run(changes)] += 1

    check()
    # Both outcomes are exercised often, so the property says something about each.
    assert outcomes["built"] >= 60 and outcomes["refused"] >= 60, outcomes
