"""utils.host_memory: the scripts' processes keep the host memory they free (glibc malloc's thresholds), so a
tensor of a few MiB allocated again after one was freed reuses its pages instead of faulting in fresh ones."""
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from utils import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc's settings (Linux)")

# a process that did or did not set up its device as the scripts do frees 64 MiB of tensors (8 MiB each, as an
# eager forward's activations): MiB given back to the OS. Deterministic, unlike page faults of model forwards, where
# glibc's adaptive threshold made the default reuse memory in some runs (445 to 57,651 faults for five DeiT-Tiny
# forwards on one VM) and a ratio between the two flaky.
FREED = """
import sys, torch
from utils.distributed import select_device
from utils.host_memory import keep_freed_memory
if sys.argv[1] == "device":
    select_device("cpu")
def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) >> 10
blocks = [torch.ones(2 << 20) for _ in range(8)]
peak = rss_mib()
del blocks
print(peak - rss_mib(), keep_freed_memory() if sys.argv[1] == "device" else None)
"""


def python(*argv):
    """``python *argv`` in the repository, without the user's malloc settings of this environment (theirs stand)."""
    env = {name: value for name, value in os.environ.items() if name not in (*host_memory.USER_SETTINGS,
                                                                              "GLIBC_TUNABLES")}
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def freed(setup):
    out = python("-c", FREED, setup)
    assert out.returncode == 0, out.stderr
    given_back, kept = out.stdout.split()
    return int(given_back), kept == "True"


def test_freed_tensors_stay_with_the_process_once_the_device_is_selected():
    given_back, kept = freed("device")
    default_given_back, _ = freed("none")
    assert kept
    assert given_back < 8 and default_given_back > 56, (given_back, default_given_back)


@pytest.mark.parametrize("name", host_memory.USER_SETTINGS)
def test_the_user_s_own_malloc_settings_stand(name, monkeypatch):
    monkeypatch.setenv(name, "131072")
    assert host_memory._set_thresholds() is False


@pytest.mark.parametrize("tunables", ["glibc.malloc.mmap_threshold=131072",
                                      "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0"])
def test_the_user_s_glibc_tunables_stand(tunables, monkeypatch):
    """GLIBC_TUNABLES is glibc's own way of setting them (the MALLOC_*_ variables are its older one)."""
    for name in host_memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert host_memory._set_thresholds() is False


def test_a_loader_worker_started_afresh_keeps_its_freed_memory():
    """Loader workers forked from a script inherit the setting; started as fresh interpreters (forkserver, spawn:
    Python 3.14's default on Linux, macOS's) each sets it in its init function."""
    code = ("from DataLoader.loader import init_worker; from utils import host_memory; init_worker(0); "
            "print(host_memory._kept)")
    out = python("-c", code)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
