"""Exercise set 06: the training recipe.

Which parameters AdamW decays, the warm-up + cosine learning-rate schedule, and the
auxiliary-loss-free bias update of one optimizer step (after ``optimizer.step()``, from
the loads of all micro-batches and ranks). References: ``minidsv3.train_setup``
(param_groups, lr_factor), ``minidsv3.train.train_step`` and ``minidsv3.moe``
(MoE.update_bias).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import RMSNorm
from ..model import DeepSeekV3
from ..moe import MoE
from ..train import train_step
from ..train_setup import lr_factor, param_groups
from .compare import expect_close
from .core import Fail, call, task

SET = "06_training"
TINY = ModelConfig.preset("tiny")


# ---------------------------------------------------------------------------------
# Task 1: param_groups
# ---------------------------------------------------------------------------------
class _Small(nn.Module):
    """Every kind of parameter in a few lines: a 1-D bias that is no norm, a frozen matrix."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6, bias=True)  # proj.bias: 1-D, not a norm
        self.norm = RMSNorm(6)
        self.frozen = nn.Linear(6, 6, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.register_buffer("e_score_correction_bias", torch.zeros(6))


def _labelled(model: nn.Module) -> nn.Module:
    """Fill tensor k (parameters, then buffers) with the value k + 1, and return the model.

    The grader runs the student's function in the notebook's kernel and gets back copies
    of the tensors it returned, so a returned tensor is recognised by its value, not by its
    identity. (param_groups only looks at names, shapes and requires_grad.)"""
    with torch.no_grad():
        for k, (_, t) in enumerate(_tensors(model)):
            t.fill_(k + 1)
    return model


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _decay_of(groups, model: nn.Module, case: str) -> dict[str, float]:
    """Parameter name -> the weight_decay of its group; Fail on a malformed grouping."""
    label = {k + 1: name for k, (name, _) in enumerate(_tensors(model))}
    shapes = {name: t.shape for name, t in _tensors(model)}
    params = dict(model.named_parameters())
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
        raise Fail(f"return a list of dicts, one per group, each {{'params': [...], "
                   f"'weight_decay': wd}}; got {type(groups).__name__} (case: {case})")
    decay: dict[str, float] = {}
    for i, group in enumerate(groups):
        if "params" not in group or "weight_decay" not in group:
            raise Fail(f"group {i} needs the keys 'params' and 'weight_decay' (without one, "
                       f"AdamW would use its default weight_decay=0.01) (case: {case})")
        for t in list(group["params"]):
            name = None
            if isinstance(t, torch.Tensor) and t.numel():
                name = label.get(int(t.detach().flatten()[0].real.round()))
            if name is None or t.shape != shapes[name]:
                raise Fail(f"group {i} holds something that is not a tensor of the model "
                           f"(case: {case})")
            if name not in params:
                raise Fail(f"'{name}' is a buffer, not a parameter; the routing bias "
                           "e_score_correction_bias is one, moved by the sign rule after each "
                           "step, never by the optimizer. Take the tensors from "
                           f"model.parameters(), not state_dict() or buffers() (case: {case})")
            t = params[name]
            if not t.requires_grad:
                raise Fail(f"'{name}' is frozen (requires_grad=False): leave it out of the "
                           f"optimizer (case: {case})")
            if name in decay:
                raise Fail(f"'{name}' is in two groups: put each parameter in exactly one "
                           f"(case: {case})")
            decay[name] = float(group["weight_decay"])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in decay]
    if missing:
        raise Fail(f"'{missing[0]}' is in no group: every trainable parameter goes into "
                   f"exactly one (case: {case})")
    return decay


def _diagnose_decay(got: dict[str, float], expected: dict[str, float], model: nn.Module,
                    wd: float, case: str) -> None:
    wrong = [n for n in expected if not math.isclose(got[n], expected[n])]
    if not wrong:
        return
    embeddings = {f"{m}.weight" for m, mod in model.named_modules()
                  if isinstance(mod, nn.Embedding)}
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, RMSNorm)}
    if all(math.isclose(v, wd) for v in got.values()):
        raise Fail("decays everything: norm weights, biases and every other 1-D parameter "
                   f"(p.dim() < 2) get weight_decay 0 (case: {case})")
    if all(v == 0 for v in got.values()):
        raise Fail(f"decays nothing: every matrix (p.dim() >= 2) gets weight_decay={wd} "
                   f"(case: {case})")
    for name in wrong:
        if name in embeddings:
            raise Fail(f"the embedding '{name}' got weight_decay {got[name]}: this package "
                       "decays every matrix, the embedding included (p.dim() >= 2) "
                       f"(case: {case})")
        if name in norms:
            raise Fail(f"decays the RMSNorm weight '{name}': a norm's gain is 1-D and gets "
                       "weight_decay 0 (decay would pull it, and the activations, towards 0) "
                       f"(case: {case})")
    p = dict(model.named_parameters())[wrong[0]]
    raise Fail(f"'{wrong[0]}' ({p.dim()}-D) got weight_decay {got[wrong[0]]}, expected "
               f"{expected[wrong[0]]}: decay exactly the parameters with p.dim() >= 2, with "
               f"weight_decay={wd} (case: {case})")


@task(SET, "param_groups", references=[param_groups], hints=[
    "Two groups for torch.optim.AdamW: [{'params': [...], 'weight_decay': wd}, "
    "{'params': [...], 'weight_decay': 0.0}]. Only trainable parameters "
    "(p.requires_grad) go in.",
    "The rule is the dimension: p.dim() >= 2 (weight matrices and the embedding) decay; "
    "p.dim() < 2 (RMSNorm weights, biases) do not. The routing bias "
    "e_score_correction_bias is a buffer, so model.parameters() never yields it.",
])
def check_param_groups(fn) -> int:
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random state alone
        cases = [(_labelled(_Small()), 0.1, "a small module: embedding, linear with a bias, "
                                            "RMSNorm, a frozen linear, a buffer"),
                 (_labelled(DeepSeekV3(TINY)), 0.1, "the tiny DeepSeekV3 (routing biases are "
                                                    "buffers)"),
                 (_labelled(DeepSeekV3(TINY)), 0.05, "the tiny DeepSeekV3, weight_decay=0.05")]
    for model, wd, case in cases:
        expected = _decay_of(param_groups(model, wd), model, case)
        got = _decay_of(call(fn, model, wd, case=case), model, case)
        _diagnose_decay(got, expected, model, wd, case)
    return len(cases)


# ---------------------------------------------------------------------------------
# Task 2: lr_at
# ---------------------------------------------------------------------------------
def _schedule(steps, warmup: int, total: int, min_ratio: float, *, first: int = 1,
              cosine_from: int | None = None, clamp: bool = True,
              shape=lambda t: 0.5 * (1 + math.cos(math.pi * t))) -> torch.Tensor:
    """The factor schedule with one mistake or another, for the diagnoses."""
    start = warmup if cosine_from is None else cosine_from
    out = []
    for s in steps:
        if s < warmup:
            out.append((s + first) / warmup)
            continue
        t = (s - start) / max(1, total - start)
        out.append(min_ratio + (1 - min_ratio) * shape(min(1.0, t) if clamp else t))
    return torch.tensor(out, dtype=torch.float64)


@task(SET, "lr_at", references=[lr_factor], hints=[
    "`step` counts the optimizer steps taken before this one: the first step is step 0. "
    "While step < warmup the lr rises linearly and reaches peak at step warmup - 1: "
    "peak * (step + 1) / warmup.",
    "After the warm-up, progress = (step - warmup) / (total - warmup), capped at 1 (use "
    "max(1, total - warmup) so it never divides by 0).",
    "lr = peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress))): peak at "
    "progress 0, min_ratio * peak from step total on.",
])
def check_lr_at(fn) -> int:
    cases = [(3e-4, 10, 100, 0.1, range(0, 121)), (1e-3, 0, 50, 0.1, range(0, 61)),
             (1.0, 4, 20, 0.0, range(0, 25))]
    for peak, warmup, total, min_ratio, steps in cases:
        _check_lr(fn, peak, warmup, total, min_ratio, steps)
    return len(cases)


def _check_lr(fn, peak: float, warmup: int, total: int, min_ratio: float, steps) -> None:
    case = f"peak={peak}, warmup={warmup}, total={total}, min_ratio={min_ratio}"
    got = [call(fn, s, peak, warmup, total, min_ratio, case=f"step {s}, {case}") for s in steps]
    if not all(isinstance(v, (int, float, torch.Tensor)) for v in got):
        raise Fail(f"lr: return a number (the lr of that step), got {type(got[0]).__name__} "
                   f"(case: {case})")
    got = torch.tensor([float(v) for v in got], dtype=torch.float64)
    expected = peak * torch.tensor([lr_factor(s, warmup, total, min_ratio) for s in steps],
                                   dtype=torch.float64)

    def sched(**mistake) -> torch.Tensor:  # the lr per step with one mistake
        exact = {"warmup": warmup, "total": total, "min_ratio": min_ratio}
        return peak * _schedule(steps, **{**exact, **mistake})

    expect_close(got, expected, "lr per step", case, rtol=1e-6, atol=1e-12, variants=[
        (sched(min_ratio=0.0), "cosine decays to 0; it ends at min_ratio * peak: "
                               "min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress))"),
        (sched(first=0), "warm-up off by one: step 0 (the first optimizer step) gets "
                         "peak / warmup, not 0, and step warmup - 1 the full peak: "
                         "(step + 1) / warmup"),
        (sched(cosine_from=0), "the cosine starts at step 0, so the warm-up eats into it: it "
                               "starts after the warm-up, progress = (step - warmup) / "
                               "(total - warmup)"),
        (sched(clamp=False), "after step total the lr rises again: cap progress at 1, so the "
                             "lr stays at min_ratio * peak"),
        (sched(shape=lambda t: 1 - t), "linear decay: after the warm-up the lr follows half a "
                                       "cosine, 0.5 * (1 + cos(pi * progress))"),
    ])


# ---------------------------------------------------------------------------------
# Task 3: bias_after_step
# ---------------------------------------------------------------------------------
def _step(load: torch.Tensor, gamma: float) -> torch.Tensor:
    """The sign rule's change of the bias for expert loads ``load`` (E,)."""
    return gamma * torch.sign(load.mean() - load)


def _package_update(bias: torch.Tensor, loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """The package's arithmetic: forward() adds every micro-batch's counts into the MoE's
    expert_load buffer, train_step all-reduces them over ranks, then update_bias."""
    moe = MoE(TINY.replace(n_routed_experts=bias.shape[0], n_group=1, topk_group=1,
                           num_experts_per_tok=1))
    moe.gate.e_score_correction_bias.copy_(bias)
    moe.update_bias(gamma, loads.sum(dim=(0, 1)))
    return moe.gate.e_score_correction_bias.clone()


def _train_step_case(gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bias before, loads (1, 2, E), bias after) of the first MoE layer in one real
    train_step of the tiny model with 2 micro-batches (gradient accumulation 2)."""
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random state alone
        torch.manual_seed(6)
        model = DeepSeekV3(TINY)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        moe = model.moe_layers()[0]
        moe.gate.e_score_correction_bias.copy_(torch.randn(TINY.n_routed_experts) * 0.01)
        before = moe.gate.e_score_correction_bias.clone()
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        seen = []

        def forward(x, y):  # records each micro-batch's load of that layer
            out = model(x, y)
            seen.append(out.router[0].load.clone())
            return out

        batches = []
        for _ in range(2):
            x = torch.randint(0, TINY.vocab_size, (4, 16))
            batches.append((x, torch.roll(x, -1, dims=1)))
        args = argparse.Namespace(grad_clip=1.0, balance="aux-free", bias_gamma=gamma)
        train_step(model, forward, optimizer, scheduler, batches, args, world=1)
        return before, torch.stack(seen)[None], moe.gate.e_score_correction_bias.clone()


@task(SET, "bias_after_step", references=[MoE.update_bias, train_step], hints=[
    "loads[r, m] counts the tokens each expert received on rank r in micro-batch m of ONE "
    "optimizer step. The bias moves once per step, not once per micro-batch.",
    "Sum over ranks and micro-batches first: load = loads.sum(dim=(0, 1)), shape (E,). "
    "(The mean would do as well: the sign does not care about the scale.)",
    "Then the sign rule once: bias + gamma * torch.sign(load.mean() - load).",
])
def check_bias_after_step(fn) -> int:
    gen = torch.Generator().manual_seed(60)
    # Micro-batch 0 overloads expert 0, micro-batch 1 expert 1: per micro-batch the
    # signs differ from those of the step's total, so an update per micro-batch shows.
    two_micro = torch.tensor([[[10.0, 0, 5, 5], [0, 6, 5, 5]]])
    two_ranks = torch.tensor([[[9.0, 1, 3, 3], [8, 2, 3, 3]], [[0, 6, 5, 5], [1, 7, 4, 4]]])
    cases = [("1 rank, 2 micro-batches", torch.zeros(4), two_micro, 0.01),
             ("2 ranks x 2 micro-batches", torch.tensor([0.02, -0.01, 0.0, 0.01]), two_ranks,
              0.001),
             ("2 ranks x 4 micro-batches, random loads", torch.randn(16, generator=gen) * 0.01,
              torch.randint(0, 30, (2, 4, 16), generator=gen).float(), 0.001)]
    for case, bias, loads, gamma in cases:
        _check_bias(fn, bias, loads, gamma, _package_update(bias, loads, gamma), case)
    before, loads, after = _train_step_case(0.001)
    _check_bias(fn, before, loads, 0.001, after,
                "the package's train_step on the tiny model, 2 micro-batches")
    return len(cases) + 1


def _check_bias(fn, bias, loads, gamma, expected, case) -> None:
    case = f"{case}, gamma={gamma}"
    got = call(fn, bias.clone(), loads.clone(), gamma, case=case)
    total = loads.sum(dim=(0, 1))
    per_micro = bias + sum(_step(m, gamma) for m in loads.sum(0))  # summed over ranks
    per_rank_micro = bias + sum(_step(m, gamma) for m in loads.flatten(0, 1))
    expect_close(got, expected, "new bias", case, atol=1e-7, variants=[
        (per_micro, "updated once per micro-batch: the bias moves once per optimizer step, "
                    "from the loads summed over all its micro-batches"),
        (per_rank_micro, "updated once per micro-batch and rank: the bias moves once per "
                         "optimizer step, from the loads summed over all micro-batches and "
                         "ranks"),
        (bias + _step(loads[:, -1].sum(0), gamma),
         "used only the last micro-batch's loads: sum over all micro-batches of the step"),
        (bias + _step(loads[0].sum(0), gamma),
         "used only rank 0's loads: sum over the ranks too (train_step all-reduces them), or "
         "every rank would move its copy of the bias differently"),
        (bias - _step(total, gamma),
         "sign flipped: overloaded experts (load above the mean) must get a *lower* bias"),
        (bias + gamma * (total.mean() - total),
         "used gamma * (mean - load); the rule uses only the sign: gamma * sign(mean - load)"),
        (_step(total, gamma), "returned only the step: add it to the old bias"),
    ])
