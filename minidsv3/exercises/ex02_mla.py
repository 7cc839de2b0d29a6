"""Exercise set 02: Multi-head Latent Attention.

Joint KV compression, per-head expansion, the absorbed score computation and the
cache size. References: ``minidsv3.mla`` (MLA.latents, the absorbed path of
MLA.forward, cache_bytes_per_token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from ..config import ModelConfig
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
