"""Cached generation, MTP speculative decoding, cache accounting and the sample CLI."""

import copy
import importlib

import pytest
import torch

from minidsv3 import DeepSeekV3, ModelConfig, generate, set_seed
from minidsv3.checkpoint import save_checkpoint
from minidsv3.data import CharTokenizer
from minidsv3.generate import Sampler, allocated_bytes, cache_sizes
from minidsv3.sample import main as sample_main
from minidsv3.speculative import MTPDrafter, accept_or_resample

TINY = ModelConfig.preset("tiny")
PROMPTS = [[5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]


def greedy_without_cache(model, prompt, n):
    """The plainest greedy decoding: re-run the whole sequence for every new token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def random_models():
    set_seed(1)
    return {D: DeepSeekV3(TINY.replace(num_nextn_predict_layers=D)).eval() for D in (1, 2)}


@pytest.fixture(scope="module")
def trained():
    """Tiny D=2 model trained briefly on t_{i+1} = table[t_{i-1}, t_i] (90% of the time).

    After 60 steps both the main model and the MTP modules know part of the table,
    so drafts are sometimes accepted and sometimes rejected. Also returns the same
    weights with only the first MTP depth (D=1).
    """
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DeepSeekV3(TINY.replace(num_nextn_predict_layers=2))
    table = torch.randint(16, (16, 16), generator=g)
    seq = [0, 1]
    for _ in range(4000):
        noise = int(torch.randint(16, (), generator=g))
        seq.append(int(table[seq[-2], seq[-1]]) if torch.rand((), generator=g) < 0.9 else noise)
    data = torch.tensor(seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(0, len(data) - 33, (16,), generator=g).tolist()
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for moe in model.moe_layers():
            moe.update_bias(0.001)
    model.eval()
    one_depth = DeepSeekV3(TINY.replace(num_nextn_predict_layers=1)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.1.")}
    one_depth.load_state_dict(state)
    return {2: model, 1: one_depth}


# ---------------------------------------------------------------- plain decoding

@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_greedy_matches_uncached_on_both_paths(random_models, prompt):
    model = random_models[1]
    want = greedy_without_cache(model, prompt, 20)
    for mode in ("absorbed", "naive"):
        out = generate(model, prompt, 20, temperature=0, attn_mode=mode)
        assert out.tokens == want
        assert out.forwards == 20 and out.tokens_per_forward == 1.0 and out.drafted == 0


def test_sampling_is_seeded_and_streams(random_models):
    model = random_models[1]
    streamed = []
    a = generate(model, [1, 2], 30, temperature=1.0, seed=3, on_tokens=streamed.extend)
    b = generate(model, [1, 2], 30, temperature=1.0, seed=3)
    c = generate(model, [1, 2], 30, temperature=1.0, seed=4)
    assert a.tokens == b.tokens == streamed
    assert a.tokens != c.tokens
    # top_k=1 keeps only the argmax: sampling becomes greedy whatever the temperature.
    assert generate(model, [1, 2], 15, temperature=2.0, top_k=1, seed=0).tokens == \
        greedy_without_cache(model, [1, 2], 15)


def test_generate_leaves_training_mode_and_expert_counts_alone(random_models):
    model = copy.deepcopy(random_models[1]).train()
    generate(model, [1, 2], 5, temperature=0)
    assert model.training
    assert all(moe.expert_load.sum() == 0 for moe in model.moe_layers())


def test_sampler_distributions_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(Sampler(1.0).probs(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    t2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 0.5  # temperature 2 = square root, renormalised
    torch.testing.assert_close(Sampler(2.0).probs(logits)[0], t2 / t2.sum())
    torch.testing.assert_close(Sampler(1.0, top_k=2).probs(logits)[0],
                               torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p=0.7: 0.5 alone is not enough, 0.5 + 0.3 is -> keep two tokens.
    torch.testing.assert_close(Sampler(1.0, top_p=0.7).probs(logits)[0],
                               torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(Sampler(1.0, top_p=0.9).probs(logits)[0],
                               torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(Sampler(0).probs(logits)[0], torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_tiny_temperatures_sample_the_argmax(random_models, temperature):
    """logits / T overflows in float32; shifted by the max and in float64 it cannot."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0 - 1e-6]])
    probs = Sampler(temperature).probs(logits)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    model = random_models[1]
    out = generate(model, [1, 2], 10, temperature=temperature, seed=0)
    assert out.tokens == greedy_without_cache(model, [1, 2], 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_ids=[]), "non-empty"),
    (dict(prompt_ids=[[1, 2], [3, 4]]), "one non-empty sequence"),
    (dict(prompt_ids=[1.5, 2.0]), "integers"),
    (dict(prompt_ids=[1, 64]), r"ids must be in \[0, 64\)"),
    (dict(prompt_ids=[-1]), r"ids must be in \[0, 64\)"),
    (dict(prompt_ids=list(range(64))), "leaves no room"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(attn_mode="flash"), "attention mode"),
    # wrong types: each a ValueError naming the argument, not a TypeError from inside
    (dict(prompt_ids="ROMEO:"), "prompt_ids is a str.*encode"),
    (dict(prompt_ids=None), "prompt_ids must be"),
    (dict(prompt_ids=["a", "b"]), "prompt_ids must be"),
    (dict(prompt_ids=[[1], [2, 3]]), "prompt_ids must be"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_k=True), "top_k"),
    (dict(top_p="0.5"), "top_p"),
    (dict(top_p=True), "top_p"),
    (dict(seed="1"), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(speculative="yes"), "speculative"),
    (dict(on_tokens="print"), "on_tokens"),
])
def test_bad_input_is_refused(random_models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(random_models[1], **{"prompt_ids": [1, 2], "max_new_tokens": 5, **kwargs})


def test_speculative_needs_mtp():
    model = DeepSeekV3(TINY.replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        generate(model, [1], 3, speculative=True)


@pytest.mark.parametrize("speculative", [False, True])
def test_stops_at_max_position_embeddings_with_a_warning(random_models, speculative):
    model = random_models[2]
    with pytest.warns(UserWarning, match="max_position_embeddings=64"):
        out = generate(model, [1, 2, 3], 100, temperature=0, speculative=speculative)
    assert len(out.tokens) == 64 - 3 and out.stop_reason == "max_position_embeddings"
    assert out.tokens == greedy_without_cache(model, [1, 2, 3], 61)


# ---------------------------------------------------------------- speculative decoding

@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("prompt, n", [(PROMPTS[0], 25), (PROMPTS[1], 40), (PROMPTS[2], 17)])
def test_greedy_speculative_equals_greedy_on_a_random_model(random_models, depth, prompt, n):
    model = random_models[depth]
    plain = generate(model, prompt, n, temperature=0)
    spec = generate(model, prompt, n, temperature=0, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.forwards + spec.accepted == n  # every forward gives 1 token + accepted drafts
    assert spec.rounds == spec.forwards - 1  # the prefill is not a round
    # drafting is timed inside the whole: some of it, never all; plain decoding never drafts
    assert 0 < spec.draft_seconds < spec.seconds and plain.draft_seconds == 0


@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_greedy_on_a_trained_model(trained, depth):
    model = trained[depth]
    drafted = accepted = 0
    for prompt, n in [([3, 7], 40), ([1, 2, 3, 4], 33), ([5], 50), ([12, 0, 9], 21)]:
        plain = generate(model, prompt, n, temperature=0)
        for mode in ("absorbed", "naive"):
            spec = generate(model, prompt, n, temperature=0, speculative=True, attn_mode=mode)
            assert spec.tokens == plain.tokens, (prompt, mode)
        assert spec.forwards < plain.forwards
        drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
    assert 0 < accepted < drafted  # both the accept and the reject branch were taken
    assert accepted / drafted > 0.5  # trained drafts are mostly right


def test_top_k_one_speculative_sampling_equals_greedy(trained):
    """The sampling branch of accept/reject with one-hot distributions is greedy decoding."""
    model = trained[2]
    spec = generate(model, [3, 7], 30, temperature=0.7, top_k=1, seed=0, speculative=True)
    assert spec.tokens == generate(model, [3, 7], 30, temperature=0).tokens
    assert spec.accepted > 0


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_drafts_come_from_the_uncached_mtp_chain(trained, mode):
    """Each round's draft distributions equal the MTP modules run without caches.

    Tokens are committed as a speculative decoder would (some drafts kept, then one
    other token), so the drafter has to catch up and overwrite its caches.
    """
    model, sampler = trained[2], Sampler(1.0, seed=0)
    g = torch.Generator().manual_seed(1)
    tokens, limit = [3, 7, 1], 40
    caches = model.allocate_caches(1, limit, mode)
    drafter = MTPDrafter(model, caches[model.cfg.num_hidden_layers:], limit, mode)
    drafter.keep_main_hidden(model(torch.tensor([tokens[:-1]])).hidden, 0)
    rounds = []
    while len(tokens) < limit - 4:
        m = len(tokens) - 1
        drafts, q = drafter.draft(tokens, 2, sampler)
        rounds.append((m, drafts, q))
        kept = int(torch.randint(0, 3, (), generator=g))
        tokens += drafts[:kept] + [int(torch.randint(0, 16, (), generator=g))]
        # h^0 of the newly committed positions, from a full uncached forward.
        hidden = model(torch.tensor([tokens[:-1]])).hidden
        drafter.keep_main_hidden(hidden[:, m:], m)
    # The training-time MTP path (no caches) over the final sequence.
    ids = torch.tensor([tokens])
    h = model(ids).hidden
    chain = []
    for k, module in enumerate(model.mtp, start=1):
        T = len(tokens) - k
        h, _ = module(h[:, :T], model.embed_tokens(ids[:, k:k + T]), model.freqs_cis[:T])
        chain.append(model.lm_head(module.norm(h))[0].softmax(-1))
    for m, drafts, q in rounds:
        torch.testing.assert_close(q[0], chain[0][m - 1], rtol=1e-4, atol=1e-6)
        if tokens[m + 1] == drafts[0]:  # depth 2 read the draft: compare only if it was kept
            torch.testing.assert_close(q[1], chain[1][m - 1], rtol=1e-4, atol=1e-6)
    assert sum(tokens[m + 1] == d[0] for m, d, _ in rounds) >= 3


def test_accept_or_resample_follows_the_main_distribution():
    """Whatever q proposes, the token that comes out is distributed as p."""
    p = torch.tensor([[0.5, 0.05, 0.3, 0.0, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.4, 0.1, 0.3, 0.1]])
    sampler = Sampler(1.0, seed=0)
    n = 10_000
    counts = torch.zeros(5)
    kept = 0
    for _ in range(n):
        x = sampler.draw(q[0])
        n_ok, nxt = accept_or_resample(p, q, [x], sampler)
        counts[x if n_ok else nxt] += 1
        kept += n_ok
    assert (counts / n - p[0]).abs().max() < 0.025  # std of each frequency < 0.005
    assert counts[3] == 0  # p gives token 3 no mass: it never comes out
    expected_kept = torch.minimum(p[0], q[0]).sum()  # P(accept) = sum_x min(p, q)
    assert abs(kept / n - expected_kept) < 0.025


def test_greedy_accept_or_resample_is_argmax():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 1.0]])
    assert accept_or_resample(p, q, [2], Sampler(0)) == (0, 1)  # rejected -> main argmax
    q = torch.tensor([[0.0, 1.0, 0.0]])
    assert accept_or_resample(p, q, [1], Sampler(0)) == (1, 0)  # kept + bonus token


# ---------------------------------------------------------------- cache accounting

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_sizes_match_allocated_tensors(dtype):
    cfg = TINY.replace(num_attention_heads=8, kv_lora_rank=24, qk_nope_head_dim=12,
                       qk_rope_head_dim=6, v_head_dim=10)
    model = DeepSeekV3(cfg)
    sizes = cache_sizes(cfg, dtype)
    b = torch.empty((), dtype=dtype).element_size()
    assert sizes["absorbed"] == (24 + 6) * b  # c_KV and the shared k_R
    assert sizes["naive"] == 8 * (12 + 6 + 10) * b  # per head: key (nope + rope) and value
    batch, max_len = 2, 50
    for mode in ("naive", "absorbed"):
        caches = model.allocate_caches(batch, max_len, mode, dtype)
        n_layers = len(caches)  # main blocks + MTP block
        assert allocated_bytes(caches) == sizes[mode] * batch * max_len * n_layers
        assert all(c.bytes_per_token() == sizes[mode] for c in caches)


def test_release_cache_sizes():
    cfg = ModelConfig.preset("deepseek-v3")
    sizes = cache_sizes(cfg)  # bf16
    assert sizes["absorbed"] * cfg.num_hidden_layers == 70_272  # 576 values x 2 B x 61
    assert sizes["naive"] == 128 * (192 + 128) * 2


# ---------------------------------------------------------------- the CLI

def test_sample_cli_streams_the_greedy_text(tmp_path, capsys, random_models):
    tokenizer = CharTokenizer("".join(chr(ord("0") + i) for i in range(64)))
    model = random_models[1]
    run = tmp_path / "run"
    save_checkpoint(run, model, tokenizer, {"step": 0})
    prompt = "ab"
    want = tokenizer.decode(generate(model, tokenizer.encode(prompt), 20, temperature=0).tokens)
    assert sample_main(["--run", str(run), "--prompt", prompt, "--tokens", "20",
                        "--temperature", "0", "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == prompt + want + "\n"
    assert "tokens/s" in err and "accepted" in err and "per main-model forward" in err
    assert sample_main(["--run", str(run), "--prompt", "a~b", "--tokens", "5"]) == 2
    assert "not in the 64-character vocabulary" in capsys.readouterr().err
    assert sample_main(["--run", str(run), "--prompt", "a", "--tokens", "100", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out) == 64 + 1 and "63 new tokens fit" in err  # stops at the context length


def wilson_hilferty_chi2(dof: int, z: float = 3.09) -> float:
    """The chi-squared value exceeded with probability ~0.001 (z = 3.09), Wilson-Hilferty."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * a ** 0.5) ** 3


def test_sampled_speculative_decoding_with_two_depths_follows_the_main_model(monkeypatch):
    """Chi-squared over 1,500 seeded runs: the first three new tokens of speculative
    sampling with D = 2 are distributed as the main model's own chain.

    With 4 new tokens the first round drafts two tokens; when the first is kept and the
    second rejected (about one run in five), the third token comes from the residual
    norm(max(0, p_2 - q_2)) -- the branch a wrong residual would bias. Both the joint of
    the three tokens (64 cells) and of the last two (16 cells) are tested.
    """
    cfg = ModelConfig.preset("tiny", vocab_size=4, num_hidden_layers=1,
                             num_nextn_predict_layers=2, initializer_range=0.25,
                             max_position_embeddings=16)
    set_seed(0)
    model = DeepSeekV3(cfg).eval()
    generate_module = importlib.import_module("minidsv3.generate")
    paths = []  # (drafts verified, drafts kept) per round

    def spy(p, q, drafts, sampler):
        result = accept_or_resample(p, q, drafts, sampler)
        paths.append((len(drafts), result[0]))
        return result

    monkeypatch.setattr(generate_module, "accept_or_resample", spy)
    prompt, n = [1, 2], 1500
    counts = torch.zeros(4, 4, 4)
    for seed in range(n):
        new = generate(model, prompt, 4, temperature=1.0, seed=seed, speculative=True).tokens
        counts[new[0], new[1], new[2]] += 1
    assert paths.count((2, 1)) > 150  # first draft kept, second resampled from the residual
    with torch.no_grad():  # the exact joint p(a) p(b | a) p(c | a, b) from full forwards
        p_a = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # (V,)
        seqs = torch.tensor([prompt + [a, b] for a in range(4) for b in range(4)])  # (16, 4)
        p = model(seqs).logits.softmax(-1)  # (16, 4, V)
        p_b = p[::4, -2]  # (a, V): p(b | a), read from the sequences with b = 0
        p_c = p[:, -1].reshape(4, 4, 4)  # (a, b, V): p(c | a, b)
    expected = n * p_a[:, None, None] * p_b[:, :, None] * p_c
    for observed, exp, dof in [(counts, expected, 63), (counts.sum(0), expected.sum(0), 15)]:
        chi2 = ((observed - exp) ** 2 / exp).sum().item()
        assert chi2 < wilson_hilferty_chi2(dof), (chi2, dof)
