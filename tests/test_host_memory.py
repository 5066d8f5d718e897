"""utils.host_memory: the scripts' processes keep the host memory they free (glibc malloc's thresholds), so a
tensor of a few MiB allocated again after one was freed reuses its pages instead of faulting in fresh ones."""
import platform
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from utils import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc's settings (Linux)")

# page faults of five forwards of DeiT-Tiny SAT (4 images; a tensor of up to 4.9 MB at each operator), after one
# that allocated the first ones, in a process that did or did not set up its device as the scripts do
FORWARDS = """
import resource, sys, torch
from Model import build_model
from utils.distributed import select_device
from utils.host_memory import keep_freed_memory
if sys.argv[1] == "device":
    select_device("cpu")
torch.set_num_threads(1)
model = build_model("deit_sat_tiny_patch16_224", num_classes=10).eval()
images = torch.randn(4, 3, 224, 224)
with torch.inference_mode():
    model(images)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model(images)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, keep_freed_memory())
"""


def forwards(setup):
    out = subprocess.run([sys.executable, "-c", FORWARDS, setup], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    faults, kept = out.stdout.split()
    return int(faults), kept == "True"


def test_a_forward_reuses_the_memory_the_last_one_freed_once_the_device_is_selected():
    faults, kept = forwards("device")
    default_faults, _ = forwards("none")
    assert kept
    # glibc's default: 8,000-14,000 fresh pages (32-56 MB), zero-filled by the kernel; kept: 300-900
    assert 4 * faults < default_faults, (faults, default_faults)


@pytest.mark.parametrize("name", host_memory.USER_SETTINGS)
def test_the_user_s_own_malloc_settings_stand(name, monkeypatch):
    monkeypatch.setenv(name, "131072")
    assert host_memory._set_thresholds() is False
