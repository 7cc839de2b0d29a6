"""Exercise set 05: multi-token prediction.

Target alignment of depth k, the merge of embedding and hidden state, and the
lambda-weighted loss; the notebook asks for them in the reverse order, the alignment last as
the open task. References: ``minidsv3.mtp`` (mtp_inputs, MTPModule, mtp_loss).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..mtp import MTPModule, mtp_inputs, mtp_loss
from .compare import expect_close, expect_equal, expect_tuple
from .core import Fail, call, task

SET = "05_mtp"


@task(SET, "mtp_inputs", references=[mtp_inputs], hints=[
    "Depth k predicts t_{i+k+1}, and the window's last target is t_{T+1}: so i runs over "
    "1 .. T - k, T - k positions.",
    "At position i it combines h^{k-1}_i with the embedding of t_{i+k}: tokens[:, k:].",
    "It predicts t_{i+k+1}, which is targets[:, k:] (targets are the tokens shifted by one); "
    "h_prev keeps its first T - k positions: h_prev[:, :T - k].",
])
def check_mtp_inputs(fn) -> int:
    gen = torch.Generator().manual_seed(14)
    B, T, d = 2, 8, 4
    stream = torch.randint(0, 1000, (B, T + 1), generator=gen)
    tokens, targets = stream[:, :-1], stream[:, 1:]  # t_1..t_T and t_2..t_{T+1}
    for k in (1, 2, 3):
        h_prev = torch.randn(B, T - k + 1, d, generator=gen)  # depth k-1 has T-k+1 positions
        case = f"depth k={k}, T={T}, h_prev with {T - k + 1} positions"
        got = call(fn, tokens.clone(), targets.clone(), h_prev.clone(), k, case=case)
        h, ahead, tgt = expect_tuple(got, ["h", "ahead", "targets"], "result")
        h_ref, ahead_ref, tgt_ref = mtp_inputs(tokens, targets, h_prev, k)
        for name, value in (("h", h), ("ahead", ahead), ("targets", tgt)):
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] != T - k:
                raise Fail(f"{name}: {value.shape[1]} positions; depth {k} has T - k = {T - k} "
                           f"(case: {case})")
        expect_close(h, h_ref, "h", case, variants=[
            (h_prev[:, 1:], "took the last T - k positions of h_prev; position i pairs with "
                            "t_{i+k}, so keep the first T - k: h_prev[:, :T - k]"),
        ])
        expect_equal(ahead, ahead_ref, "ahead", case, variants=[
            (tokens[:, k - 1:T - 1], "off by one position: depth k embeds t_{i+k}, "
                                     "tokens[:, k:], not t_{i+k-1}"),
            (targets[:, k - 1:T - 1], "off by one position: depth k embeds t_{i+k}, "
                                      "tokens[:, k:]"),
        ])
        expect_equal(tgt, tgt_ref, "targets", case, variants=[
            (ahead_ref, "the targets are the very tokens you embed: depth k predicts the next "
                        "one, t_{i+k+1} = targets[:, k:]"),
            (targets[:, k - 1:T - 1], "off by one position: depth k predicts t_{i+k+1}, "
                                      "targets[:, k:]"),
        ])
    return 3


@task(SET, "mtp_combine", references=[MTPModule.forward], hints=[
    "Normalise each input with its own RMSNorm: x * rsqrt(mean(x^2) + eps) * weight; enorm's "
    "weight for the embedding, hnorm's for h_prev.",
    "Concatenate along the last axis with the embedding *first*: [emb; h] is (B, T, 2d).",
    "Project back to d with M_k: merged @ eh_proj_weight.T.",
])
def check_mtp_combine(fn) -> int:
    gen = torch.Generator().manual_seed(15)
    shapes = [(2, 5, 6), (1, 1, 10)]  # (B, T', d)
    for B, T, d in shapes:
        cfg = ModelConfig.preset("tiny", hidden_size=d)
        m = MTPModule(cfg, nn.Identity())
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (p.dim() == 1))
        h, e = torch.randn(B, T, d, generator=gen) * 3, torch.randn(B, T, d, generator=gen)
        ew, hw, W = (t.detach() for t in (m.enorm.weight, m.hnorm.weight, m.eh_proj.weight))
        case = f"B={B}, T'={T}, d={d}, random norm weights"
        got = call(fn, h.clone(), e.clone(), ew.clone(), hw.clone(), W.clone(),
                   cfg.rms_norm_eps, case=case)
        if isinstance(got, torch.Tensor) and got.shape[-1] == 2 * d:
            raise Fail(f"merged: the result is the (B, T', 2d) concatenation; project it with "
                       f"eh_proj (merged @ eh_proj_weight.T) (case: {case})")
        with torch.no_grad():
            expected = m.eh_proj(torch.cat([m.enorm(e), m.hnorm(h)], dim=-1))
            swapped = m.eh_proj(torch.cat([m.hnorm(h), m.enorm(e)], dim=-1))
            raw = m.eh_proj(torch.cat([e, h], dim=-1))
            crossed = m.eh_proj(torch.cat([m.hnorm(e), m.enorm(h)], dim=-1))
        expect_close(got, expected, "merged", case, variants=[
            (swapped, "concatenation order: the embedding comes first, [RMSNorm(Emb(t_{i+k})); "
                      "RMSNorm(h)], as the released eh_proj expects"),
            (raw, "RMSNorm missing: normalise the embedding (enorm) and h_prev (hnorm) before "
                  "concatenating"),
            (crossed, "enorm and hnorm swapped: enorm normalises the embedding, hnorm h_prev"),
        ])
    return len(shapes)


@task(SET, "mtp_loss", references=[mtp_loss], hints=[
    "D is the number of depths: len(ce_per_depth).",
    "L_MTP = lam / D * (CE_1 + ... + CE_D); keep it a tensor (torch.stack(...).sum()) so the "
    "gradient flows.",
])
def check_mtp_loss(fn) -> int:
    gen = torch.Generator().manual_seed(16)
    cases = [([2.0], 0.3), ([2.0, 3.0], 0.3), (torch.rand(3, generator=gen).tolist(), 0.1)]
    for values, lam in cases:
        ces = [torch.tensor(v, requires_grad=True) for v in values]
        case = f"D={len(values)}, CE={[round(v, 3) for v in values]}, lambda={lam}"
        expected = mtp_loss([c.detach() for c in ces], lam)
        got = call(fn, ces, lam, case=case)
        total = sum(values)
        expect_close(got, expected, "L_MTP", case, rtol=1e-6, variants=[
            (torch.tensor(lam * total), "forgot to divide by D (the number of depths)"),
            (torch.tensor(total / len(values)), "forgot to multiply by lambda"),
            (torch.tensor(lam * values[0]), "used only the first depth; sum over all D"),
        ])
        if not (isinstance(got, torch.Tensor) and got.requires_grad):
            raise Fail("L_MTP has no gradient: combine the CE tensors with torch ops, not "
                       f".item() or float() (case: {case})")
    return len(cases)
