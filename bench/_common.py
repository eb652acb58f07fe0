"""Shared plumbing of the benchmarks: the machine line, timing, the peer's environment, child processes, and
rewriting one marked section of ``bench/RESULTS.md``.

Every benchmark records its table between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` so that re-running one
benchmark replaces only its own section.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
PEER_SITE, PEER_STUBS = ROOT / ".peer" / "site", ROOT / ".peer" / "stubs"
ANCHOR = Path("/work/shared/anchors/dalle_pytorch_bench.py")
THREADS = 2
PEAK_GFLOPS = 130.0  # fp32 matmul peak of this 2-core machine, as given for the project
RESULT_PREFIX = "@@RESULT@@ "


def machine() -> str:
    """``2 cores (nproc), <CPU model>; Python x, torch y``."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or platform.machine())
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = ""
    return (f"{nproc or os.cpu_count()} cores (nproc), {cpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def load_average() -> float:
    return os.getloadavg()[0]


def time_calls(fn: Callable[[], object], n: int, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def matmul_peak(size: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a ``size``² matmul in ``dtype`` on the current thread setting."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / min(time_calls(lambda: a @ b, 10)) / 1e9


def peer_installed() -> bool:
    return (PEER_SITE / "dalle_pytorch").is_dir()


def peer_env(threads: int = THREADS) -> dict[str, str]:
    """Environment of a child process that can import DALLE-pytorch from ``.peer/site`` (see
    /work/shared/anchors/README.md), with its module-level import of taming's VQGAN stubbed out."""
    stub = PEER_STUBS / "taming" / "models"
    stub.mkdir(parents=True, exist_ok=True)
    (PEER_STUBS / "taming" / "__init__.py").touch()
    (stub / "__init__.py").touch()
    vqgan = stub / "vqgan.py"
    if not vqgan.exists():
        vqgan.write_text("class VQModel:\n    pass\n\n\nclass GumbelVQ(VQModel):\n    pass\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting threads cost a lot on a shared 2-core machine
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PEER_SITE), str(PEER_STUBS), env.get("PYTHONPATH")) if p)
    return env


def emit(result: dict) -> None:
    """Child side: print one result for :func:`run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str | Path, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python script *args`` in a fresh process and return the last result it :func:`emit`-ted."""
    p = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"{script} {' '.join(args)} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def anchor_result(section: str, env: dict[str, str]) -> dict | None:
    """One section of the anchor script's own measurement, run in this job (None if unavailable)."""
    if not ANCHOR.is_file() or not peer_installed():
        return None
    p = subprocess.run([sys.executable, str(ANCHOR), "--site", str(PEER_SITE), "--stubs", str(PEER_STUBS), "--only",
                        section, "--repeats", "1"], env=env, capture_output=True, text=True)
    try:
        return json.loads(p.stdout[p.stdout.index("{"):])["results"][section]
    except (ValueError, KeyError):
        return None


def write_section(name: str, title: str, command: str, body: str, notes: list[str] = (),
                  results: Path = RESULTS) -> None:
    """Replace the ``name`` section of ``results`` (or append it) with a header of how it was measured and ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = "\n".join([
        start, f"## {title}", "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- load average (1 min) after: {load_average():.1f} (other processes may share these cores)",
        f"- date: {datetime.date.today().isoformat()}",
        *[f"- {n}" for n in notes], "", body.rstrip("\n"), end])
    old = results.read_text() if results.is_file() else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(new)


def command_line(script: str) -> str:
    """The command that reproduces this run, for the results header."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--json"):  # where the raw results went is not part of the measurement
            skip = a == "--json"
            continue
        args.append(a)
    return " ".join(["PYTHONPATH= .venv/bin/python", script, *args])


def bench_main(doc: str, child: Callable[[str], None], measure: Callable[[int], dict], table: Callable[[dict], str],
               section: str, title: str, script: str, notes: list[str]) -> None:
    """The command line every side-by-side benchmark shares: ``--repeats``, ``--write`` (record ``table`` in the
    ``section`` of bench/RESULTS.md), ``--json PATH`` (the raw results) and the hidden ``--child NAME`` that runs one
    measurement in a fresh process."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="processes per measurement (default 3)")
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = measure(args.repeats)
    text = table(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write:
        write_section(section, title, command_line(script), text, notes)
