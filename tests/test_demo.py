"""The README's main job, on the real embedded model (SmolLM2-135M from PyPI), in a fresh process."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_lowers_the_loss_within_memory_of_inference():
    pytest.importorskip("gguf")
    done = subprocess.run(
        [sys.executable, "-m", "hdopt", "demo", "--steps", "20"], capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout + done.stderr  # 1 would mean the loss did not go down
    losses = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", done.stdout)
    assert losses and float(losses.group(2)) < float(losses.group(1)) - 0.05, done.stdout
    ratio = float(re.search(r"\(([0-9.]+)x inference\)", done.stdout).group(1))
    assert ratio <= 1.05, done.stdout
