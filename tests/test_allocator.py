"""The allocator settings keep a network's freed activations for reuse: a forward pass then
page-faults an order of magnitude less (measured as the kernel counts it, not as time)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imram.allocator import ENVIRONMENT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

SCRIPT = """
import resource, sys
from imram.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else None
import torch
from imram.features.efficientnet_lite import EfficientNetLite
torch.manual_seed(0)
net = EfficientNetLite().eval()
x = torch.randn(16, 3, 224, 224)
with torch.no_grad():
    net.forward_features(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net.forward_features(x)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
def test_tuned_forward_passes_fault_far_fewer_pages():
    _, plain = _faults("plain")
    tuned, faults = _faults("tuned")
    assert tuned == "True"
    assert faults < plain / 4, (faults, plain)


def test_settings_from_the_environment_are_left_alone():
    tuned, _ = _faults("tuned", MALLOC_TRIM_THRESHOLD_="4294967296")
    assert tuned == "False"
