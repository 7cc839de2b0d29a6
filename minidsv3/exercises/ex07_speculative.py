"""Exercise set 07: generation -- greedy acceptance, top-p, tokens per forward, and the
accept/reject rule of speculative sampling with its residual.

References: ``minidsv3.speculative.accept_or_resample`` with a greedy ``Sampler``
(one-hot distributions turn the accept/reject rule into "keep the longest agreeing
prefix"), ``minidsv3.generate.Sampler.probs`` for the nucleus, and the geometric
series for the expected tokens per verification step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..generate import Sampler
from ..speculative import accept_or_resample
from .compare import expect_close, expect_equal
from .core import Fail, call, task

SET = "07_speculative"


def _reference_accept(draft: torch.Tensor, verified: torch.Tensor) -> torch.Tensor:
    """The package's verification with greedy (one-hot) distributions: kept drafts + 1."""
    V = int(torch.cat([draft, verified]).max()) + 1
    p = F.one_hot(verified, V).float()  # (K+1, V) the main model's choices
    q = F.one_hot(draft, V).float() if len(draft) else None  # (K, V) the drafter's
    kept, token = accept_or_resample(p, q, draft.tolist(), Sampler(temperature=0))
    return torch.tensor(draft.tolist()[:kept] + [token])


@task(SET, "accept_greedy", references=[accept_or_resample], hints=[
    "verified[j] is the main model's greedy token at the position of draft[j]; verified[K] "
    "comes after the last draft.",
    "Find n = the number of leading positions where draft[j] == verified[j]; stop at the first "
    "mismatch ((draft == verified[:K]).long().cumprod(0).sum()).",
    "Return verified[:n + 1]: the n agreed drafts plus the main model's own next token.",
])
def check_accept_greedy(fn) -> int:
    cases = [  # draft (K,), verified (K+1,)
        ("all drafts agree", [5, 6, 7], [5, 6, 7, 8]),
        ("the first draft disagrees", [5, 6, 7], [4, 6, 7, 8]),
        ("agree, disagree, agree", [5, 6, 7], [5, 9, 7, 8]),
        ("two agree, then the last differs", [5, 6, 7], [5, 6, 9, 8]),
        ("no drafts (K = 0)", [], [3]),
    ]
    for case, d, v in cases:
        draft, verified = torch.tensor(d, dtype=torch.long), torch.tensor(v, dtype=torch.long)
        expected = _reference_accept(draft, verified)
        got = call(fn, draft.clone(), verified.clone(), case=case)
        if isinstance(got, (list, tuple)):
            got = torch.tensor(list(got), dtype=torch.long)
        if isinstance(got, torch.Tensor) and got.dim() == 1 and len(got) == 0:
            raise Fail(f"tokens: returned no token; every step yields at least the main model's "
                       f"own next token (case: {case})")
        agree = (draft == verified[: len(d)]).long()
        n_prefix, n_any = int(agree.cumprod(0).sum()), int(agree.sum())
        shifted = (draft[:-1] == verified[1:len(d)]).long().cumprod(0).sum() if d else 0
        expect_equal(got, expected, "tokens", f"{case}: draft {d}, verified {v}", variants=[
            (verified[: n_any + 1], "accepted a draft after the first disagreement: stop at "
                                    "the first mismatch (everything after it was drafted "
                                    "from a wrong token)"),
            (draft[:n_prefix], "forgot the main model's own token: after the n agreed drafts "
                               "append verified[n]"),
            (verified[: int(shifted) + 1], "compared draft[j] with verified[j+1]; verified[j] is "
                                           "the prediction for the same position as draft[j]"),
        ])
    return len(cases)


@task(SET, "top_p_filter", references=[Sampler.probs], hints=[
    "Turn the logits into probabilities (softmax) and sort them in descending order.",
    "A token stays if the mass of the tokens ranked *above* it is still below p "
    "(cumsum - prob < p): so the token that crosses p stays, and the top token always stays.",
    "Set the dropped tokens' logits to -inf (scatter the sorted mask back to the original "
    "order) and keep the others unchanged.",
])
def check_top_p_filter(fn) -> int:
    gen = torch.Generator().manual_seed(17)
    cases = [(0.9, (20,)), (0.5, (20,)), (0.01, (20,)), (0.95, (4, 50))]
    for p, shape in cases:
        logits = torch.randn(shape, generator=gen) * 2
        case = f"p={p}, logits of shape {shape}"
        rows = logits.reshape(-1, shape[-1])
        kept = (Sampler(temperature=1.0, top_p=p).probs(rows) > 0).reshape(shape)
        got = call(fn, logits.clone(), p, case=case)
        if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
            shape_got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise Fail(f"filtered logits: expected shape {shape}, got {shape_got} (case: {case})")
        mine = torch.isfinite(got)
        if torch.equal(mine, kept):
            finite = got.masked_fill(~mine, 0.0)
            expect_close(finite, logits.masked_fill(~kept, 0.0), "kept logits", case)
            continue
        if mine.all():
            raise Fail(f"no token was dropped: set the logits outside the nucleus to -inf "
                       f"(case: {case})")
        if not mine.any(-1).all():
            raise Fail(f"a row keeps no token at all; the most likely token always stays "
                       f"(case: {case})")
        sorted_p, order = logits.softmax(-1).sort(-1, descending=True)
        below = torch.zeros_like(kept).scatter(-1, order, sorted_p.cumsum(-1) <= p)
        if torch.equal(mine, below):
            raise Fail(f"dropped the token that crosses p: keep the smallest set whose mass "
                       f"*reaches* p (the mass above a kept token is < p) (case: {case})")
        row = int((mine != kept).reshape(-1, shape[-1]).any(-1).nonzero()[0])
        r_m, r_k = mine.reshape(-1, shape[-1])[row], kept.reshape(-1, shape[-1])[row]
        top = [round(x, 3) for x in sorted_p.reshape(-1, shape[-1])[row][:5].tolist()]
        raise Fail(f"kept tokens {r_m.nonzero().flatten().tolist()}, expected "
                   f"{r_k.nonzero().flatten().tolist()} (the nucleus of p={p} has "
                   f"{int(r_k.sum())} tokens; the top probabilities are {top}) (case: {case})")
    return len(cases)


@task(SET, "expected_tokens_per_step", hints=[
    "Every verification step yields the main model's own token: that is the 1.",
    "Draft j counts only if drafts 1..j were all accepted: probability alpha ** j.",
    "1 + alpha + alpha**2 + ... + alpha**depth",
])
def check_expected_tokens(fn) -> int:
    cases = [(0.85, 1), (0.9, 2), (0.0, 3), (1.0, 3), (0.5, 4)]
    for alpha, depth in cases:
        case = f"alpha={alpha}, depth={depth}"
        expected = torch.tensor(sum(alpha**j for j in range(depth + 1)), dtype=torch.float64)
        got = call(fn, alpha, depth, case=case)
        expect_close(got, expected, "tokens per step", case, rtol=1e-9, variants=[
            (torch.tensor(1 + depth * alpha), "counted each draft independently: draft j only "
                                              "lands if drafts 1..j-1 did, so it adds alpha ** j"),
            (expected - 1, "forgot the main model's own token: every step yields at least 1"),
        ])
    return len(cases)


class _Replay:
    """A stand-in for ``Sampler``: hands out a fixed uniform and records what is drawn from."""

    def __init__(self, u: float):
        self.u, self.drawn_from = u, None

    def uniform(self) -> float:
        return self.u

    def draw(self, probs: torch.Tensor) -> int:
        self.drawn_from = probs
        return 0


def _reference_residual(p, q, x, u):
    """The package's rule on one draft: (kept?, the distribution a rejection draws from)."""
    replay = _Replay(u)
    kept, _ = accept_or_resample(torch.stack([p, p]), q[None], [x], replay)
    return (True, None) if kept else (False, replay.drawn_from)


@task(SET, "accept_or_residual", references=[accept_or_resample], hints=[
    "The draft is kept when u < p(x) / q(x); a ratio of 1 or more keeps it whatever u is.",
    "Rejected: the replacement comes from what p has and q has not, max(p - q, 0), "
    "divided by its sum so that it is a distribution.",
    "Why it is exact: q(y) min(1, p(y)/q(y)) + P(reject) r(y) = min(p, q) + max(p - q, 0) = p(y).",
])
def check_accept_or_residual(fn) -> int:
    g = torch.Generator().manual_seed(7)
    cases = []
    for seed_case in range(4):  # random p and q over 8 tokens, a draft with p(x) < q(x)
        p, q = torch.rand(8, generator=g), torch.rand(8, generator=g)
        p, q = p / p.sum(), q / q.sum()
        x = int(((p / q) - 0.5).abs().argmin())  # the token whose ratio is nearest 0.5
        ratio = float(p[x] / q[x])
        u = ratio * 0.5 if seed_case % 2 == 0 else min(0.999, ratio + 0.5 * (1 - ratio))
        cases.append((f"random p, q; p(x)/q(x) = {ratio:.2f}, u = {u:.2f}", p, q, x, u))
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    cases += [("p(x) > q(x): always kept", p, q, 0, 0.999),
              ("p(x) = 0: always rejected", p, q, 3, 0.0)]
    for case, p, q, x, u in cases:
        kept, residual = _reference_residual(p, q, x, u)
        got = call(fn, p.clone(), q.clone(), x, u, case=case)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Fail(f"return a pair (kept, residual), got {type(got).__name__} (case: {case})")
        got_kept, got_residual = got
        ratio = float(p[x] / q[x])
        if bool(got_kept) != kept:
            why = ("kept: the ratio is at least 1, so it is kept whatever u is" if ratio >= 1
                   else "kept: u < p(x)/q(x), and a smaller u must make keeping likelier"
                   if kept else "rejected: u >= p(x)/q(x); the ratio is p/q, not q/p")
            raise Fail(f"kept: returned {bool(got_kept)}, but with p(x)/q(x) = {ratio:.3f} and "
                       f"u = {u:.3f} the draft is {why} (case: {case})")
        if kept:
            if got_residual is not None:
                raise Fail(f"residual: a kept draft needs no replacement, return None "
                           f"(case: {case})")
            continue
        left = (p - q).clamp(min=0)
        expect_close(got_residual, residual, "residual", case, variants=[
            (p, "drew the replacement from p itself: subtract q first, max(p - q, 0), or the "
                "tokens the drafter already proposes too often come out too often"),
            (left, "not normalised: divide max(p - q, 0) by its sum"),
            ((q - p).clamp(min=0) / (q - p).clamp(min=0).sum(),
             "took max(q - p, 0): the residual is what p has and q lacks"),
        ])
    return len(cases)
