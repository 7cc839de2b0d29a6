"""Exercise set 02: Multi-head Latent Attention.

Joint KV compression, per-head expansion, the absorbed score computation, the
cache size and, unguided, a whole absorbed MLA layer from its weights. References:
``minidsv3.mla`` (MLA.latents, the absorbed path of MLA.forward,
cache_bytes_per_token).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from ..config import ModelConfig
from ..layers import apply_rotary_emb, softmax_scale, uses_yarn, yarn_mscale
from ..mla import MLA, cache_bytes_per_token, causal_mask
from .compare import expect_close, expect_equal, expect_tuple
from .core import Fail, NotDone, call, describe_exception, task

SET = "02_mla"

# Two small configs; the second has every width different, so swapped axes show.
CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "uneven": ModelConfig.preset("tiny", hidden_size=24, num_attention_heads=3, kv_lora_rank=6,
                                 qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5),
}


def _random_mla(cfg: ModelConfig, gen: torch.Generator) -> MLA:
    """An MLA layer with random weights (larger than init so mistakes show clearly)."""
    mla = MLA(cfg)
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return mla


def _random_freqs(T: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    angles = torch.rand(T, dim // 2, generator=gen) * 6.0
    return torch.polar(torch.ones_like(angles), angles)  # (T, d_R/2) complex


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


@task(SET, "compress_kv", references=[MLA.latents], hints=[
    "One matrix makes both: h @ w_kv_a.T has kv_lora_rank + qk_rope_head_dim outputs; the first "
    "kv_lora_rank are the latent c_KV, the rest the RoPE key k_R.",
    "c_KV is normalised with RMSNorm (weight norm_weight, epsilon eps); k_R is not normalised.",
    "k_R is rotated like a single head: apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)"
    " (from minidsv3.layers).",
])
def check_compress_kv(fn) -> int:
    gen = torch.Generator().manual_seed(2)
    for name, cfg in CONFIGS.items():
        mla = _random_mla(cfg, gen)
        h = torch.randn(2, 5, cfg.hidden_size, generator=gen)
        freqs = _random_freqs(5, cfg.qk_rope_head_dim, gen)
        w, norm_w = mla.kv_a_proj_with_mqa.weight.detach(), mla.kv_a_layernorm.weight.detach()
        eps = cfg.rms_norm_eps
        case = f"{name} config, h of shape {tuple(h.shape)}"
        c_ref, pe_ref = (t.detach() for t in mla.latents(h, freqs))
        got = call(fn, h.clone(), w.clone(), norm_w.clone(), freqs.clone(), cfg.kv_lora_rank,
                   eps, case=case)
        c_kv, k_pe = expect_tuple(got, ["c_kv", "k_pe"], "result")
        if isinstance(c_kv, torch.Tensor) and c_kv.shape[-1] == cfg.qk_rope_head_dim != \
                cfg.kv_lora_rank:
            raise Fail("split order: the first kv_lora_rank outputs are the latent c_KV, the "
                       f"last qk_rope_head_dim the RoPE key k_R (case: {case})")
        raw_c, raw_pe = (h @ w.T).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        rope_first = (h @ w.T)[..., cfg.qk_rope_head_dim:]
        expect_close(c_kv, c_ref, "c_kv", case, variants=[
            (_rms(rope_first, norm_w, eps), "split order: the first kv_lora_rank outputs are "
                                            "the latent c_KV, the last qk_rope_head_dim k_R"),
            (raw_c, "c_KV is not normalised: apply RMSNorm with norm_weight to the latent"),
            (_rms(raw_c, None, eps), "RMSNorm without its weight: multiply by norm_weight"),
        ])
        expect_close(k_pe, pe_ref, "k_pe", case, variants=[
            (raw_pe, "k_R is not rotated: apply RoPE (with freqs_cis) to the last "
                     "qk_rope_head_dim outputs"),
        ])
    return len(CONFIGS)


@task(SET, "expand_kv", hints=[
    "c_kv @ w_kv_b.T gives n_heads * (qk_nope_head_dim + v_head_dim) numbers per token.",
    "They are grouped head by head: rearrange(kv, 'b s (h d) -> b s h d', h=n_heads), then "
    "split the last axis into [qk_nope_head_dim, v_head_dim].",
])
def check_expand_kv(fn) -> int:
    gen = torch.Generator().manual_seed(3)
    for name, cfg in CONFIGS.items():
        H, d_h, d_v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        w = _random_mla(cfg, gen).kv_b_proj.weight.detach()  # (H*(d_h+d_v), d_c)
        c_kv = torch.randn(2, 6, cfg.kv_lora_rank, generator=gen)
        case = f"{name} config, c_kv of shape {tuple(c_kv.shape)}, {H} heads"
        # The package's split of kv_b_proj (as in MLA._absorbed): rows grouped per head.
        w_uk, w_uv = rearrange(w, "(h d) c -> h d c", h=H).split([d_h, d_v], dim=1)
        k_ref = einsum(c_kv, w_uk, "b s c, h d c -> b s h d")
        v_ref = einsum(c_kv, w_uv, "b s c, h d c -> b s h d")
        got = call(fn, c_kv.clone(), w.clone(), H, d_h, d_v, case=case)
        k, v = expect_tuple(got, ["k_nope", "v"], "result")
        flat = F.linear(c_kv, w)  # (B, S, H*(d_h+d_v))
        k_all = rearrange(flat[..., : H * d_h], "b s (h d) -> b s h d", h=H)
        interleaved = rearrange(flat, "b s (d h) -> b s h d", h=H)[..., :d_h]
        per_head = ("the rows of kv_b_proj go head by head: [head 0 keys, head 0 values, head 1 "
                    "keys, ...]")
        expect_close(k, k_ref, "k_nope", case, variants=[
            (k_all, "you split keys from values across all heads first; " + per_head),
            (interleaved, "heads interleaved ('(d h)'); " + per_head),
            (v_ref, "keys and values swapped: each head's first qk_nope_head_dim rows are keys"),
        ])
        expect_close(v, v_ref, "v", case)
    return len(CONFIGS)


def _naive_scores(q_nope, q_pe, c_kv, k_pe, w_uk, scale):
    """Materialise every head's key, then dot products: the reference for the absorbed path."""
    k_nope = einsum(c_kv, w_uk, "b s c, h d c -> b s h d")
    return (einsum(q_nope, k_nope, "b t h d, b s h d -> b h t s")
            + einsum(q_pe, k_pe, "b t h r, b s r -> b h t s")) * scale


@task(SET, "absorbed_scores", hints=[
    "Fold W_UK into the query: q_latent = einsum(q_nope, w_uk, 'b t h d, h d c -> b t h c').",
    "Content part: einsum(q_latent, c_kv, 'b t h c, b s c -> b h t s'); position part: "
    "einsum(q_pe, k_pe, 'b t h r, b s r -> b h t s') (k_R is shared by all heads).",
    "Add the two parts and multiply by scale; the result is (B, H, T, S).",
])
def check_absorbed_scores(fn) -> int:
    gen = torch.Generator().manual_seed(4)
    n = 0
    for name, cfg in CONFIGS.items():
        H, d_h, d_r, d_c = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                            cfg.qk_rope_head_dim, cfg.kv_lora_rank)
        B, T, S = 2, 3, 7  # 3 new queries against 7 cached positions
        q_nope, q_pe = torch.randn(B, T, H, d_h, generator=gen), torch.randn(B, T, H, d_r,
                                                                             generator=gen)
        c_kv, k_pe = torch.randn(B, S, d_c, generator=gen), torch.randn(B, S, d_r, generator=gen)
        w_uk, scale = torch.randn(H, d_h, d_c, generator=gen), 0.37
        args = (q_nope, q_pe, c_kv, k_pe, w_uk, scale)
        case = f"{name} config, {T} queries, {S} keys"
        got = call(fn, *(a.clone() if isinstance(a, torch.Tensor) else a for a in args),
                   case=case)
        expected = _naive_scores(*args)
        expect_close(got, expected, "scores", case, variants=[
            (expected / scale, "forgot to multiply by scale"),
            (_naive_scores(q_nope, q_pe * 0, c_kv, k_pe, w_uk, scale),
             "the RoPE part q_R . k_R is missing"),
            (_naive_scores(q_nope * 0, q_pe, c_kv, k_pe, w_uk, scale),
             "the content part (W_UK^T q_C) . c_KV is missing"),
        ])
        n += 1
        # End to end: the student's scores inside the package's MLA must reproduce it.
        mla = _random_mla(cfg, gen)
        x, freqs = torch.randn(1, 4, cfg.hidden_size, generator=gen), _random_freqs(4, d_r, gen)
        with torch.no_grad():
            q_nope, q_pe = mla.queries(x, freqs)
            c_kv, k_pe = mla.latents(x, freqs)
            w_uk, w_uv = rearrange(mla.kv_b_proj.weight, "(h d) c -> h d c", h=H).split(
                [d_h, cfg.v_head_dim], dim=1)
            expected = mla(x, freqs, mode="absorbed")
        case = f"{name} config, inside MLA.forward (causal softmax, W_UV, o_proj)"
        scores = call(fn, q_nope, q_pe, c_kv, k_pe, w_uk.detach(), mla.scale, case=case)
        if not isinstance(scores, torch.Tensor) or scores.shape != (1, H, 4, 4):
            raise Fail(f"scores: expected shape (B, H, T, S) = (1, {H}, 4, 4) (case: {case})")
        with torch.no_grad():
            probs = scores.masked_fill(~causal_mask(4, 4), float("-inf")).softmax(-1)
            o = einsum(einsum(probs, c_kv, "b h t s, b s c -> b t h c"), w_uv,
                       "b t h c, h v c -> b t h v")
            out = mla.o_proj(rearrange(o, "b t h v -> b t (h v)"))
        expect_close(out, expected, "attention output", case)
        n += 1
    return n


@task(SET, "cache_bytes_per_token", references=[cache_bytes_per_token], hints=[
    "Absorbed mode caches, per token and layer, the latent c_KV (kv_lora_rank values) and the "
    "shared RoPE key k_R (qk_rope_head_dim values); no per-head tensors.",
    "Naive mode caches every head's key (qk_nope_head_dim + qk_rope_head_dim) and value "
    "(v_head_dim).",
    "Multiply the number of values by dtype_bytes; raise ValueError for any other mode.",
])
def check_cache_bytes(fn) -> int:
    n = 0
    for preset in ("tiny", "toy", "deepseek-v3"):
        cfg = ModelConfig.preset(preset)
        H, L = cfg.num_attention_heads, cfg.num_hidden_layers
        for mode in ("absorbed", "naive"):
            for b in (2, 4) if preset == "tiny" else (2,):
                case = f"{preset} preset, mode={mode!r}, dtype_bytes={b}"
                expected = cache_bytes_per_token(cfg, mode, b)
                got = call(fn, cfg, mode, b, case=case)
                if isinstance(got, torch.Tensor) and got.numel() == 1:
                    got = got.item()
                common = [(expected // b, "counted values, not bytes: multiply by dtype_bytes"),
                          (expected * L, "multiplied by the number of layers: this is the "
                                         "size for one layer")]
                if mode == "absorbed":
                    mistakes = [(cfg.kv_lora_rank * b, "forgot the decoupled RoPE key: the "
                                 "cache holds c_KV (kv_lora_rank) and k_R (qk_rope_head_dim)"),
                                (expected * H, "multiplied by the number of heads: one latent "
                                               "is shared by all heads")]
                else:
                    mistakes = [(H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * b,
                                 "naive keys are qk_nope_head_dim + qk_rope_head_dim wide "
                                 "(the RoPE key is appended to every head)"),
                                (H * cfg.qk_head_dim * b, "forgot the values (v_head_dim per "
                                                          "head)")]
                expect_equal(got, expected, "bytes", case, variants=common + mistakes)
                n += 1
    try:  # a wrong mode must be refused, not answered
        got = fn(ModelConfig.preset("tiny"), "paged", 2)
    except NotImplementedError as err:
        raise NotDone(str(err)) from err
    except ValueError:
        return n + 1
    except Exception as err:
        raise Fail(f"mode='paged' should raise ValueError, but your function raised "
                   f"{describe_exception(err, fn)}") from None
    raise Fail(f"mode='paged' returned {got!r}; raise ValueError for an unknown mode")


# ---------------------------------------------------------------------------------
# The unguided task: a whole absorbed MLA layer from its weights
# ---------------------------------------------------------------------------------
def _mla_forward(x, weights, freqs, cfg, *, scale, causal=True, scale_rope=True, rope_part=True,
                 rope_q=True, rope_k=True, norm_q=True, norm_kv=True, kv_rows="per head",
                 w_uv=True, o_proj=True, softmax_dim=-1):
    """The absorbed forward with one mistake switched on: the result a mistaken student gets."""
    H, d_h, d_r, d_v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)
    eps, T = cfg.rms_norm_eps, x.shape[1]
    c_q = x @ weights["q_a_proj.weight"].T
    c_q = _rms(c_q, weights["q_a_layernorm.weight"], eps) if norm_q else c_q
    q = rearrange(c_q @ weights["q_b_proj.weight"].T, "b t (h d) -> b t h d", h=H)
    q_nope, q_pe = q.split([d_h, d_r], dim=-1)
    q_pe = apply_rotary_emb(q_pe, freqs) if rope_q else q_pe
    c_kv, k_pe = (x @ weights["kv_a_proj_with_mqa.weight"].T).split([cfg.kv_lora_rank, d_r], -1)
    c_kv = _rms(c_kv, weights["kv_a_layernorm.weight"], eps) if norm_kv else c_kv
    k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs).squeeze(2) if rope_k else k_pe
    w = weights["kv_b_proj.weight"]  # (H*(d_h+d_v), d_c)
    if kv_rows == "all heads":  # all heads' keys first, then all values
        w_uk, w_uv_ = (rearrange(part, "(h d) c -> h d c", h=H) for part in w.split(
            [H * d_h, H * d_v]))
    elif kv_rows == "values first":  # each head's halves swapped
        w_uv_, w_uk = rearrange(w, "(h d) c -> h d c", h=H).split([d_v, d_h], dim=1)
    else:
        w_uk, w_uv_ = rearrange(w, "(h d) c -> h d c", h=H).split([d_h, d_v], dim=1)
    content = einsum(einsum(q_nope, w_uk, "b t h d, h d c -> b t h c"), c_kv,
                     "b t h c, b s c -> b h t s")
    position = einsum(q_pe, k_pe, "b t h r, b s r -> b h t s") if rope_part else 0
    scores = content * scale + position * (scale if scale_rope else 1)  # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(T, T), float("-inf"))
    o = einsum(scores.softmax(softmax_dim), c_kv, "b h t s, b s c -> b t h c")
    o = einsum(o, w_uv_, "b t h c, h v c -> b t h v") if w_uv else o  # (B, T, H, d_v)
    o = rearrange(o, "b t h v -> b t (h v)")
    return o @ weights["o_proj.weight"].T if o_proj else o


def _mistakes(x, weights, freqs, cfg, scale):
    """``mistake(**switch)``: a callable that gives the output with that mistake switched on."""
    def mistake(**switch):
        return partial(_mla_forward, x, weights, freqs, cfg, **{"scale": scale, **switch})
    return mistake


def _scale_variants(cfg: ModelConfig, right: float) -> list[tuple[float, str]]:
    """Softmax scales a student may use instead of ``right``, each with what is wrong."""
    d_qk, y = cfg.qk_head_dim, cfg.rope_scaling
    plain = d_qk**-0.5
    should = f"1/sqrt(qk_nope_head_dim + qk_rope_head_dim) = 1/sqrt({d_qk})"
    found = []
    if y is not None:
        m = yarn_mscale(y.factor, y.mscale_all_dim)
        if uses_yarn(cfg):
            found += [(plain, f"left out YaRN's temperature: this config is built for "
                              f"{cfg.max_position_embeddings} positions, more than "
                              f"original_max_position_embeddings = "
                              f"{y.original_max_position_embeddings}, so the scale is "
                              f"{should} times mscale² (mscale = 0.1 mscale_all_dim ln(factor) "
                              f"+ 1 = {m:.4f})"),
                      (plain * m, "mscale applied once: the scale is multiplied by mscale² "
                                  "(the temperature acts on the query and on the key)")]
        else:
            found += [(plain * m * m, f"applied YaRN's mscale², but YaRN is off in this config: "
                                      f"max_position_embeddings = {cfg.max_position_embeddings} "
                                      f"does not exceed original_max_position_embeddings = "
                                      f"{y.original_max_position_embeddings}, so the scale is "
                                      f"plain {should}")]
    widths = {}  # the widths a student may mistake for the head width, grouped by value
    for field in ("qk_nope_head_dim", "kv_lora_rank", "v_head_dim", "qk_rope_head_dim"):
        widths.setdefault(getattr(cfg, field), []).append(field)
    for n, fields in widths.items():  # (times YaRN's factor right / plain, if any)
        found.append((n**-0.5 * right / plain,
                      f"scaled by 1/sqrt({n}) ({' = '.join(fields)} = {n}); the scale is "
                      f"{should}: both parts of the score count, and absorbing W_UK into the "
                      f"query changes no score"))
    found.append((1.0, f"no softmax scale: multiply the scores by {should}"))
    return [(s, msg) for s, msg in found if not math.isclose(s, right)]


# The uneven config with YaRN switched on (64 positions > 16 of pre-training) and with the
# same rope_scaling block but off (64 positions = 64): the softmax scale differs.
_YARN = dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0)  # the release's values
YARN_CONFIGS = {
    "uneven, YaRN on": CONFIGS["uneven"].replace(
        rope_scaling=dict(_YARN, original_max_position_embeddings=16)),
    "uneven, YaRN off": CONFIGS["uneven"].replace(
        rope_scaling=dict(_YARN, original_max_position_embeddings=64)),
}


@task(SET, "absorbed_mla", references=[MLA.forward, MLA._absorbed, MLA._naive, MLA.queries,
                                       MLA.latents, softmax_scale, uses_yarn, yarn_mscale],
      hints=[
          "It is the absorbed path of notebook 02 (section 5, mla_absorbed) fed from the "
          "weight dict: queries, latents, scores, causal softmax, values, output projection. "
          "Your compress_kv and absorbed_scores are two of those steps, and expand_kv shows how "
          "kv_b_proj splits per head: call them or reuse them.",
          "Queries: RMSNorm(x @ q_a_proj.T) with q_a_layernorm's weight, then @ q_b_proj.T, "
          "per head [qk_nope_head_dim | qk_rope_head_dim] with RoPE on the second part. Scale: "
          "1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times (0.1 mscale_all_dim ln(factor) "
          "+ 1)² only when cfg.rope_scaling is set and max_position_embeddings > its "
          "original_max_position_embeddings.",
          "Set the scores above the diagonal to -inf (query t sees keys s <= t), softmax over "
          "the last axis, o_latent = einsum(probs, c_kv, 'b h t s, b s c -> b t h c'), o = "
          "einsum(o_latent, w_uv, 'b t h c, h v c -> b t h v'), and return "
          "rearrange(o, 'b t h v -> b t (h v)') @ weights['o_proj.weight'].T.",
      ])
def check_absorbed_mla(fn) -> int:
    gen = torch.Generator().manual_seed(5)
    cases = [("tiny", CONFIGS["tiny"], 2, 5), ("uneven", CONFIGS["uneven"], 2, 6),
             ("tiny", CONFIGS["tiny"], 3, 1), ("uneven", CONFIGS["uneven"], 1, 1),
             *((name, cfg, 2, 5) for name, cfg in YARN_CONFIGS.items())]
    for name, cfg, B, T in cases:
        mla = _random_mla(cfg, gen)
        weights = {key: w.detach() for key, w in mla.state_dict().items()}
        x = torch.randn(B, T, cfg.hidden_size, generator=gen)
        freqs = _random_freqs(T, cfg.qk_rope_head_dim, gen)
        with torch.no_grad():
            expected = mla(x, freqs, mode="absorbed")  # (B, T, d)
        case = f"{name} config, x of shape {tuple(x.shape)}"
        got = call(fn, x.clone(), {key: w.clone() for key, w in weights.items()}, freqs.clone(),
                   cfg.replace(), case=case)
        mistake = _mistakes(x, weights, freqs, cfg, mla.scale)
        d_h, d_v, d_c = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        per_head = ("kv_b_proj's rows go head by head: head 0's qk_nope_head_dim rows of W_UK, "
                    "then its v_head_dim rows of W_UV, then head 1's, ...")
        variants = [
            (mistake(causal=False), "no causal mask: query t may attend only to keys s <= t; "
                                    "set the scores above the diagonal to -inf before the "
                                    "softmax"),
            *((mistake(scale=s), message) for s, message in _scale_variants(cfg, mla.scale)),
            (mistake(scale_rope=False), "scaled only the content part: the scale multiplies "
                                        "the whole score, the RoPE part q_R . k_R too"),
            (mistake(rope_part=False), "the RoPE part q_R . k_R of the score is missing: add "
                                       "it to the content part (W_UK^T q_C) . c_KV"),
            (mistake(rope_k=False), "the shared key k_R is not rotated: apply RoPE to the last "
                                    "qk_rope_head_dim outputs of kv_a_proj_with_mqa"),
            (mistake(rope_q=False), "the query's RoPE part is not rotated: apply RoPE to the "
                                    "last qk_rope_head_dim values of each head's query"),
            (mistake(norm_kv=False), "c_KV is not normalised: apply RMSNorm with "
                                     "kv_a_layernorm's weight to the latent (it serves as key "
                                     "and as value)"),
            (mistake(norm_q=False), "the query latent is not normalised: apply RMSNorm with "
                                    "q_a_layernorm's weight between q_a_proj and q_b_proj"),
            (mistake(kv_rows="all heads"), "you split keys from values across all heads "
                                           "first; " + per_head),
            (mistake(o_proj=False), "forgot the output projection: multiply the heads' "
                                    "concatenated outputs by o_proj's weight"),
            (mistake(softmax_dim=-2), "softmax over the wrong axis: each query's weights over "
                                      "the keys (the last axis) must sum to 1"),
        ]
        if d_h == d_v:  # otherwise the swapped halves do not even fit the query
            variants.append((mistake(kv_rows="values first"), "W_UK and W_UV swapped: " +
                             per_head))
        if d_c == d_v:  # otherwise o_proj does not fit
            variants.append((mistake(w_uv=False), "forgot W_UV: the attention output is "
                                                  "still in latent space (kv_lora_rank per "
                                                  "head); apply each head's W_UV before "
                                                  "o_proj"))
        expect_close(got, expected, "output", case, variants=variants)
    return len(cases)
