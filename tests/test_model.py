import pytest
import torch
from torch.testing import assert_close

from minidsv3 import DeepSeekV3, ModelConfig, set_seed
from minidsv3.layers import MLP
from minidsv3.moe import MoE, balance_loss
from minidsv3.scale import module_parameter_counts, parameter_counts


@pytest.fixture(scope="module")
def released_on_meta():
    with torch.device("meta"):
        return DeepSeekV3(ModelConfig.preset("deepseek-v3"))


def test_released_config_parameter_counts(released_on_meta):
    counts = module_parameter_counts(released_on_meta)
    assert counts["weights"] == 671_026_404_352
    assert counts["routing_biases"] == 58 * 256
    assert counts["total"] == 671_026_419_200
    formula = parameter_counts(released_on_meta.cfg)
    assert formula.total == counts["total"] and formula.weights == counts["weights"]
    assert formula.mtp_unique == counts["mtp_unique"]
    assert round(formula.activated / 1e9, 2) == 37.55
    assert round(formula.mtp_unique / 1e9, 1) == 11.6
    assert round(formula.released_with_mtp / 1e9) == 684  # the release's "685B" label


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_formula_equals_module_sums_for_small_presets(preset):
    cfg = ModelConfig.preset(preset, q_lora_rank=0)  # also the no-query-LoRA layout
    counts, formula = module_parameter_counts(DeepSeekV3(cfg)), parameter_counts(cfg)
    assert (formula.weights, formula.routing_biases, formula.mtp_unique) == (
        counts["weights"], counts["routing_biases"], counts["mtp_unique"])


def test_structure_and_checkpoint_names(released_on_meta):
    model = released_on_meta
    assert [isinstance(b.mlp, MLP) for b in model.layers[:4]] == [True, True, True, False]
    assert isinstance(model.mtp[0].block.mlp, MoE)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for key in ["embed_tokens.weight", "layers.0.self_attn.q_a_proj.weight",
                "layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.mlp.gate_proj.weight",
                "layers.3.mlp.gate.e_score_correction_bias",
                "layers.3.mlp.experts.255.down_proj.weight",
                "layers.3.mlp.shared_experts.up_proj.weight", "norm.weight", "lm_head.weight",
                "mtp.0.eh_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight"]:
        assert key in names, key
    assert model.layers[3].self_attn.kv_b_proj.weight.shape == (128 * 256, 512)
    assert model.mtp[0].eh_proj.weight.shape == (7168, 2 * 7168)


def test_every_parameter_gets_a_gradient():
    cfg = ModelConfig.preset("tiny")
    model = DeepSeekV3(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 32))
    out = model(tokens, targets=torch.roll(tokens, -1, 1))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []
    assert model.layers[1].mlp.gate.e_score_correction_bias.grad is None  # a buffer, not trained


def test_loss_parts():
    cfg = ModelConfig.preset("tiny", aux_loss_alpha=0.01, expert_aux_loss_alpha=0.1)
    model = DeepSeekV3(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 16))
    out = model(tokens, targets=torch.roll(tokens, -1, 1))
    assert out.logits.shape == (3, 16, cfg.vocab_size)
    assert len(out.router) == 2  # one main MoE layer + the MTP block
    expected = sum(0.01 * balance_loss(s.scores, s.topk_idx)
                   + 0.1 * balance_loss(s.scores.reshape(1, -1, 8), s.topk_idx.reshape(1, -1, 2))
                   for s in out.router)
    assert_close(out.balance, expected)
    assert_close(out.loss, out.ce + out.mtp + out.balance)


def test_same_seed_same_output():
    cfg = ModelConfig.preset("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    outs = []
    for _ in range(2):
        set_seed(123)
        outs.append(DeepSeekV3(cfg)(tokens, targets=tokens).loss)
    assert torch.equal(outs[0], outs[1])


def test_bad_input_is_refused():
    cfg = ModelConfig.preset("tiny")
    model = DeepSeekV3(cfg)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="LongTensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))
