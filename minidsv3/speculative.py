"""Speculative decoding with the MTP modules as the drafter (V3 report sec. 5.4.3).

Depth k of MTP reads h^{k-1}_i and the embedding of t_{i+k} and predicts t_{i+k+1}
(``mtp.py``). At decode time, with committed tokens t_0..t_m and the main model's
h^0 known up to position m-1, one *draft* runs each depth at position m-1:

    depth 1:  (h^0_{m-1}, t_m)          -> draft t_{m+1}
    depth 2:  (h^1_{m-1}, t_{m+1})      -> draft t_{m+2}      (uses depth 1's draft)
    ...

The main model then *verifies* [t_m, drafts...] in one forward at positions m..m+D,
which yields its own distribution p at every drafted position. Standard speculative
sampling (Leviathan et al. 2023; Chen et al. 2023) keeps draft j with probability
min(1, p_j(x)/q_j(x)); the first rejected draft is replaced by a sample from
norm(max(0, p_j - q_j)); if every draft is kept, p at the last position gives one
more token for free. The output then follows the main model exactly -- and with
greedy (one-hot) distributions it *is* plain greedy decoding.

Each MTP depth has its own block and cache. Depth k at position i is final once
t_{i+k} is committed; positions computed from a draft are recomputed next round by
simply writing the cache from the first non-final position again.
"""

from __future__ import annotations

import torch

from .mla import AttnMode, MLACache
from .model import DeepSeekV3


class MTPDrafter:
    """Drafts with the MTP modules, keeping their caches and inputs in step with decoding."""

    def __init__(self, model: DeepSeekV3, caches: list[MLACache], max_len: int,
                 attn_mode: AttnMode = "absorbed"):
        if len(caches) != len(model.mtp):
            raise ValueError(f"need one cache per MTP depth ({len(model.mtp)}), got {len(caches)}")
        self.model, self.caches, self.attn_mode = model, caches, attn_mode
        w = model.embed_tokens.weight
        # hidden[k][:, i] = h^k_i (k = 0: the main model's last block, before its final norm).
        self.hidden = [w.new_zeros(1, max_len, model.cfg.hidden_size)
                       for _ in range(len(model.mtp) + 1)]
        # Depth k+1's cache and hidden states are final for positions < final[k].
        self.final = [0] * len(model.mtp)

    def keep_main_hidden(self, h: torch.Tensor, start: int) -> None:
        """Record the main model's h^0 (1, T, d) for positions start..start+T-1."""
        self.hidden[0][:, start:start + h.shape[1]] = h

    @torch.no_grad()
    def draft(self, tokens: list[int], n_draft: int, sampler) -> tuple[list[int], torch.Tensor]:
        """Draft ``n_draft`` tokens after ``tokens`` (t_0..t_m); h^0 must be known up to m-1.

        Returns the drafts and their distributions q (n_draft, V). Depth k first
        catches up on the positions it has not finalised yet (the whole prompt on the
        first call), all in one forward that ends at position m-1.
        """
        model = self.model
        m = len(tokens) - 1
        seq = list(tokens)  # grows by one draft per depth: t_0..t_{m+k-1} at depth k
        q = []
        for k in range(1, n_draft + 1):
            module, lo = model.mtp[k - 1], self.final[k - 1]
            # Positions i = lo..m-1 pair h^{k-1}_i with t_{i+k}.
            ahead = torch.tensor([seq[lo + k: m + k]], device=self.hidden[0].device)  # (1, m-lo)
            h, _ = module(self.hidden[k - 1][:, lo:m], model.embed_tokens(ahead),
                          model.freqs_cis[lo:m], lo, self.caches[k - 1], self.attn_mode)
            self.hidden[k][:, lo:m] = h  # (1, m-lo, d)
            # t_{i+k} is committed for i <= m-k; later positions used a draft.
            self.final[k - 1] = m - k + 1
            q_k = sampler.probs(model.lm_head(module.norm(h[:, -1])))  # (1, V)
            seq.append(sampler.draw(q_k[0]))
            q.append(q_k)
        return seq[m + 1:], torch.cat(q)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                       sampler) -> tuple[int, int]:
    """Verify drafts against the main model: (number of drafts kept, the next token).

    p (d+1, V): the main model's distributions at the d+1 verified positions.
    q (d, V):   the drafter's distributions for the d drafts (None when d = 0).
    """
    for j, x in enumerate(drafts):
        ratio = float(p[j, x] / q[j, x])  # q[j, x] > 0: x was drawn from q_j
        if ratio >= 1 or (ratio > 0 and sampler.uniform() < ratio):
            continue  # accepted with probability min(1, p/q)
        residual = (p[j] - q[j]).clamp(min=0)
        if residual.sum() <= 0:  # p == q up to rounding: nothing left to correct
            residual = p[j]
        return j, sampler.draw(residual / residual.sum())
    return len(drafts), sampler.draw(p[len(drafts)])
