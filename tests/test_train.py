"""The training loop: a step learns, the bias update, exact resume, DDP, the CLI."""

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minidsv3 import (
    budget,
    load_pretrained,
    save_pretrained,
    sharding,
    train,
    train_cli,
    train_setup,
)
from minidsv3.checkpoint import load_model, load_state
from minidsv3.config import ModelConfig
from minidsv3.data import CharTokenizer
from minidsv3.model import DeepSeekV3
from minidsv3.moe import max_violation

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small generated play (never the download): (text file, data dir)."""
    rng = random.Random(0)
    words = "the king queen love death night day sword crown heart lord lady fair sweet".split()
    speeches = [f"{rng.choice(['KING HENRY', 'PORTIA', 'OTHELLO'])}.\n"
                + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + ".\n"
                for _ in range(300)]
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "play.txt").write_text("\n".join(speeches), encoding="utf-8")
    return folder / "play.txt", folder / "data"


def _argv(corpus, out, *extra, budget=None):
    """12 steps, or a --time-budget of ``budget`` seconds (which needs --warmup >= 13)."""
    text, data_dir = corpus
    length = (["--steps", "12", "--warmup", "2"] if budget is None
              else ["--time-budget", str(budget), "--warmup", "13"])
    return ["--preset", "tiny", "--text", str(text), "--data-dir", str(data_dir),
            "--out", str(out), "--batch-size", "8", "--seq-len", "32",
            "--eval-every", "6", "--eval-batches", "2", "--log-every", "1", "--ckpt-every", "6",
            "--sample-chars", "20", "--lr", "3e-3", *length, *extra]


def _records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _cli(argv, timeout=300):
    """Run the CLI in a fresh single-threaded process (same arithmetic in every run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minidsv3.train", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _tiny_setup(lr=1e-2):
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(train_setup.param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def _batch(B=4, T=16, vocab=64):
    x = torch.randint(0, vocab, (B, T))
    return x, torch.roll(x, -1, dims=1)


# ---------------------------------------------------------------- one step

def test_one_training_step_reduces_the_loss_on_a_fixed_batch():
    model, optimizer, scheduler = _tiny_setup()
    x, y = _batch()
    model.eval()
    with torch.no_grad():
        before = model(x, y).loss.item()
    model.train()
    args = argparse.Namespace(grad_clip=1.0, balance="aux-free", bias_gamma=0.001)
    result = train.train_step(model, model, optimizer, scheduler, [(x, y)], args, world=1)
    assert result["loss"] == pytest.approx(before, rel=1e-5)  # reported: the pre-step loss
    model.eval()
    with torch.no_grad():
        after = model(x, y).loss.item()
    assert after < before - 0.05


def test_bias_update_uses_the_loads_of_every_micro_batch():
    model, optimizer, scheduler = _tiny_setup()
    batches = [_batch(), _batch()]
    model.eval()  # router loads of each micro-batch with the pre-step weights
    with torch.no_grad():
        routers = [model(x, y).router for x, y in batches]
    model.train()
    expected = [a.load + b.load for a, b in zip(*routers)]  # main MoE layers, then MTP
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    gamma = 0.01
    args = argparse.Namespace(grad_clip=1.0, balance="aux-free", bias_gamma=gamma)
    result = train.train_step(model, model, optimizer, scheduler, batches, args, world=1)

    assert len(expected) == len(model.moe_layers()) == 2
    positions = [16, 15]  # the main layer sees all 16 positions, the MTP block T - 1
    for moe, load, old, got, T in zip(model.moe_layers(), expected, before, result["loads"],
                                      positions):
        assert torch.equal(got, load)
        assert load.sum() == 2 * 4 * T * 2  # micro-batches x sequences x positions x K
        delta = moe.gate.e_score_correction_bias - old
        assert load.max() > load.min()
        assert delta[load.argmax()] == pytest.approx(-gamma)  # most loaded: pushed down
        assert delta[load.argmin()] == pytest.approx(gamma)  # least loaded: pulled up
        torch.testing.assert_close(delta, gamma * torch.sign(load.mean() - load))
        assert moe.expert_load.sum() == 0  # counts restart for the next step


def test_non_finite_gradients_stop_the_step_before_the_weights_change():
    model, optimizer, scheduler = _tiny_setup()
    model.lm_head.weight.register_hook(lambda grad: grad * math.nan)  # the loss stays finite
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = argparse.Namespace(grad_clip=1.0, balance="aux-free", bias_gamma=0.001)
    with pytest.raises(train.Diverged, match="gradient norm is nan"):
        train.train_step(model, model, optimizer, scheduler, [_batch()], args, world=1)
    for key, value in model.state_dict().items():  # weights and routing biases untouched
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("balance", ["aux-loss", "none"])
def test_other_balance_modes_leave_the_bias_alone(balance):
    model, optimizer, scheduler = _tiny_setup()
    args = argparse.Namespace(grad_clip=1.0, balance=balance, bias_gamma=0.01)
    train.train_step(model, model, optimizer, scheduler, [_batch()], args, world=1)
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.e_score_correction_bias, torch.zeros(8))
        assert moe.expert_load.sum() == 0


def test_balance_modes_set_the_loss_coefficients(corpus):
    tok = CharTokenizer("abc")
    parser = train_cli.build_parser()
    parser.set_defaults(seq_len=32)
    free = train_cli.make_config(parser.parse_args(["--preset", "tiny"]), tok)
    assert (free.aux_loss_alpha, free.expert_aux_loss_alpha) == (0.0001, 0.0)
    aux = train_cli.make_config(parser.parse_args(["--preset", "tiny", "--balance", "aux-loss"]),
                                tok)
    assert (aux.aux_loss_alpha, aux.expert_aux_loss_alpha) == (0.0, train_cli.AUX_LOSS_ALPHA)
    none = train_cli.make_config(parser.parse_args(["--preset", "tiny", "--balance", "none",
                                                    "--mtp-lambda", "0.5"]), tok)
    assert (none.aux_loss_alpha, none.expert_aux_loss_alpha, none.mtp_loss_lambda) == (0, 0, 0.5)
    assert none.vocab_size == 3


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [train_setup.lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine: never increases
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f[100] == pytest.approx(0.1)


def test_overrides_are_typed_like_the_config_fields():
    got = train_cli.parse_overrides(["hidden_size=48", "routed_scaling_factor=1.5",
                                     "norm_topk_prob=false", "scoring_func=softmax",
                                     "rope_scaling=none"])
    assert got == {"hidden_size": 48, "routed_scaling_factor": 1.5, "norm_topk_prob": False,
                   "scoring_func": "softmax", "rope_scaling": None}
    yarn = train_cli.parse_overrides(['rope_scaling={"factor": 4}'])["rope_scaling"]
    assert yarn == {"factor": 4}


# ---------------------------------------------------------------- whole runs

def test_resume_after_sigkill_repeats_the_uninterrupted_losses(corpus, tmp_path):
    argv = _argv(corpus, tmp_path / "full", "--steps", "24", "--ckpt-every", "4",
                 "--eval-every", "8")
    full = _cli(argv)
    assert full.returncode == 0, full.stderr

    # The whole run left everything the issue lists.
    records = _records(tmp_path / "full")
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ("loss", "lr", "tokens_per_s", "maxvio_train", "bias"):
        assert key in records[0]
    final = records[-1]
    for key in ("val_loss", "maxvio_batch", "maxvio_global", "maxvio_batch_per_layer",
                "maxvio_global_per_layer", "val_load"):
        assert key in final
    assert final["maxvio_global"] == pytest.approx(
        max_violation(torch.tensor(final["val_load"])).mean().item())
    for name in ("samples.txt", "loss.png", "maxvio.png", "expert_load.png", "bias.png"):
        assert (tmp_path / "full" / name).stat().st_size > 0
    assert (tmp_path / "full" / "samples.txt").read_text().startswith("KING HENRY.\n")

    # The same run, killed with SIGKILL once the step-4 checkpoint exists...
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv_killed = [a if a != str(tmp_path / "full") else str(killed) for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "minidsv3.train", *argv_killed], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and any(json.loads(ln)["step"] >= 5 for ln in
                                    metrics.read_text().splitlines() if ln.endswith("}")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = load_state(killed)["step"]
    assert 4 <= interrupted_at < 24, "the run was not interrupted"

    # ... then resumed: the losses are exactly those of the uninterrupted run.
    resumed = _cli([*argv_killed, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert _records(killed) == [
        {**r, **{k: v for k, v in s.items() if k in ("tokens_per_s", "elapsed_s")}}
        for r, s in zip(records, _records(killed))]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(killed /
                                                                         "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch,
                                                           capsys):
    from minidsv3 import model as model_module

    calls = {"n": 0}
    real = model_module.cross_entropy

    def poisoned(logits, targets):  # main + MTP cross-entropy: 2 calls per training step
        calls["n"] += 1
        return real(logits, targets) * (math.nan if calls["n"] > 8 else 1.0)

    monkeypatch.setattr(model_module, "cross_entropy", poisoned)
    out = tmp_path / "run"
    assert train.main(_argv(corpus, out, "--ckpt-every", "2", "--eval-every", "100")) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and "checkpoint (step 4)" in err
    assert load_state(out)["step"] == 4
    load_model(out)  # still loads


def _ddp_worker(rank, world, port, argv, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # kept after train() returns
    model = train.train(argv)
    # Parameters are sharded over the ranks (the checkpoint holds them whole); the routing
    # biases are buffers every rank keeps in full.
    biases = {k: v for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")}
    torch.save(biases, Path(result_dir) / f"rank{rank}.pt")
    weights = sharding.full_model_state(model)  # every rank takes part; rank 0 gets it all
    if rank == 0:
        save_pretrained(model, Path(result_dir) / "release-format", state=weights)
    dist.barrier()  # nobody tears the group down while another rank still uses it
    dist.destroy_process_group()


def _spawn_two(corpus, out, result_dir, *extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, _argv(corpus, out, *extra), str(result_dir)),
             nprocs=2, join=True)


# 64 experts, 1 per token, for 128 tokens per rank: many experts get no token on a rank,
# the case that breaks FSDP's reduce-scatter if an idle expert has no gradient there.
IDLE_EXPERTS = ["n_routed_experts=64", "num_experts_per_tok=1", "n_group=1", "topk_group=1"]


@pytest.mark.parametrize("extra", [[], IDLE_EXPERTS, ["--ep", "2"],
                                   ["--ep", "2", "num_nextn_predict_layers=0"]],
                         ids=["fsdp", "fsdp-idle-experts", "fsdp+ep", "fsdp+ep-no-mtp"])
def test_two_processes_match_one_process(corpus, tmp_path, extra):
    """FSDP2 over 2 gloo ranks, with or without the experts split between them (--ep 2) =
    one process on the same global batch: the checkpointed (gathered) weights, the AdamW
    moments, the routing biases on every rank, the losses; gradient accumulation 2."""
    steps = ["--steps", "3", "--grad-accum", "2", "--eval-every", "3", "--ckpt-every", "3"]
    _spawn_two(corpus, tmp_path / "ddp", tmp_path, *steps, *extra)
    train.train(_argv(corpus, tmp_path / "single", *steps, *[e for e in extra if "=" in e]))
    two, one = (load_file(tmp_path / run / "model.safetensors") for run in ("ddp", "single"))
    assert two.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=key)
    released = load_pretrained(tmp_path / "release-format").state_dict()  # from the sharded run
    assert released.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(released[key], value, rtol=0, atol=1e-5, msg=key)
    moments = [load_state(tmp_path / run)["optimizer"]["state"] for run in ("ddp", "single")]
    assert moments[0].keys() == moments[1].keys()  # keyed by parameter name, not position
    for name, state in moments[1].items():
        torch.testing.assert_close(moments[0][name]["exp_avg"], state["exp_avg"],
                                   rtol=1e-4, atol=1e-7, msg=name)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for key, bias in ranks[0].items():
        assert torch.equal(bias, ranks[1][key]) and torch.equal(bias, one[key]), key
        assert bias.abs().sum() > 0  # the biases moved
    # The 2-process run logged the same (all-reduced) losses as the single process.
    for r2, r1 in zip(_records(tmp_path / "ddp"), _records(tmp_path / "single")):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-5)


@pytest.mark.parametrize("first, then, ep", [(2, 1, "1"), (1, 2, "1"), (2, 1, "2")])
def test_checkpoints_do_not_depend_on_the_world_size(corpus, tmp_path, first, then, ep):
    """4 steps in `first` processes (experts split over `ep` of them), then 4 more in
    `then` after --resume, give the losses and weights of one uninterrupted process."""
    common = ["--steps", "8", "--eval-every", "8", "--ckpt-every", "4", "--log-every", "1"]
    train.train(_argv(corpus, tmp_path / "whole", *common))
    for world, extra in [(first, ["--stop-after", "4"]), (then, ["--resume"])]:
        if world == 2:
            _spawn_two(corpus, tmp_path / "split", tmp_path, *common, *extra, "--ep", ep)
        else:
            train.train(_argv(corpus, tmp_path / "split", *common, *extra))
    whole, split = _records(tmp_path / "whole"), _records(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in whole]
    for a, b in zip(split, whole):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    one, two = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "split"))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=key)


# ---------------------------------------------------------------- --time-budget

def test_the_plan_fills_the_budget_left_with_whole_steps():
    # 13 steps done in 1.5 s of a 10 s budget at 0.25 s per step: 8.5 / 0.25 = 34 more.
    assert budget.plan_steps(13, 1.5, 10.0, 0.25) == 47
    assert budget.plan_steps(13, 1.5, 10.0, 0.3) == 13 + 28  # 28.3 steps fit: 28 are taken
    assert budget.plan_steps(13, 11.0, 10.0, 0.25) == 13  # overspent: none more


# Steps of 1/16 s (sums of them are exact in binary) and a 2 s budget: steps 4-13 are
# timed, then 13 + (2 - 13/16) / (1/16) = 32 steps are planned.
SIXTEENTH, PLANNED = 1 / 16, 32
BUDGET_ONLY = ("train_seconds", "time_budget_s", "planned_steps", "train_tokens_per_s")
TIMING = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def steps_32(corpus, one_thread, tmp_path_factory):
    """The records of the same run given --steps 32 (and the same --warmup 13)."""
    out = tmp_path_factory.mktemp("steps32") / "run"
    train.train(_argv(corpus, out, "--steps", str(PLANNED), "--warmup", "13"))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in _records(out)]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING + BUDGET_ONLY} for r in records]


def test_a_time_budget_plans_the_steps_it_holds(corpus, tmp_path, step_clock, capsys,
                                                steps_32):
    # The first 3 steps are slow (1/4 s) and left out of the timing: at 1/16 s per step,
    # 2.5625 - (3/4 + 10/16) s left hold 19 more steps after step 13 -- 32 in all.
    step_clock(lambda i: 1 / 4 if i <= 3 else SIXTEENTH)
    out = tmp_path / "run"
    train.train(_argv(corpus, out, budget=2.5625))
    records = _records(out)
    # Planning within the warm-up changed nothing: the losses, lr schedule, evaluations and
    # biases of --steps 32, to the bit.
    assert _without_timing(records) == steps_32
    assert [r["train_seconds"] for r in records] == [
        r["step"] / 16 + min(r["step"], 3) * (1 / 4 - 1 / 16) for r in records]
    final = records[-1]
    assert (final["step"], final["planned_steps"]) == (PLANNED, PLANNED)
    assert final["train_seconds"] == final["time_budget_s"] == 2.5625
    assert final["train_tokens_per_s"] == 32 * 8 * 32 / 2.5625  # steps x batch x seq-len / s
    assert load_state(out)["args"]["steps"] == PLANNED  # what --resume continues
    assert ("2.5625 s of training steps; 2.6 s spent on 32 of the 32 planned steps (the final "
            "evaluation, samples and plots ran outside the budget)") in capsys.readouterr().out


def test_slower_steps_end_the_run_when_the_budget_is_spent(corpus, tmp_path, step_clock,
                                                          steps_32):
    # Planned at 1/16 s per step, the steps then take 1/8 s: 13/16 + 10/8 >= 2 at step 23.
    step_clock(lambda i: SIXTEENTH if i <= 13 else 1 / 8)
    out = tmp_path / "run"
    train.train(_argv(corpus, out, budget=2))
    records = _records(out)
    final = records[-1]
    assert (final["step"], final["planned_steps"], final["train_seconds"]) == (23, 32, 2.0625)
    # The planned schedule, up to the step that spent the budget...
    assert _without_timing(records[:-1]) == steps_32[:22]
    assert final["lr"] == steps_32[22]["lr"] and final["loss"] == steps_32[22]["loss"]
    # ... then what a last step does: the whole-split evaluation, a checkpoint, samples.
    assert "val_loss" in final and "val_loss" not in steps_32[22]
    assert load_state(out)["step"] == 23 and (out / "samples.txt").exists()


def test_a_resumed_budget_run_continues_its_plan(corpus, tmp_path, step_clock, capsys,
                                                 steps_32):
    out = tmp_path / "run"
    step_clock(lambda i: SIXTEENTH)
    train.train(_argv(corpus, out, "--stop-after", "20", budget=2))
    assert "stopped after step 20 of 32" in capsys.readouterr().out
    state = load_state(out)
    assert state["args"]["steps"] == PLANNED
    assert state["budget"] == {"spent": 20 / 16, "planned": PLANNED}
    # A fresh clock, as in a new process: it must neither re-plan nor forget the 1.25 s spent.
    step_clock(lambda i: SIXTEENTH)
    train.train(_argv(corpus, out, "--resume", budget=2))
    records = _records(out)
    assert _without_timing(records) == steps_32
    assert (records[-1]["train_seconds"], records[-1]["planned_steps"]) == (2.0, PLANNED)


@pytest.mark.parametrize("seconds, extra, message", [
    ("0", [], "--time-budget must be > 0, got 0.0"),
    ("-3", [], "--time-budget must be > 0, got -3.0"),
    ("nan", [], "--time-budget must be a finite number, got nan"),
    ("inf", [], "--time-budget must be a finite number, got inf"),
    ("5", ["--steps", "12"], "give --time-budget or --steps, not both"),
    ("5", ["--warmup", "12"], "plans the schedule at the end of the linear warm-up (its lr does "
                              "not depend on the total) from the time of at least 10 of its "
                              "steps after the first 3: need --warmup >= 13, got 12"),
])
def test_cli_refuses_bad_time_budgets(corpus, tmp_path, capsys, seconds, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(_argv(corpus, tmp_path / "run", *extra, budget=seconds))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_the_plan_rests_on_every_warm_up_step_but_the_first_three(corpus, tmp_path,
                                                                 step_clock):
    # Steps 4-12 take 1/16 s and 13-21 take 3/16 s: 1/8 s on average over the warm-up (the
    # last ten alone average 0.175 s). At step 21, 3/4 + 9/16 + 27/16 = 3 s are spent, and
    # the 7 s left of 10 hold 56 more steps of 1/8 s.
    step_clock(lambda i: 1 / 4 if i <= 3 else SIXTEENTH if i <= 12 else 3 / 16)
    out = tmp_path / "run"
    train.train(_argv(corpus, out, "--warmup", "21", "--stop-after", "21", budget=10))
    state = load_state(out)
    assert state["budget"] == {"spent": 3.0, "planned": 21 + 56}
    assert state["args"]["steps"] == 21 + 56


def test_a_budget_spent_within_the_warm_up_is_refused(corpus, tmp_path, step_clock, capsys):
    # 40 warm-up steps of 1/16 s need 2.5 s.
    step_clock(lambda i: SIXTEENTH)
    with pytest.raises(SystemExit) as exit_info:
        train.main(_argv(corpus, tmp_path / "run", "--warmup", "40", budget=2))
    assert exit_info.value.code == 2
    assert ("--time-budget 2 was spent by step 32, within the linear warm-up of 40 steps, at "
            "whose end the schedule is planned; in a new --out, give a --time-budget of at "
            "least about 3 or a --warmup from 13 to 31") in capsys.readouterr().err


def test_a_budget_run_stopped_before_its_plan_resumes_only_with_room_to_plan(corpus, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    train.train(_argv(corpus, out, "--stop-after", "5", budget=1000))
    assert "stopped after step 5 (the time budget has not planned the total yet)" in (
        capsys.readouterr().out)
    saved = load_state(out)["budget"]
    assert saved["planned"] is None and saved["spent"] > 0
    with pytest.raises(SystemExit):  # 3 steps after step 5 untimed, then 10 timed: past 13
        train.main(_argv(corpus, out, "--resume", budget=1000))
    assert ("need --warmup >= 18, got 13; this run stopped at step 5 before it was planned, so "
            "start it again in a new --out") in capsys.readouterr().err


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("extra, message", [
    (["hiden_size=8"], "unknown config field 'hiden_size'"),
    (["hidden_size=abc"], "hidden_size='abc': expected int"),
    (["norm_topk_prob=maybe"], "expected true or false"),
    (["num_experts_per_tok=99"], "num_experts_per_tok=99 exceeds n_routed_experts=8"),
    (["vocab_size=10"], "vocab_size comes from the tokenizer"),
    (["mtp_loss_lambda=0.1"], "set mtp_loss_lambda with --mtp-lambda"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--bias-gamma", "nan"], "--bias-gamma must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--bias-gamma", "-0.1"], "--bias-gamma must be >= 0, got -0.1"),
    (["--batch-size", "6", "--grad-accum", "4"], "must be divisible by --grad-accum"),
    (["--seq-len", "1000"], "--seq-len 1000 must be in"),
    (["--ep", "2"], "--ep 2 splits the experts over 2 processes, but this is one process"),
    (["--ep", "0"], "--ep must be >= 1, got 0"),
])
def test_cli_refuses_bad_arguments(corpus, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(_argv(corpus, tmp_path / "run", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown config field" in message:
        assert "valid fields:" in err and "hidden_size" in err


def test_cli_refuses_to_overwrite_or_to_resume_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train.main(_argv(corpus, out, "--resume"))
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        train.main(_argv(corpus, out))
    assert "already exists; add --resume to continue that run, or choose another --out" in (
        capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_refuses_changed_settings(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(_argv(corpus, out, "--steps", "2", "--eval-every", "2", "--ckpt-every", "2"))
    with pytest.raises(SystemExit):
        train.main(_argv(corpus, out, "--steps", "2", "--lr", "1e-4", "--resume"))
    assert "--lr=0.0001 differs from the resumed run's 0.003" in capsys.readouterr().err


def test_gradient_accumulation_1x32_equals_2x16(corpus, tmp_path):
    """One micro-batch of 32 or two of 16: the same sequences (the data RNG draws them in
    the same order), the same mean loss, the same whole-step loads for the bias update --
    so after a few steps the same weights and routing biases, to fp32 rounding."""
    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        train.main(_argv(corpus, out, "--steps", "4", "--batch-size", "32",
                         "--grad-accum", str(accum), "--ckpt-every", "4"))
        runs[accum] = load_file(out / "model.safetensors")
    biases = [k for k in runs[1] if k.endswith("e_score_correction_bias")]
    assert biases and any(runs[1][k].abs().sum() > 0 for k in biases)  # the biases did move
    for name, tensor in runs[1].items():
        torch.testing.assert_close(runs[2][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key in ("loss", "grad_norm"):  # AdamW hides a gradient scale error; the norm does not
        first = [_records(tmp_path / f"accum{a}")[0][key] for a in (1, 2)]
        assert math.isclose(*first, rel_tol=1e-4), key


def test_an_expert_parallel_layout_that_does_not_divide_is_refused(capsys):
    """Checked before any process group work: --ep must divide the processes."""
    parser = train_cli.build_parser()
    args = parser.parse_args(["--ep", "3"])
    with pytest.raises(SystemExit):
        train_cli.check_args(args, parser, world=2)
    assert "--ep 3 must divide the number of processes (2)" in capsys.readouterr().err
    train_cli.check_args(parser.parse_args(["--ep", "2"]), parser, world=4)  # 2 groups of 2
