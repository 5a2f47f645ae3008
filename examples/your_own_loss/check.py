"""Prints what ``check_loss`` says about the tutorial's loss, the fixed one and Keras' own.

python examples/your_own_loss/check.py     # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
from fixed_loss import CategoricalCrossEntropy  # noqa: E402
from tutorial_loss import Custom_CE_Loss  # noqa: E402

import keras_ce_plugin  # noqa: E402, F401 - "package>Name" strings in compile()
from keras_ce_plugin.testing import check_losses  # noqa: E402


def main() -> None:
    start = time.perf_counter()
    losses = [Custom_CE_Loss, CategoricalCrossEntropy(), keras.losses.CategoricalCrossentropy()]
    for report in check_losses(losses):
        print(report, end="\n\n")
    print(f"({time.perf_counter() - start:.0f} s for the three losses)")


if __name__ == "__main__":
    main()
