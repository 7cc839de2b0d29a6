import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minidsv3 import DeepSeekV3, ModelConfig
from minidsv3.mtp import mtp_inputs


def test_alignment_of_depth_k():
    stream = torch.arange(100, 112)[None]  # t_1 .. t_12
    tokens, targets = stream[:, :10], stream[:, 1:11]
    h = torch.arange(10.0)[None, :, None]  # h^0_i carries its position i
    for k in (1, 2):
        h_in, ahead, tgt = mtp_inputs(tokens, targets, h[:, : 11 - k], k)
        assert h_in.shape[1] == ahead.shape[1] == tgt.shape[1] == 10 - k
        # position i combines h_i with token t_{i+k} and predicts t_{i+k+1}
        assert torch.equal(ahead, tokens[:, :10 - k] + k)
        assert torch.equal(tgt, tokens[:, :10 - k] + k + 1)
        assert torch.equal(h_in[0, :, 0], torch.arange(10.0 - k))


def test_mtp_loss_written_out_by_position():
    """Recompute CE_1 position by position from a raw token stream (no shared helpers)."""
    cfg = ModelConfig.preset("tiny")
    model = DeepSeekV3(cfg)
    for p in model.mtp.parameters():
        p.data.normal_(0, 0.2)
    stream = torch.randint(0, cfg.vocab_size, (2, 13))
    tokens, targets = stream[:, :12], stream[:, 1:13]
    out = model(tokens, targets=targets)
    m, d = model.mtp[0], cfg.hidden_size
    h0 = out.hidden  # (B, 12, d)
    # eh_proj over [emb; hidden]: the first d input columns act on the embedding
    w_e, w_h = m.eh_proj.weight[:, :d], m.eh_proj.weight[:, d:]
    merged = torch.stack([
        m.enorm(model.embed_tokens(stream[:, i + 1])) @ w_e.T + m.hnorm(h0[:, i]) @ w_h.T
        for i in range(11)
    ], dim=1)  # (B, 11, d): position i sees t_{i+1} and predicts t_{i+2}
    h1, _ = m.block(merged, model.freqs_cis[:11])
    logits = model.lm_head(m.norm(h1))
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), stream[:, 2:13].reshape(-1))
    assert_close(out.mtp_ce[0], expected)
    assert_close(out.mtp, cfg.mtp_loss_lambda * expected)


def test_lambda_over_depth_weighting():
    cfg = ModelConfig.preset("tiny", num_nextn_predict_layers=2, mtp_loss_lambda=0.5)
    model = DeepSeekV3(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(tokens, targets=torch.roll(tokens, -1, 1))
    assert len(out.mtp_ce) == 2
    assert_close(out.mtp, 0.5 / 2 * (out.mtp_ce[0] + out.mtp_ce[1]))
    assert_close(out.loss, out.ce + out.mtp + out.balance)
