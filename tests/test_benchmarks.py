"""The README's benchmark commands run: each one as the README writes it, scaled down.

Every ``python benchmarks/<script>.py <flags>`` that the README names runs in a fresh
process with its flags unchanged and, after them, the script's small sizes
(``_SMALL``): argparse keeps the last value of a repeated option, so the README's own
flags are parsed (a renamed or removed one fails here) while the run takes seconds,
not the hours of the measured tables. Each run must exit 0 and print its table's
rows. The figures are not checked: they are measurements, not results.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, cifar_dir_path

pytestmark = pytest.mark.slow

# The script's smallest settings, appended after the README's flags.
_SMALL = {
    "bench_hub.py": "--cases 32x512 --tokens 64 --repeats 1 --max-tokens 64",
    "bench_large_vocab.py": "--cases 64x1024 --tokens 128 --repeats 1",
    "bench_matmul_nt.py": "--dims 32 --vocab 2048 --rows 16 --block 512 --calls 2 --repeats 1",
    "bench_sharded.py": "--case 64x32x1024 --time-case 32x16x512 --repeats 1",
    "bench_train.py": (
        "--data-dir {cifar} --limit-train 64 --limit-test 32 --epochs 1 --repeats 1 "
        "--ablation-train 64 --ablation-test 32 --ablation-epochs 1 --ablation-repeats 1"
    ),
}

# What a finished run prints: a regular expression per script, for each of its rows.
_ROWS = {
    "bench_hub.py": [
        r"32x512 +naive ",
        r"32x512 +naive_acc ",
        r"32x512 +fused ",
        r"32x512 +fused_noacc ",
    ],
    "bench_large_vocab.py": [r"64x1024 +naive "],
    "bench_matmul_nt.py": [r"g @ W\.T", r"h @ E\.T"],
    "bench_sharded.py": [r"\| 8 x 1 \| `naive` \|", r"\| 1 x 8 \| `linear_ce` \|"],
    "bench_train.py": [r"\| tutorial `model\.fit` \|"],
}


def readme_benchmark_commands() -> list[str]:
    """Every ``python benchmarks/<script>.py ...`` in the README's inline code (fenced
    blocks left out), its line breaks joined, in order and without repeats."""
    text = re.sub(r"^```.*?^```", "", (REPO / "README.md").read_text(), flags=re.S | re.M)
    found = []
    for span in re.findall(r"`([^`]+)`", text):
        command = " ".join(span.split())
        if re.match(r"python benchmarks/\w+\.py\b", command):
            found.append(command)
    return list(dict.fromkeys(found))


COMMANDS = readme_benchmark_commands()


def _script(command: str) -> str:
    """The file name of the script a command runs (``bench_hub.py``)."""
    return shlex.split(command)[1].split("/")[1]


def test_the_readme_names_each_benchmark_it_measures_with():
    scripts = {_script(c) for c in COMMANDS}
    assert set(_SMALL) == scripts, scripts ^ set(_SMALL)
    for name in scripts:
        assert (REPO / "benchmarks" / name).is_file(), name


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[f"{i}-{_script(c)[:-3]}" for i, c in enumerate(COMMANDS)]
)
def test_readme_benchmark_command_runs(command, tmp_path):
    argv = shlex.split(command)
    script = _script(command)
    small = shlex.split(_SMALL[script].format(cifar=cifar_dir_path()))
    if "--memory-limit" in argv:  # the search for the largest batch: one step per method
        small += ["--memory-limit", "0.0001"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, str(REPO / argv[1]), *argv[2:], *small],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{command}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [r"32x512 naive \d+ fused \d+"] if "--memory-limit" in argv else _ROWS[script]
    if "--skip-end-to-end" in argv:
        rows = [r"\(the default\)"]
    for row in rows:
        assert re.search(row, out), f"{command}: no row {row!r} in\n{out[-3000:]}"
