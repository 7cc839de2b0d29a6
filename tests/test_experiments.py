"""The ablation sweep (minidsv3/experiments): resume logic, MaxVio, the results page."""

import json
import math
import random
import re

import pytest
import torch

from minidsv3 import checkpoint
from minidsv3.config import ModelConfig
from minidsv3.experiments import ablations, report
from minidsv3.experiments.__main__ import main as experiments

TOY = ModelConfig.preset("toy")


# ---------------------------------------------------------------- MaxVio, by hand

def test_maxvio_global_by_hand_leaves_out_the_mtp_layer():
    # Two main MoE layers and an MTP layer; mean loads 2, 2 and 2.
    val_load = torch.tensor([[4.0, 2, 2, 0], [3, 3, 1, 1], [8, 0, 0, 0]])
    # (4 - 2) / 2 = 1 and (3 - 2) / 2 = 0.5; the MTP layer's 3 is not counted.
    assert ablations.maxvio_global(val_load, n_main=2) == pytest.approx(0.75)
    assert ablations.maxvio_global(val_load, n_main=3) == pytest.approx((1 + 0.5 + 3) / 3)


def test_maxvio_batch_is_the_mean_over_steps_and_main_layers():
    per_step = torch.tensor([[1.0, 0.5, 9.0], [0.2, 0.4, 9.0]])  # (steps, layers)
    assert ablations.maxvio_batch(per_step, n_main=2) == pytest.approx((1 + 0.5 + 0.2 + 0.4) / 4)


def _fake_run(path, val_losses, n_layers=3, dense=1, mtp=1, tokens_per_s=(100.0, 50.0, 200.0)):
    """A finished run's config.json and metrics.jsonl, as train.py writes them."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = TOY.replace(num_hidden_layers=n_layers, first_k_dense_replace=dense,
                      num_nextn_predict_layers=mtp)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    n_moe = n_layers - dense + mtp
    records = []
    for i, tps in enumerate(tokens_per_s):
        records.append({"step": 10 * (i + 1), "tokens_per_s": tps,
                        "maxvio_train_per_layer": [0.1 * (i + 1)] * (n_moe - mtp) + [5.0] * mtp})
    records[-1].update(val_loss=val_losses[-1],
                       val_load=[[4.0, 2, 2, 0]] * (n_moe - mtp) + [[8.0, 0, 0, 0]] * mtp)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summarise_reads_a_run_as_the_paper_defines_it(tmp_path):
    _fake_run(tmp_path, [2.5])
    r = ablations.summarise(tmp_path, "aux-free", 3, tokens_per_step=1000, wall_seconds=7.0)
    # Step times 10, 20 and 5 s: the median 10 s, so 100 tokens/s and 30 steps x 10 s.
    assert r["tokens_per_s"] == pytest.approx(100.0)
    assert r["train_seconds"] == pytest.approx(300.0)
    assert (r["steps"], r["val_loss"], r["seed"], r["wall_seconds"]) == (30, 2.5, 3, 7.0)
    assert r["maxvio_global"] == pytest.approx(1.0)  # (4 - 2) / 2; the MTP layer left out
    assert r["maxvio_batch"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert r["n_main_moe_layers"] == 2


# ---------------------------------------------------------------- the sweep

class FakeTrain:
    """Stands in for train.train: records each argv and writes a finished run, or
    "dies" after its first checkpoint when its --out is in ``die_in``."""

    def __init__(self, die_in=()):
        self.calls, self.die_in = [], set(die_in)

    def __call__(self, argv):
        self.calls.append(argv)
        out = ablations.Path(argv[argv.index("--out") + 1])
        for name in checkpoint.FILES:  # a committed checkpoint
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("")
        if str(out) in self.die_in:
            self.die_in.discard(str(out))
            raise KeyboardInterrupt
        _fake_run(out, [1.0 + 0.01 * len(self.calls)])


def test_sweep_skips_done_runs_resumes_killed_ones_and_times_the_twins(tmp_path, capsys):
    variants = [ablations.BY_NAME[n] for n in ("aux-free", "no-mtp-same-time")]
    runs = ablations.plan(variants, [1, 2], ["--eval-every", "5"], ["--steps", "30"], TOY)
    assert [(v.name, s) for v, s, _ in runs] == [("aux-free", 1), ("no-mtp-same-time", 1),
                                                 ("aux-free", 2), ("no-mtp-same-time", 2)]
    assert runs[0][2][-2:] == ["--steps", "30"] and "--steps" not in runs[1][2]
    assert "num_nextn_predict_layers=0" in runs[1][2]
    out = tmp_path / "sweep"
    killed = ablations.run_dir(out, "aux-free", 2)
    fake = FakeTrain(die_in=[str(killed)])
    with pytest.raises(KeyboardInterrupt):
        ablations.sweep(runs, out, fake)
    assert len(fake.calls) == 3 and not (killed / ablations.RESULT).exists()
    # The twin trains for its reference's seconds: the default 32 x 128 tokens a step at the
    # median 100 tokens/s is 40.96 s a step, over 30 steps.
    assert fake.calls[1][-2:] == ["--time-budget", "1228.80"]

    # A run dir left without a checkpoint (killed in its first steps) starts again.
    stale = ablations.run_dir(out, "no-mtp-same-time", 2)
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text("{}\n")
    fake.calls.clear()
    results = ablations.sweep(runs, out, fake)
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 2
    assert [c[c.index("--out") + 1] for c in fake.calls] == [str(killed), str(stale)]
    assert fake.calls[0][-1] == "--resume" and "--resume" not in fake.calls[1]
    assert [(r["variant"], r["seed"]) for r in results] == [(v.name, s) for v, s, _ in runs]
    fake.calls.clear()
    ablations.sweep(runs, out, fake)  # everything done: nothing trains
    assert fake.calls == []


def test_a_twin_without_its_reference_is_refused():
    with pytest.raises(ValueError, match="dense-same-time trains for the seconds of no-mtp"):
        ablations.plan([ablations.BY_NAME["dense-same-time"]], [1], [], ["--steps", "3"], TOY)


@pytest.mark.parametrize("argv, match", [
    (["--seed", "3"], "--seed is set by the sweep"),
    (["--steps", "10", "--time-budget", "5"], "not allowed with argument"),
    (["--seeds", "0"], "need --seeds >= 1"),
    (["--only", "dense-same-time"], "trains for the seconds of no-mtp"),
    (["--only", "densest"], "invalid choice: 'densest'"),
])
def test_bad_options_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiments(["ablations", *argv])
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)


# ---------------------------------------------------------------- the page

def _result(variant, seed, val_loss, maxvio=0.5):
    return {"variant": variant, "seed": seed, "steps": 400, "val_loss": val_loss,
            "maxvio_global": maxvio, "maxvio_batch": maxvio + 0.1, "tokens_per_s": 1000.0 + seed,
            "train_seconds": 100.0, "wall_seconds": 120.0, "n_main_moe_layers": 3}


def test_variant_table_shows_mean_and_sample_std_per_variant():
    results = [_result("aux-free", s, v) for s, v in ((1, 1.0), (2, 1.2), (3, 1.4))]
    row = report.variant_table(results).splitlines()[2]
    # mean 1.2, sample std sqrt(((-0.2)^2 + 0 + 0.2^2) / 2) = 0.2; tokens/s 1001..1003
    assert "| 3 | 400 | 1.2000 ± 0.2000 | 0.500 ± 0.000 | 0.600 ± 0.000 | 1,002 ± 1 |" in row


def test_comparisons_are_paired_by_seed_and_judged_against_their_spread():
    base = [_result("aux-loss-0.001", s, v) for s, v in ((1, 1.1), (2, 1.3), (3, 1.3))]
    treat = [_result("aux-free", s, v) for s, v in ((1, 1.0), (2, 1.1), (3, 1.2))]
    c = report.compare(base + treat, "aux-loss-0.001", "aux-free", "val_loss")
    assert c.n == 3 and c.wins == 3 and c.seeds == (1, 2, 3)
    assert c.effect == pytest.approx(-0.4 / 3)  # diffs -0.1, -0.2, -0.1
    assert c.spread == pytest.approx(math.sqrt(((1 / 30) ** 2 * 2 + (2 / 30) ** 2) / 2))
    assert c.verdict == "reproduces (better in 3 of 3 seeds)"
    noisy = [_result("aux-free", s, v) for s, v in ((1, 0.9), (2, 1.4), (3, 1.2))]
    assert report.compare(base + noisy, "aux-loss-0.001", "aux-free", "val_loss"
                          ).verdict.startswith("not resolved")
    worse = [_result("aux-free", s, v + 0.5) for s, v in ((1, 1.0), (2, 1.1), (3, 1.2))]
    assert report.compare(base + worse, "aux-loss-0.001", "aux-free", "val_loss"
                          ).verdict.startswith("does not reproduce")
    one = report.compare(base + treat[:1], "aux-loss-0.001", "aux-free", "val_loss")
    assert one.n == 1 and one.verdict.startswith("one seed")
    assert report.compare(base, "aux-loss-0.001", "aux-free", "val_loss") is None


def test_findings_and_alpha_tables_from_fake_results():
    results = [_result("aux-free", s, 1.0 + 0.01 * s, maxvio=0.1) for s in (1, 2, 3)]
    results += [_result("aux-loss-0.001", s, 1.05 + 0.01 * s, maxvio=0.9) for s in (1, 2, 3)]
    results += [_result("aux-loss-0.1", s, 1.2 + 0.01 * s, maxvio=0.05) for s in (1, 2, 3)]
    findings = report.findings_table(results)
    quality = next(line for line in findings.splitlines() if "on quality" in line)
    assert "perplexity 9.56 -> 9.50" in quality
    assert "| 1.0700 -> 1.0200 |" in quality and "| -0.0500 ± 0.0000 |" in quality
    assert "reproduces" in quality
    assert sum("`aux-loss-0.001` -> `aux-free`" in line for line in findings.splitlines()) == 3
    assert report.summary(results) == ("Of 3 findings, **3 reproduce**, 0 are not resolved by "
                                       "the seeds, 0 do not reproduce.")
    noisy = [_result("aux-loss-0.01", s, v, maxvio=m)
             for s, v, m in ((1, 1.0, 0.05), (2, 1.05, 0.2), (3, 1.01, 0.1))]
    alphas = report.alpha_table(results + noisy).splitlines()
    # differences to aux-free of +0.01, -0.03, +0.02 and +0.05, -0.1, 0: ties on both axes
    assert alphas[3].startswith("| 0.01 |") and alphas[3].endswith(
        "| not resolved: both differences are within twice their spread |")
    # alpha 0.001 is worse on both axes in every seed by the same amount (spread 0)
    assert alphas[2] == ("| 0.001 | +0.0500 ± 0.0000 | +0.800 ± 0.000 | holds: aux-loss-free "
                         "is better on validation loss and MaxVio_global |")
    # alpha 0.1 balances better and loses quality: the trade-off, not both
    assert alphas[4] == ("| 0.1 | +0.2000 ± 0.0000 | -0.050 ± 0.000 | fails: this alpha is "
                         "better on MaxVio_global |")


# ---------------------------------------------------------------- --quick, end to end

def test_quick_mode_writes_a_page_from_the_runs_it_made(tmp_path, capsys, one_thread):
    rng = random.Random(0)
    words = "the king queen love death night day sword crown heart lord lady".split()
    text = tmp_path / "play.txt"
    text.write_text("\n".join(f"KING HENRY.\n{' '.join(rng.choices(words, k=8))}.\n"
                              for _ in range(200)), encoding="utf-8")
    out = tmp_path / "runs"
    argv = ["ablations", "--quick", "--out-dir", str(out), "--preset", "tiny", "--text",
            str(text), "--data-dir", str(tmp_path / "data"), "--batch-size", "8",
            "--seq-len", "32", "--sample-chars", "5"]
    assert experiments(argv) == 0
    page = (out / "results.md").read_text(encoding="utf-8")
    assert (out / "ablations_maxvio.png").stat().st_size > 0
    assert (out / "ablations_val_loss.png").stat().st_size > 0
    for name in ablations.QUICK_VARIANTS:
        final = json.loads((out / name / "seed1" / "metrics.jsonl").read_text()
                           .splitlines()[-1])
        assert final["step"] == ablations.QUICK_STEPS
        row = next(line for line in page.splitlines() if f"(`{name}`) | 1 |" in line)
        assert f"| {final['val_loss']:.4f} |" in row
        result = ablations.read_result(out / name / "seed1")
        assert f"| {result['maxvio_global']:.3f} |" in row
    assert "one seed: no spread to judge against" in page
    assert json.loads((out / report.RESULTS_JSON).read_text()) == [
        ablations.read_result(out / name / "seed1") for name in ablations.QUICK_VARIANTS]
    capsys.readouterr()
    assert experiments(argv) == 0  # a second time: both runs are done, only the page again
    assert capsys.readouterr().out.count("done before, skipped") == 2
