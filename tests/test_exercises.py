"""Classroom exercises: build sync, specific verdicts for planted mistakes, the grader."""

import csv
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from minidsv3 import ModelConfig, scale
from minidsv3.exercises import TASKS, check, hint, isolation, run_check, tasks_of
from minidsv3.exercises import build as ex_build
from minidsv3.exercises import ex02_mla as ex02
from minidsv3.exercises import grade as ex_grade
from minidsv3.exercises.__main__ import main as cli
from minidsv3.generate import Sampler
from minidsv3.layers import apply_rotary_emb, softmax_scale
from minidsv3.mla import MLA
from minidsv3.moe import Gate, balance_loss, max_violation
from minidsv3.speculative import accept_or_resample

SOLUTIONS = sorted((ex_build.EXERCISES / "solutions").glob("*_solution.ipynb"))


def solution_functions(path):
    """Run a solution notebook's code in this process; return its namespace."""
    namespace = {}
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and not cell.source.startswith("check("):
            exec(compile(cell.source, str(path), "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------------
# One source, two versions
# ---------------------------------------------------------------------------------
def test_student_notebooks_are_in_sync_with_the_solutions():
    assert cli(["build", "--check"]) == 0
    assert [p.stem for p in SOLUTIONS] == [f"{s}_solution" for s in sorted(
        {t.set_id for t in TASKS.values()})]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_are_committed_with_passing_outputs(path):
    nb = nbformat.read(path, as_version=4)
    checks = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("check(")]
    printed = ["".join(o.get("text", "") for o in c.outputs) for c in checks]
    assert len(checks) == len(tasks_of(path.stem.removesuffix("_solution")))
    assert all(text.startswith("✓ ") and "passed" in text for text in printed), printed


def write_nb(path, sources, metadata=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata = metadata or {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                              "language": "python"}}
    nbformat.write(nb, path)


SOLUTION_CELL = '''def mtp_loss(ce_per_depth, lam):
    """lam / D * sum."""
    ### BEGIN SOLUTION
    total = sum(ce_per_depth)
    return lam / len(ce_per_depth) * total
    ### END SOLUTION'''


def test_build_replaces_the_solution_with_a_stub_and_check_notices_edits(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    solution = tmp_path / "solutions" / "05_mtp_solution.ipynb"
    checks = ["check(mtp_inputs)", "check(mtp_combine)", "check(mtp_loss)"]
    write_nb(solution, [SOLUTION_CELL, *checks])
    nb = nbformat.read(solution, as_version=4)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="old output")]
    nb.cells[0].execution_count = 3
    nbformat.write(nb, solution)

    assert cli(["build", "--dir", str(tmp_path)]) == 0
    student = nbformat.read(tmp_path / "05_mtp.ipynb", as_version=4)
    stub = student.cells[0].source
    assert stub.startswith('def mtp_loss(ce_per_depth, lam):\n    """lam / D * sum."""\n')
    assert "sum(ce_per_depth)" not in stub and "SOLUTION" not in stub
    assert '    raise NotImplementedError("mtp_loss: replace this line with your code")' in stub
    assert student.cells[0].outputs == [] and student.cells[0].execution_count is None
    assert [c.source for c in student.cells[1:]] == checks
    assert student.metadata["minidsv3"] == {"exercise_set": "05_mtp"}
    namespace = {}
    exec(stub, namespace)  # the stub is valid Python that raises NotImplementedError
    with pytest.raises(NotImplementedError):
        namespace["mtp_loss"]([torch.tensor(1.0)], 0.3)

    assert cli(["build", "--check", "--dir", str(tmp_path)]) == 0
    student.cells[0].source += "\n# edited by hand"
    nbformat.write(student, tmp_path / "05_mtp.ipynb")
    write_nb(tmp_path / "99_orphan.ipynb", ["x = 1"])
    capsys.readouterr()
    assert cli(["build", "--check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "05_mtp.ipynb: out of sync" in out and "99_orphan.ipynb: no solution" in out


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "inside a function body"),
    ("def f():\n    ### BEGIN SOLUTION\n    return 1", "never closed"),
    ("def f():\n    return 1\n    ### END SOLUTION", "without"),
])
def test_build_rejects_misplaced_markers(source, problem):
    with pytest.raises(ex_build.BuildError, match=problem):
        ex_build.strip_solutions(source, "cell 1")


def test_build_leaves_a_blank_for_a_written_answer():
    source = "**Why?**\n<!-- BEGIN ANSWER -->\nBecause.\n<!-- END ANSWER -->\nNext."
    assert ex_build.strip_answers(source, "cell 1") == "**Why?**\n*Your answer:*\nNext."
    with pytest.raises(ex_build.BuildError, match="never closed"):
        ex_build.strip_answers("<!-- BEGIN ANSWER -->\nBecause.", "cell 1")


def test_build_requires_a_check_cell_for_every_task(tmp_path):
    (tmp_path / "solutions").mkdir()
    write_nb(tmp_path / "solutions" / "05_mtp_solution.ipynb", [SOLUTION_CELL, "check(mtp_loss)"])
    with pytest.raises(ex_build.BuildError, match="'mtp_inputs' .* has no check"):
        ex_build.build(tmp_path)


# ---------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_functions_pass_every_check(path):
    namespace = solution_functions(path)
    for name in tasks_of(path.stem.removesuffix("_solution")):
        verdict = run_check(name, namespace[name])
        assert verdict.status == "pass", verdict.line()


def test_a_stub_reports_not_implemented_without_raising(capsys):
    def stub(*args):
        raise NotImplementedError("gate: replace this line with your code")

    for name in TASKS:
        assert run_check(name, stub).status == "todo"
    check("gate", stub)
    assert capsys.readouterr().out.startswith("… gate: not implemented yet")

    def gate(x, weight, bias, n_group, topk_group, top_k, scale):  # written, but calls a stub
        return group_limited_topk(x, n_group, topk_group, top_k)

    def group_limited_topk(*args):
        raise NotImplementedError("group_limited_topk: replace this line with your code")

    assert run_check("gate", gate).message == (
        "not implemented yet: it calls group_limited_topk, which is still a stub")


def test_an_exception_becomes_a_one_line_verdict(capsys):
    def gate(x, weight, bias, n_group, topk_group, top_k, scale):
        scores = x @ weight  # wrong orientation: (N, d) @ (N_r, d)
        return scores, scores

    check(gate)
    out = capsys.readouterr().out
    assert out.startswith("✗ gate: your function raised RuntimeError: ")
    assert "line 2 of your function: `scores = x @ weight" in out
    assert "Traceback" not in out and out.count("\n") == 1


def test_check_and_hint_explain_wrong_names(capsys):
    def my_gate(x):
        return x

    check(my_gate)
    assert "'my_gate' is not a task name" in capsys.readouterr().out
    check("gate")
    assert "pass your function as well: check('gate', your_function)" in capsys.readouterr().out
    hint("gate")
    assert capsys.readouterr().out.startswith("hint 1/3 for gate: ")
    hint("gate", 3)
    assert "(more" not in capsys.readouterr().out
    hint("gate", 4)
    assert "gate has 3 hints: hint('gate', 1) ... hint('gate', 3)" in capsys.readouterr().out
    hint("gates")
    assert "no task named 'gates'" in capsys.readouterr().out


def test_every_task_has_hints_and_a_planted_mistake():
    assert all(len(t.hints) >= 2 for t in TASKS.values())
    assert {name for name, _, _ in MISTAKES} == set(TASKS)


# Planted mistakes: (task, wrong implementation, words the verdict must contain).
def _halves(x, angles):
    x1, x2 = x.chunk(2, -1)
    c, s = angles.cos()[None, :, None], angles.sin()[None, :, None]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def _rotate_backwards(x, angles):  # (a, b) -> (a cos + b sin, b cos - a sin)
    a, b = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    c, s = angles.cos()[None, :, None], angles.sin()[None, :, None]
    return torch.stack([a * c + b * s, b * c - a * s], -1).flatten(-2)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _topk(biased, n_group, topk_group, top_k, group_score=lambda g: g.topk(2, -1).values.sum(-1)):
    grouped = rearrange(biased, "n (g e) -> n g e", g=n_group)
    keep = group_score(grouped).topk(topk_group, -1).indices
    dropped = torch.ones(grouped.shape[:2], dtype=torch.bool).scatter(1, keep, False)
    grouped = grouped.masked_fill(dropped[..., None], float("-inf"))
    return rearrange(grouped, "n g e -> n (g e)").topk(top_k, -1).indices


def _gate(weights_from="s", normalise=True, scaled=True, select_bias=True):
    def gate(x, weight, bias, n_group, topk_group, top_k, scale):
        s = torch.sigmoid(x @ weight.T)
        idx = _topk(s + bias if select_bias else s, n_group, topk_group, top_k)
        w = (s + bias if weights_from == "biased" else s).gather(1, idx)
        w = w / w.sum(-1, keepdim=True) if normalise else w
        return (w * scale if scaled else w), idx
    return gate


def _combine(shared=True, residual=False):
    def moe_combine(x, weights, idx, experts, shared_expert):
        out = shared_expert(x) if shared else torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(idx.shape[1]):
                out[n] += weights[n, j] * experts[int(idx[n, j])](x[n:n + 1])[0]
        return out + x if residual else out
    return moe_combine


def _balance(normalise=True, pooled=False, detach=False):
    def loss(scores, idx, alpha):
        if pooled:
            scores, idx = scores.flatten(0, 1)[None], idx.flatten(0, 1)[None]
        B, T, E = scores.shape
        counts = torch.stack([torch.bincount(i.flatten(), minlength=E) for i in idx]).float()
        s = scores / scores.sum(-1, keepdim=True) if normalise else scores
        P = s.mean(1).detach() if detach else s.mean(1)
        return alpha * (counts * E / (idx.shape[-1] * T) * P).sum(-1).mean()
    return loss


def _accept(prefix=True, bonus=True):
    def accept_greedy(draft, verified):
        agree = (draft == verified[:len(draft)]).long()
        n = int(agree.cumprod(0).sum() if prefix else agree.sum())
        return verified[:n + 1] if bonus else draft[:n]
    return accept_greedy


def _residual_rule(keep="p/q", residual="normalised"):
    def accept_or_residual(p, q, x, u):
        ratio = float(p[x] / q[x])  # u < 1, so a ratio >= 1 always keeps the draft
        kept = {"p/q": u < ratio, "q/p": u < float(q[x] / max(p[x], 1e-12)),
                "u > ratio": u > ratio}[keep]
        if kept:
            return True, None
        left = {"normalised": (p - q).clamp(min=0), "unnormalised": (p - q).clamp(min=0),
                "p": p, "swapped": (q - p).clamp(min=0)}[residual]
        return False, left if residual == "unnormalised" else left / left.sum()
    return accept_or_residual


def _top_p_strict(logits, p):
    sorted_p, order = logits.softmax(-1).sort(-1, descending=True)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, sorted_p.cumsum(-1) <= p)
    return logits.masked_fill(~keep, float("-inf"))


def _ramp(clamp=True, reverse=False, guard=True):
    def yarn_ramp(low, high, n):
        high = high + 0.001 if guard and low == high else high
        r = (torch.arange(n, dtype=torch.float64) - low) / (high - low)
        r = r.clamp(0, 1) if clamp else r
        return 1 - r if reverse else r
    return yarn_ramp


def _yarn(blend):
    def yarn_inv_freq(inv, s, low, high):
        r = _ramp()(low, high, len(inv))
        return blend(inv, s, r)
    return yarn_inv_freq


def _scale(squared=True, always=False):
    def softmax_scale(nope, rope, factor, msc, max_len, orig):
        m = 0.1 * msc * math.log(factor) + 1 if factor > 1 else 1.0
        use = always or max_len > orig
        return (nope + rope) ** -0.5 * ((m * m if squared else m) if use else 1.0)
    return softmax_scale


def _compress(norm=True, rope=True, swap=False):
    def compress_kv(h, w, norm_w, freqs, d_c, eps):
        d_r = w.shape[0] - d_c
        out = h @ w.T
        if swap:  # believes the RoPE key comes first
            pe, c = out.split([d_r, d_c], -1)
        else:
            c, pe = out.split([d_c, d_r], -1)
        c = _rms(c, norm_w, eps) if norm else c
        pe = apply_rotary_emb(pe.unsqueeze(2), freqs).squeeze(2) if rope else pe
        return c, pe
    return compress_kv


def _scores(scale_it=True, rope=True, layout="b h t s"):
    def absorbed_scores(q, q_pe, c, k_pe, w_uk, scale):
        s = einsum(einsum(q, w_uk, "b t h d, h d c -> b t h c"), c, f"b t h c, b s c -> {layout}")
        if rope:
            s = s + einsum(q_pe, k_pe, f"b t h r, b s r -> {layout}")
        return s * scale if scale_it else s
    return absorbed_scores


def _cache(rope=True, bytes_=True, raises=True):
    def cache_bytes_per_token(cfg, mode, b=2):
        if mode == "absorbed":
            n = cfg.kv_lora_rank + (cfg.qk_rope_head_dim if rope else 0)
        elif mode == "naive" or not raises:
            n = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        else:
            raise ValueError(mode)
        return n * b if bytes_ else n
    return cache_bytes_per_token


def _mla(causal=True, width="qk", mscale="when on", rope_k=True, norm_kv=True,
         kv_rows="per head", w_uv=True, o_proj=True, rope_part=True):
    """absorbed_mla with one mistake; ``width`` names the field the scale is 1/sqrt of."""
    def absorbed_mla(x, w, freqs, cfg):
        H, d_h, d_r, d_v = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                            cfg.qk_rope_head_dim, cfg.v_head_dim)
        eps, T = cfg.rms_norm_eps, x.shape[1]
        c_q = _rms(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], eps)
        q = c_q @ w["q_b_proj.weight"].T
        q_nope, q_pe = rearrange(q, "b t (h d) -> b t h d", h=H).split([d_h, d_r], -1)
        q_pe = apply_rotary_emb(q_pe, freqs)
        c, k_pe = (x @ w["kv_a_proj_with_mqa.weight"].T).split([cfg.kv_lora_rank, d_r], -1)
        c = _rms(c, w["kv_a_layernorm.weight"], eps) if norm_kv else c
        k_pe = apply_rotary_emb(k_pe[:, :, None], freqs)[:, :, 0] if rope_k else k_pe
        if kv_rows == "all heads":
            w_uk, w_v = (rearrange(t, "(h d) c -> h d c", h=H)
                         for t in w["kv_b_proj.weight"].split([H * d_h, H * d_v]))
        else:
            per_head = rearrange(w["kv_b_proj.weight"], "(h d) c -> h d c", h=H)
            w_uk, w_v = per_head.split([d_h, d_v], 1)
            w_uk, w_v = (w_v, w_uk) if kv_rows == "values first" else (w_uk, w_v)
        y = cfg.rope_scaling
        on = y is not None and (mscale == "always" or cfg.max_position_embeddings
                                > y.original_max_position_embeddings)
        m = 0.1 * y.mscale_all_dim * math.log(y.factor) + 1 if on and mscale != "never" else 1.0
        scale = getattr(cfg, f"{width}_head_dim") ** -0.5 * (m if mscale == "once" else m * m)
        s = einsum(einsum(q_nope, w_uk, "b t h d, h d c -> b t h c"), c,
                   "b t h c, b s c -> b h t s")
        if rope_part:
            s = s + einsum(q_pe, k_pe, "b t h r, b s r -> b h t s")
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o = einsum(s.mul(scale).softmax(-1), c, "b h t s, b s c -> b t h c")
        o = rearrange(einsum(o, w_v, "b t h c, h v c -> b t h v") if w_uv else o,
                      "b t h v -> b t (h v)")
        return o @ w["o_proj.weight"].T if o_proj else o
    return absorbed_mla


def _mtp_inputs(ahead_shift=0, targets_from_tokens=False, h_tail=False):
    def mtp_inputs(tokens, targets, h_prev, k):
        T = tokens.shape[1]
        ahead = tokens[:, k - ahead_shift:T - ahead_shift]
        h = h_prev[:, 1:] if h_tail else h_prev[:, :T - k]
        return h, ahead, (tokens if targets_from_tokens else targets)[:, k:]
    return mtp_inputs


def _mtp_combine(order="eh", norm=True):
    def mtp_combine(h, e, ew, hw, W, eps):
        e, h = (_rms(e, ew, eps), _rms(h, hw, eps)) if norm else (e, h)
        return torch.cat([e, h] if order == "eh" else [h, e], -1) @ W.T
    return mtp_combine



def _tiles(block=(1, 128), per_row=False, divide=True, guard=True):
    def quantize_tiles(x):
        rows, cols = (1, x.shape[1]) if per_row else block
        R, C = x.shape
        padded = F.pad(x.float(), (0, -C % cols, 0, -R % rows))
        blocks = rearrange(padded, "(r a) (c b) -> r c a b", a=rows, b=cols)
        amax = blocks.abs().amax(dim=(-2, -1))
        scale = amax / 448 if divide else amax
        if guard:
            scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        q = rearrange(blocks / scale[..., None, None], "r c a b -> (r a) (c b)")[:R, :C]
        return q.to(torch.float8_e4m3fn), scale
    return quantize_tiles


def _strided_blocks(w):
    scale = rearrange(w.abs(), "(a r) (b c) -> r c a b", a=128, b=128).amax(dim=(-2, -1)) / 448
    return _tiles((128, 128))(w)[0], scale


def _dot(promote=True, reset=True, round_each=True):
    def promoted_dot(a, b, mantissa_bits=14, promote_every=128, chunk=32):
        from minidsv3.fp8 import round_mantissa
        sums = F.pad(a.double() * b.double(), (0, -len(a) % chunk)).view(-1, chunk).sum(-1)
        per = promote_every // chunk if promote and promote_every is not None else len(sums)
        running, fp32 = torch.zeros((), dtype=torch.float64), torch.zeros(())
        for c in range(len(sums)):
            running = running + sums[c]
            if round_each:
                running = round_mantissa(running, mantissa_bits)
            if (c + 1) % per == 0 or c + 1 == len(sums):
                fp32 = fp32 + round_mantissa(running, mantissa_bits).float()
                if reset:
                    running = torch.zeros((), dtype=torch.float64)
        return fp32
    return promoted_dot


def _moe_params(shared=True, matrices=3, width="moe", bias_as_weight=False, gate=True):
    def moe_layer_params(cfg):
        d, E = cfg.hidden_size, cfg.n_routed_experts
        f = cfg.moe_intermediate_size if width == "moe" else cfg.intermediate_size
        biases = E if cfg.has_routing_bias else 0
        weights = (E * d if gate else 0) + (E + (cfg.n_shared_experts if shared else 0)) \
            * matrices * d * f
        return (weights + biases, 0) if bias_as_weight else (weights, biases)
    return moe_layer_params


def _kv_cache(mla_values="latent", mha_values="kv", layers=True):
    def kv_cache_per_token(cfg, dtype_bytes):
        H = cfg.num_attention_heads
        latent = cfg.kv_lora_rank + (cfg.qk_rope_head_dim if mla_values != "no rope" else 0)
        mla = {"latent": latent, "no rope": latent, "per head": H * latent,
               "decompressed": H * (cfg.qk_head_dim + cfg.v_head_dim)}[mla_values]
        mha = H * (cfg.qk_nope_head_dim + (cfg.v_head_dim if mha_values == "kv" else 0))
        per = dtype_bytes * (cfg.num_hidden_layers if layers else 1)
        return mla * per, mha * per
    return kv_cache_per_token


def _flops(routed="visited", multiply_add=2, passes=3, attention=True, causal=True,
           mtp=True):
    def training_flops_per_token(cfg, seq_len):
        d, V, H = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
        L, L0 = cfg.num_hidden_layers, cfg.first_k_dense_replace
        D = cfg.num_nextn_predict_layers if mtp else 0
        r = cfg.q_lora_rank
        query = d * r + r * H * cfg.qk_head_dim if r else d * H * cfg.qk_head_dim
        attn = (query + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                + H * cfg.v_head_dim * d)
        experts = cfg.num_experts_per_tok if routed == "visited" else cfg.n_routed_experts
        moe = cfg.n_routed_experts * d + (cfg.n_shared_experts + experts) * 3 * d \
            * cfg.moe_intermediate_size
        N = (L * attn + L0 * 3 * d * cfg.intermediate_size + (L - L0) * moe + V * d
             + D * (attn + moe + 2 * d * d + V * d))
        keys = (seq_len + 1) / 2 if causal else seq_len
        scores = 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * keys * (L + D) if attention else 0
        return passes * (multiply_add * N + scores)
    return training_flops_per_token


def _cost(later=True, per_trillion=True, dollars_per_gpu=False, days="pre"):
    def training_cost(tokens, rate, later_stages, price, n_gpus):
        pre = (tokens / 1e12 if per_trillion else tokens) * rate
        hours = pre + (sum(later_stages.values()) if later else 0)
        dollars = hours * price * (n_gpus if dollars_per_gpu else 1)
        wall = {"pre": pre / n_gpus / 24, "one GPU": pre / 24, "hours": pre / n_gpus,
                "all": hours / n_gpus / 24}[days]
        return hours, dollars, wall
    return training_cost


def _groups(decay, trainable_only=True, buffers=False):
    """param_groups deciding by ``decay(name, p)``; optionally with frozen ones and buffers."""
    def param_groups(model, weight_decay):
        named = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad or not trainable_only]
        rest = [p for n, p in named if not decay(n, p)] + (list(model.buffers()) if buffers
                                                            else [])
        return [{"params": [p for n, p in named if decay(n, p)], "weight_decay": weight_decay},
                {"params": rest, "weight_decay": 0.0}]
    return param_groups


def _lr(first=1, cosine_from=None, floor=True, clamp=True):
    def lr_at(step, peak, warmup, total, min_ratio):
        if step < warmup:
            return peak * (step + first) / warmup
        start = warmup if cosine_from is None else cosine_from
        progress = (step - start) / max(1, total - start)
        progress = min(1.0, progress) if clamp else progress
        low = min_ratio if floor else 0.0
        return peak * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr_at


def _sign(bias, load, gamma):
    return bias + gamma * torch.sign(load.mean() - load)


def _per_micro_batch(bias, loads, gamma):
    for load in loads.sum(0):  # one update per micro-batch, as if inside the loop
        bias = _sign(bias, load, gamma)
    return bias


MISTAKES = [
    ("rope_inv_freq", lambda d, t: t ** (-torch.arange(d // 2, dtype=torch.float64) / d),
     "uses i/dim"),
    ("rope_inv_freq", lambda d, t: t ** (-torch.arange(d, dtype=torch.float64) / d),
     "one frequency per pair"),
    ("rotate_interleaved", _halves, "GPT-NeoX"),
    ("rotate_interleaved", _rotate_backwards, "direction flipped"),
    ("yarn_ramp", _ramp(clamp=False), "clamp the ramp"),
    ("yarn_ramp", _ramp(reverse=True), "ramp reversed"),
    ("yarn_ramp", _ramp(guard=False), "divides by zero"),
    ("yarn_inv_freq", _yarn(lambda inv, s, r: inv / s * (1 - r) + inv * r), "wrong end"),
    ("yarn_inv_freq", _yarn(lambda inv, s, r: inv / s), "plain position interpolation"),
    ("softmax_scale", _scale(squared=False), "mscale once"),
    ("softmax_scale", _scale(always=True), "not extended"),
    ("compress_kv", _compress(norm=False), "not normalised"),
    ("compress_kv", _compress(rope=False), "not rotated"),
    ("compress_kv", _compress(swap=True), "split order"),
    ("expand_kv", lambda c, w, H, dh, dv: tuple(
        rearrange(t, "b s (h d) -> b s h d", h=H) for t in (c @ w.T).split([H * dh, H * dv], -1)),
     "across all heads first"),
    ("absorbed_scores", _scores(scale_it=False), "forgot to multiply by scale"),
    ("absorbed_scores", _scores(rope=False), "RoPE part"),
    ("absorbed_scores", _scores(layout="b t h s"), "two axes swapped"),
    ("cache_bytes_per_token", _cache(rope=False), "decoupled RoPE key"),
    ("cache_bytes_per_token", _cache(bytes_=False), "not bytes"),
    ("cache_bytes_per_token", _cache(raises=False), "raise ValueError"),
    ("absorbed_mla", _mla(causal=False), "no causal mask"),
    ("absorbed_mla", _mla(width="qk_nope"), "scaled by 1/sqrt(8) (qk_nope_head_dim = "),
    ("absorbed_mla", _mla(mscale="never"), "left out YaRN's temperature"),
    ("absorbed_mla", _mla(mscale="once"), "mscale applied once"),
    ("absorbed_mla", _mla(mscale="always"), "YaRN is off in this config"),
    ("absorbed_mla", _mla(rope_part=False), "RoPE part q_R . k_R of the score is missing"),
    ("absorbed_mla", _mla(rope_k=False), "shared key k_R is not rotated"),
    ("absorbed_mla", _mla(norm_kv=False), "c_KV is not normalised"),
    ("absorbed_mla", _mla(kv_rows="all heads"), "across all heads first"),
    ("absorbed_mla", _mla(kv_rows="values first"), "W_UK and W_UV swapped"),
    ("absorbed_mla", _mla(w_uv=False), "forgot W_UV"),
    ("absorbed_mla", _mla(o_proj=False), "forgot the output projection"),
    ("swiglu_expert", lambda x, g, u, d: ((x @ g.T) * F.silu(x @ u.T)) @ d.T, "up projection"),
    ("swiglu_expert", lambda x, g, u, d: (F.relu(x @ g.T) * (x @ u.T)) @ d.T, "ReLU"),
    ("group_limited_topk", lambda b, g, kg, k: _topk(b, g, kg, k, lambda x: x.amax(-1)),
     "maximum of each group"),
    ("group_limited_topk", lambda b, g, kg, k: b.topk(k, -1).indices, "no group limit"),
    ("gate", _gate(weights_from="biased"), "bias leaked into the weights"),
    ("gate", _gate(normalise=False), "not normalised"),
    ("gate", _gate(scaled=False), "forgot to multiply by scale"),
    ("gate", _gate(select_bias=False), "ignores the bias"),
    ("moe_combine", _combine(shared=False), "shared expert is missing"),
    ("moe_combine", _combine(residual=True), "residual"),
    ("expert_load", lambda idx, n: torch.bincount(idx.flatten()).float(), "must count 0"),
    ("expert_load", lambda idx, n: (c := torch.bincount(idx.flatten(), minlength=n).float())
     / c.sum(), "fractions"),
    ("update_bias", lambda b, load, g: b + g * torch.sign(load - load.mean()), "sign flipped"),
    ("update_bias", lambda b, load, g: b + g * (load.mean() - load), "only the sign"),
    ("max_violation", lambda load: (load.amax(-1) - load.amin(-1)) / load.mean(-1),
     "(max - min)"),
    ("max_violation", lambda load: (load.max() - load.mean()) / load.mean(), "one value per row"),
    ("sequence_balance_loss", _balance(normalise=False), "normalise them"),
    ("sequence_balance_loss", _balance(pooled=True), "whole batch as one sequence"),
    ("sequence_balance_loss", _balance(detach=True), "no gradient"),
    ("mtp_inputs", _mtp_inputs(ahead_shift=1), "off by one position"),
    ("mtp_inputs", _mtp_inputs(targets_from_tokens=True), "very tokens you embed"),
    ("mtp_inputs", _mtp_inputs(h_tail=True), "last T - k positions"),
    ("mtp_combine", _mtp_combine(order="he"), "embedding comes first"),
    ("mtp_combine", _mtp_combine(norm=False), "RMSNorm missing"),
    ("mtp_loss", lambda ce, lam: lam * torch.stack(ce).sum(), "divide by D"),
    ("mtp_loss", lambda ce, lam: lam / len(ce) * sum(c.item() for c in ce), "no gradient"),
    ("accept_greedy", _accept(prefix=False), "after the first disagreement"),
    ("accept_greedy", _accept(bonus=False), "main model's own token"),
    ("top_p_filter", _top_p_strict, "crosses p"),
    ("expected_tokens_per_step", lambda a, d: 1 + d * a, "independently"),
    ("accept_or_residual", _residual_rule(residual="p"), "from p itself"),
    ("accept_or_residual", _residual_rule(residual="unnormalised"), "not normalised"),
    ("accept_or_residual", _residual_rule(residual="swapped"), "max(q - p, 0)"),
    ("accept_or_residual", _residual_rule(keep="q/p"), "not q/p"),
    ("accept_or_residual", _residual_rule(keep="u > ratio"), "smaller u"),
    ("quantize_tiles", _tiles(per_row=True), "one scale per row"),
    ("quantize_tiles", _tiles(divide=False), "forgot to divide by 448"),
    ("quantize_tiles", _tiles(block=(128, 1)), "tiles along M"),
    ("quantize_tiles", _tiles(guard=False), "all-zero tile"),
    ("quantize_tiles", lambda x: (x.to(torch.float8_e4m3fn), _tiles()(x)[1]), "x itself"),
    ("quantize_blocks", _tiles(), "1 x 128 tiles"),
    ("quantize_blocks", lambda w: (_tiles((128, 128))(w.T)[0].T, _tiles((128, 128))(w.T)[1]),
     "transposed"),
    ("quantize_blocks", _strided_blocks, "strided blocks"),
    ("quantize_blocks", lambda w: _tiles(block=w.shape)(w), "per-tensor scaling"),
    ("quantize_blocks", _tiles((128, 128), guard=False), "all-zero"),
    ("promoted_dot", _dot(promote=False), "never promoted"),
    ("promoted_dot", _dot(reset=False), "without resetting"),
    ("promoted_dot", _dot(round_each=False), "rounded only at promotion"),
    ("promoted_dot", lambda a, b, bits, every, chunk: (a.double() @ b.double()).float(),
     "no rounding at all"),
    ("moe_layer_params", _moe_params(shared=False), "shared expert is missing"),
    ("moe_layer_params", _moe_params(matrices=2), "2 matrices per expert"),
    ("moe_layer_params", _moe_params(width="dense"), "used intermediate_size"),
    ("moe_layer_params", _moe_params(bias_as_weight=True), "routing biases as weights"),
    ("moe_layer_params", _moe_params(gate=False), "forgot the gate"),
    ("kv_cache_per_token", _kv_cache(mla_values="decompressed"), "decompressed keys"),
    ("kv_cache_per_token", _kv_cache(mla_values="no rope"), "decoupled RoPE key"),
    ("kv_cache_per_token", _kv_cache(mla_values="per head"), "counted per head"),
    ("kv_cache_per_token", _kv_cache(mha_values="keys"), "forgot the values"),
    ("kv_cache_per_token", _kv_cache(layers=False), "one layer's cache"),
    ("training_flops_per_token", _flops(routed="all"), "counted all routed experts"),
    ("training_flops_per_token", _flops(multiply_add=1), "a multiply and an add are 2"),
    ("training_flops_per_token", _flops(passes=1), "forward pass only"),
    ("training_flops_per_token", _flops(attention=False), "forgot attention"),
    ("training_flops_per_token", _flops(causal=False), "causal mask"),
    ("training_flops_per_token", _flops(mtp=False), "left out the MTP module"),
    ("training_cost", _cost(later=False), "only pre-training"),
    ("training_cost", _cost(per_trillion=False), "per trillion tokens"),
    ("training_cost", _cost(dollars_per_gpu=True), "already count every GPU"),
    ("training_cost", _cost(days="one GPU"), "one GPU alone"),
    ("training_cost", _cost(days="hours"), "hours, not days"),
    ("training_cost", _cost(days="all"), "pre-training only"),
    ("param_groups", _groups(lambda n, p: True), "decays everything"),
    ("param_groups", _groups(lambda n, p: False), "decays nothing"),
    ("param_groups", _groups(lambda n, p: p.dim() >= 2 or "norm" in n), "RMSNorm weight"),
    ("param_groups", _groups(lambda n, p: p.dim() >= 2 and "embed" not in n), "the embedding"),
    ("param_groups", _groups(lambda n, p: p.dim() >= 2, buffers=True), "is a buffer"),
    ("param_groups", _groups(lambda n, p: p.dim() >= 2, trainable_only=False), "frozen"),
    ("lr_at", _lr(floor=False), "cosine decays to 0"),
    ("lr_at", _lr(first=0), "warm-up off by one"),
    ("lr_at", _lr(cosine_from=0), "cosine starts at step 0"),
    ("lr_at", _lr(clamp=False), "rises again"),
    ("bias_after_step", _per_micro_batch, "once per micro-batch"),
    ("bias_after_step", lambda b, loads, g: _sign(b, loads[:, -1].sum(0), g),
     "last micro-batch"),
    ("bias_after_step", lambda b, loads, g: _sign(b, loads[0].sum(0), g), "rank 0"),
    ("bias_after_step", lambda b, loads, g: b + g * torch.sign((c := loads.sum((0, 1))) - c.mean()),
     "sign flipped"),
    ("bias_after_step", lambda b, loads, g: b + g * (loads.sum((0, 1)).mean() - loads.sum((0, 1))),
     "only the sign"),
]


def test_the_mla_checkers_mistakes_are_each_one_mistake_from_the_package():
    """absorbed_mla's variants come from one forward with switches; all off, it is the package."""
    gen = torch.Generator().manual_seed(0)
    for cfg in [*ex02.CONFIGS.values(), *ex02.YARN_CONFIGS.values()]:
        layer = ex02._random_mla(cfg, gen)
        x = torch.randn(2, 5, cfg.hidden_size, generator=gen)
        freqs = ex02._random_freqs(5, cfg.qk_rope_head_dim, gen)  # (T, d_R/2)
        weights = {key: w.detach() for key, w in layer.state_dict().items()}
        with torch.no_grad():
            torch.testing.assert_close(ex02._mla_forward(x, weights, freqs, cfg, scale=layer.scale),
                                       layer(x, freqs, mode="absorbed"))


@pytest.mark.parametrize("name, wrong, words", MISTAKES,
                         ids=[f"{n}-{w}" for n, _, w in MISTAKES])
def test_planted_mistake_gets_a_specific_verdict(name, wrong, words):
    verdict = run_check(name, wrong)
    assert verdict.status == "fail"
    assert words in verdict.message, verdict.message


# ---------------------------------------------------------------------------------
# The grader
# ---------------------------------------------------------------------------------
def test_grader_gives_full_marks_to_the_solutions(tmp_path, capsys):
    # the solution notebooks themselves: the folder also holds the instructors' keys,
    # which are not exercise sets (the grader lists them as "not graded")
    assert cli(["grade", *map(str, SOLUTIONS), "--timeout", "120",
                "--csv", str(tmp_path / "marks.csv")]) == 0
    with open(tmp_path / "marks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(TASKS)
    assert all(r["result"] == "pass" for r in rows), [r for r in rows if r["result"] != "pass"]
    assert {r["task"] for r in rows} == set(TASKS)
    out = capsys.readouterr().out
    assert "01_rope_yarn_solution.ipynb: 5/5 tasks passed" in out


def test_grader_survives_crashing_and_deleting_notebooks(tmp_path, capsys):
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "minidsv3": {"exercise_set": "05_mtp"}}
    good = "import torch\ndef mtp_loss(ce, lam):\n    return lam / len(ce) * torch.stack(ce).sum()"
    write_nb(tmp_path / "a_raises.ipynb", [good, "raise RuntimeError('boom')"], meta)
    write_nb(tmp_path / "b_dies.ipynb", ["import os\nos._exit(1)"], meta)
    write_nb(tmp_path / "c_deletes.ipynb", [
        "import os\nfor name in os.listdir('.'):\n    os.remove(name)", good], meta)
    (tmp_path / "data.txt").write_text("the instructor's file")
    before = sorted(p.name for p in tmp_path.iterdir())

    assert ex_grade.main([tmp_path], tmp_path / "marks.csv", timeout=120) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "marks.csv") == before
    with open(tmp_path / "marks.csv", newline="") as f:
        rows = {(r["file"].split("/")[-1], r["task"]): (r["result"], r["message"])
                for r in csv.DictReader(f)}
    assert rows["a_raises.ipynb", "(notebook)"] == ("fail", "cell 2 raised RuntimeError: boom")
    assert rows["a_raises.ipynb", "mtp_loss"][0] == "pass"  # the other cells still count
    assert "not defined" in rows["a_raises.ipynb", "mtp_inputs"][1]
    assert "kernel died in cell 1" in rows["b_dies.ipynb", "(notebook)"][1]
    assert rows["b_dies.ipynb", "mtp_loss"][1].startswith("not graded: the kernel died")
    assert "deleted 4 file(s)" in rows["c_deletes.ipynb", "(files)"][1]
    assert rows["c_deletes.ipynb", "mtp_loss"][0] == "pass"
    assert all(result == "fail" for (file, task), (result, _) in rows.items()
               if task != "mtp_loss" or file == "b_dies.ipynb")
    assert len(rows) == 3 * 3 + 3  # three tasks each, plus one problem row per notebook
    assert "a_raises.ipynb: 1/3 tasks passed" in capsys.readouterr().out


def test_grader_stops_a_hanging_notebook(tmp_path):
    meta = {"minidsv3": {"exercise_set": "07_speculative"}}
    write_nb(tmp_path / "hangs.ipynb", ["x = 1", "while True:\n    pass", "y = 2"], meta)
    rows = ex_grade.grade_notebook(tmp_path / "hangs.ipynb", timeout=3)
    assert [(r.task, r.result) for r in rows] == [("(notebook)", "fail")] + [
        (name, "fail") for name in tasks_of("07_speculative")]
    assert rows[0].message == "the notebook timed out after 3 s (cell 2 was still running)"
    assert rows[1].message == "not graded: " + rows[0].message


# ---------------------------------------------------------------------------------
# The grader under attack: hostile notebooks, graded once by the command line
# ---------------------------------------------------------------------------------
GOOD_MTP_LOSS = ("import torch\ndef mtp_loss(ce, lam):\n"
                 "    return lam / len(ce) * torch.stack(ce).sum()")
KILLS_ITS_GRADER = "import os\nos.kill(os.getppid(), 9)"
KILLS_THE_MAIN_GRADER = """import os
def parent(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
def is_grader(pid):  # python -m minidsv3.exercises grade ...
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    return argv[1:4] == [b"-m", b"minidsv3.exercises", b"grade"]
top = os.getppid()
while is_grader(parent(top)):
    top = parent(top)
os.kill(top, 9)"""
STARTS_DAEMONS = """import subprocess, sys
quiet = dict(start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
sleeper = subprocess.Popen(["sleep", "120"], **quiet)
spawn = ("import subprocess; print(subprocess.Popen(['sleep', '120'], start_new_session=True, "
         "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
orphan = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True).stdout
open(PIDS, "w").write(f"{sleeper.pid} {orphan}")"""
WRONG_MTP = """import torch
def mtp_inputs(tokens, targets, h_prev, k):
    return h_prev, tokens, targets
def mtp_combine(h, e, ew, hw, W, eps):
    return h
def mtp_loss(ce, lam):
    return torch.tensor(0.0)"""
FORGES_RESULTS = """import json, os
forged = "".join(json.dumps({"set": "05_mtp", "task": t, "status": "pass", "source": "final",
                             "message": "passed (3 cases)"}) + "\\n"
                 for t in ("mtp_inputs", "mtp_combine", "mtp_loss"))
targets = [os.environ.get("MINIDSV3_EXERCISE_RESULTS")]  # the results file the grader named
fds = f"/proc/{os.getppid()}/fd"  # and every pipe of the grader's process
targets += [f"{fds}/{fd}" for fd in os.listdir(fds)
            if os.readlink(f"{fds}/{fd}").startswith("pipe:")]
for target in filter(None, targets):
    try:
        with open(target, "a") as f:
            f.write(forged)
    except OSError:
        pass
os._exit(0)"""
PATCHES_THE_CHECKS = """import dataclasses
import minidsv3.exercises as ex
import minidsv3.exercises.compare as compare
import minidsv3.exercises.core as core
def always_pass(name, fn):
    return core.Verdict(name, "pass", "passed (9 cases)")
core.run_check = ex.run_check = always_pass
for name, t in list(core.TASKS.items()):
    core.TASKS[name] = dataclasses.replace(t, checker=lambda fn: 9)
compare.expect_close = compare.expect_equal = lambda *args, **kwargs: None"""
CALLS_THE_REFERENCE = """import torch
import minidsv3.moe
from minidsv3.moe import balance_loss as ref
def expert_load(topk_idx, n_experts):
    return torch.zeros(n_experts)
def update_bias(bias, load, gamma):
    return bias + gamma * torch.sign(load.mean() - load)
def max_violation(load):
    return minidsv3.moe.max_violation(load)
def sequence_balance_loss(scores, topk_idx, alpha):
    return alpha * ref(scores, topk_idx)"""


def _meta(set_id):
    return {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "minidsv3": {"exercise_set": set_id}}


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One grader run (a separate process) over a folder of hostile notebooks; its CSV rows."""
    tmp = tmp_path_factory.mktemp("hostile")
    folder, pids = tmp / "submissions", tmp / "pids.txt"
    folder.mkdir()
    write_nb(folder / "a_kills_05_mtp.ipynb", [GOOD_MTP_LOSS, KILLS_ITS_GRADER], _meta("05_mtp"))
    write_nb(folder / "b_badmeta_05_mtp.ipynb",
             [GOOD_MTP_LOSS, f"PIDS = {str(pids)!r}\n" + STARTS_DAEMONS],
             {**_meta("05_mtp"), "minidsv3": "x"})
    write_nb(folder / "c_forges_05_mtp.ipynb", [WRONG_MTP, FORGES_RESULTS], _meta("05_mtp"))
    write_nb(folder / "d_patches_04_balancing.ipynb", [PATCHES_THE_CHECKS, CALLS_THE_REFERENCE],
             _meta("04_balancing"))
    write_nb(folder / "e_kills_all_05_mtp.ipynb", [GOOD_MTP_LOSS, KILLS_THE_MAIN_GRADER],
             _meta("05_mtp"))
    marks = tmp / "marks.csv"
    env = {**os.environ, "PYTHONPATH": str(Path(ex_build.__file__).parents[2])}
    run = subprocess.run([sys.executable, "-m", "minidsv3.exercises", "grade", str(folder),
                          "--csv", str(marks), "--timeout", "60"],
                         capture_output=True, text=True, timeout=600, env=env)
    rows = {}
    if marks.exists():
        with open(marks, newline="") as f:
            rows = {(Path(r["file"]).name, r["task"]): (r["result"], r["message"])
                    for r in csv.DictReader(f)}
    daemons = [int(p) for p in pids.read_text().split()] if pids.exists() else []
    survivors = [pid for pid in daemons if _alive(pid)]
    for pid in survivors:  # leave nothing behind, whatever the grader did
        os.kill(pid, 9)
    return run, rows, daemons, survivors


def test_a_notebook_that_kills_its_grader_costs_only_its_own_rows(hostile):
    _, rows, _, _ = hostile
    result, message = rows["a_kills_05_mtp.ipynb", "(notebook)"]
    assert result == "fail" and "killed" in message, message
    assert rows["b_badmeta_05_mtp.ipynb", "mtp_loss"][0] == "pass"  # graded after the kill


def test_rows_reach_the_csv_as_soon_as_each_notebook_is_graded(hostile):
    run, rows, _, _ = hostile
    assert run.returncode == -9, run.stderr[-2000:]  # the last notebook killed the whole run
    assert {file for file, _ in rows} == {"a_kills_05_mtp.ipynb", "b_badmeta_05_mtp.ipynb",
                                          "c_forges_05_mtp.ipynb", "d_patches_04_balancing.ipynb"}


def test_bad_metadata_gets_an_error_row_and_the_file_name_decides(hostile):
    _, rows, _, _ = hostile
    result, message = rows["b_badmeta_05_mtp.ipynb", "(metadata)"]
    assert result == "fail" and "'x'" in message and "file name" in message, message
    assert [task for file, task in rows if file == "b_badmeta_05_mtp.ipynb"] == [
        "(metadata)", *tasks_of("05_mtp")]


@pytest.mark.parametrize("metadata", ["x", {"exercise_set": 5}, {"exercise_set": ["05_mtp"]},
                                      {"exercise_set": "99_none"}, ["05_mtp"]])
def test_notebook_metadata_is_validated_not_trusted(metadata):
    nb = nbformat.v4.new_notebook(metadata={"minidsv3": metadata})
    set_id, problem = ex_grade.exercise_set(nb, Path("alice_05_mtp.ipynb"))
    assert set_id == "05_mtp"  # from the file name
    assert "minidsv3" in problem and repr(metadata)[:10] in problem, problem


def test_forged_results_give_no_marks(hostile):
    _, rows, _, _ = hostile
    forger = {task: row for (file, task), row in rows.items() if file == "c_forges_05_mtp.ipynb"}
    assert "(notebook)" in forger and all(result == "fail" for result, _ in forger.values()), \
        forger


def test_patching_the_checks_inside_the_notebook_gives_no_marks(hostile):
    _, rows, _, _ = hostile
    assert rows["d_patches_04_balancing.ipynb", "update_bias"][0] == "pass"  # honest work counts
    assert rows["d_patches_04_balancing.ipynb", "expert_load"][0] == "fail"


def test_calling_the_package_reference_fails_in_the_grade(hostile):
    _, rows, _, _ = hostile
    for task, reference in (("max_violation", "minidsv3.moe.max_violation"),
                            ("sequence_balance_loss", "minidsv3.moe.balance_loss")):
        result, message = rows["d_patches_04_balancing.ipynb", task]
        assert result == "fail" and reference in message, message


def test_processes_a_notebook_starts_do_not_outlive_the_grader(hostile):
    _, _, daemons, survivors = hostile
    assert len(daemons) == 2 and survivors == []


def test_check_catches_a_function_that_calls_the_reference():
    ref = balance_loss  # an alias taken beforehand is the same function
    layer = MLA(ModelConfig.preset("tiny"))  # built beforehand: the first case is tiny

    def hidden(load):  # switching the profiler off does not hide it
        sys.setprofile(None)
        return max_violation(load)

    cheats = [("max_violation", lambda load: max_violation(load), "minidsv3.moe.max_violation"),
              ("max_violation", max_violation, "minidsv3.moe.max_violation"),
              ("max_violation", hidden, "profiler"),
              ("sequence_balance_loss", lambda s, idx, alpha: alpha * ref(s, idx),
               "minidsv3.moe.balance_loss"),
              ("group_limited_topk", lambda b, g, kg, k: Gate(ModelConfig.preset(
                  "tiny", n_routed_experts=b.shape[1], n_group=g, topk_group=kg,
                  num_experts_per_tok=k)).select(b), "minidsv3.moe.Gate.select"),
              ("training_flops_per_token", lambda cfg, T: scale.flops_per_token(cfg, T).training,
               "minidsv3.scale.flops_per_token"),
              ("moe_layer_params", lambda cfg: (scale.parameter_table(cfg)[7].total, 0),
               "minidsv3.scale.parameter_table"),
              ("accept_or_residual", lambda p, q, x, u: (bool(accept_or_resample(
                  torch.stack([p, p]), q[None], [x], Sampler(1.0))[0]), None),
               "minidsv3.speculative.accept_or_resample"),
              ("absorbed_mla", lambda x, w, f, cfg: (layer.load_state_dict(w), layer(
                  x, f, mode="absorbed"))[1], "minidsv3.mla.MLA.forward"),
              ("absorbed_mla", lambda x, w, f, cfg: x * softmax_scale(cfg),
               "minidsv3.layers.softmax_scale")]
    for name, fn, words in cheats:
        verdict = run_check(name, fn)
        assert verdict.status == "fail" and words in verdict.message, verdict.line()


def _pipes():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found |= {int(fd)} if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") else set()
        except OSError:  # the descriptor listdir used
            pass
    return found


def _forges_into_new_pipes(inherited):
    """What a notebook's kernel can do to its grading process: write into its pipes."""
    for fd in _pipes() - inherited:  # in_child's, not pytest's own
        try:
            os.write(fd, b'{"name": "a.ipynb", "result": [["a.ipynb", "t", "pass", ""]]}\n')
        except OSError:  # the read end
            pass
    return [["a.ipynb", "t", "fail", "honest"]]


@pytest.mark.parametrize("work, problem", [
    ("forges", "does not carry the grader's signature"),
    (lambda: os.kill(os.getpid(), 9), "was killed by signal 9"),
    (lambda: os._exit(3), "exited with status 3"),
    (lambda: __import__("time").sleep(30), "did not answer within 0.5 s"),
])
def test_only_a_signed_answer_of_the_grading_process_counts(work, problem):
    key = b"k" * 32
    assert isolation.in_child(lambda: [["a.ipynb", "t", "pass", ""]], key, "a.ipynb", 5) == (
        [["a.ipynb", "t", "pass", ""]], None)
    if work == "forges":
        work = partial(_forges_into_new_pipes, _pipes())
    result, message = isolation.in_child(work, key, "a.ipynb", limit=0.5)
    assert result is None and problem in message, message
