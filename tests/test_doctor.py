"""python -m minidsv3.doctor: what it reads from the machine and the corpus."""

import json

import torch

from minidsv3 import doctor
from minidsv3.data import prepare_corpus

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16

processor\t: 1
model name\t: ignored, the first processor speaks for all
flags\t\t: fpu
"""


def test_cpu_model_and_flags_come_from_the_first_processor():
    model, flags = doctor.cpu_model_and_flags(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "amx_tile", "amx_bf16"} <= flags and "avx512_bf16" not in flags


def test_cpu_report_names_the_features_found(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    lines = doctor.cpu_report(path)
    assert lines[0] == "model: Intel(R) Xeon(R) Platinum 8480+"
    assert lines[-1] == "features: AVX2, AVX-512, AMX, AMX BF16"
    path.write_text("model name : Old\nflags : fpu sse2\n")
    assert doctor.cpu_report(path)[-1] == "features: none of " + ", ".join(
        doctor.CPU_FEATURES.values())


def test_corpus_report_tells_missing_damaged_and_other_texts_apart(tmp_path):
    assert "not prepared" in doctor.corpus_report(tmp_path)
    source = tmp_path / "shakespeare_copy.txt"
    source.write_text("ROMEO.\nBut soft, what light.\n", encoding="utf-8")
    txt = prepare_corpus(source, tmp_path / "d", verbose=False)
    txt.rename(txt.with_name("shakespeare.txt"))
    txt.with_suffix(".json").rename(txt.with_name("shakespeare.json"))
    status = doctor.corpus_report(tmp_path / "d")
    assert "prepared, 29 characters" in status and "a different text" in status
    (tmp_path / "d" / "shakespeare.txt").write_text("ROMEO.\nBut soft, what light?\n")
    assert "DAMAGED" in doctor.corpus_report(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "shakespeare.json").read_text())
    assert meta["chars"] == 29  # the count the report printed is the corpus's own


def test_matmul_seconds_times_the_product_asked_for():
    assert doctor.matmul_seconds(torch.float32, 64, 32, 16, repeats=3) > 0


def test_the_report_has_every_section(capsys, tmp_path):
    assert doctor.main(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for section in ("minidsv3:", "packages:", "threads:", "cpu:", "matmul:", "accelerators:",
                    "corpus:"):
        assert f"\n{section}\n" in f"\n{out}"
    assert f"torch {torch.__version__}" in out
    assert f"torch threads: {torch.get_num_threads()}" in out
    assert out.count("bf16 is ") == len(doctor.MATMUL_SHAPES)


def test_cpu_model_reads_cpuinfo_and_falls_back_without_it(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert doctor.cpu_model(path) == "Intel(R) Xeon(R) Platinum 8480+"
    assert doctor.cpu_model(tmp_path / "missing")  # platform's name, never empty
