import os
import subprocess
import sys

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# Where glibc serves four 24 MiB blocks from (bytes mapped with mmap) and how much of them it keeps once they are
# freed (free bytes left in the heap), in MiB: a training step's activations are blocks of this kind.
HEAP_OF_FREED_BLOCKS = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print("unsupported"); sys.exit()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "tuned":
    from dalle.runtime import keep_freed_memory
    assert keep_freed_memory()
blocks = [libc.malloc(24 << 20) for _ in range(4)]
mapped = libc.mallinfo2().hblkhd
for block in blocks:
    libc.free(block)
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""

# Page faults per new 24 MiB tensor when a step's worth of them (96 MiB) is freed and allocated again, as a training
# step's activations are: 6,144 per tensor if none of the memory is reused.
COUNT_FAULTS = """
import resource, sys
if sys.argv[1] == "tuned":
    from dalle.runtime import keep_freed_memory
    assert keep_freed_memory()
import torch
torch.set_num_threads(1)
x = torch.rand(6, 1024, 1024)
def step():
    activations = [x * 0.5 for _ in range(4)]
    del activations
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _run(script: str, mode: str) -> str:
    from dalle.runtime import MALLOC_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
    return subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@linux_only
def test_keep_freed_memory_serves_large_blocks_from_a_heap_that_keeps_them():
    default = _run(HEAP_OF_FREED_BLOCKS, "default")
    if default == "unsupported":
        pytest.skip("glibc without mallinfo2 (older than 2.33)")
    # By default a fresh process maps each block on its own and unmaps it when freed: nothing is kept.
    assert [int(n) for n in default.split()] == [96, 0]
    mapped, kept = (int(n) for n in _run(HEAP_OF_FREED_BLOCKS, "tuned").split())
    assert mapped == 0 and kept >= 96, (mapped, kept)


@linux_only
def test_keep_freed_memory_lets_new_tensors_reuse_freed_pages():
    # glibc's own heuristics sometimes reuse part of the memory too (its default varied between machines here:
    # 920 to 2,800 faults per tensor), so only the tuned process is held to a bound.
    tuned = float(_run(COUNT_FAULTS, "tuned"))
    assert tuned < 6144 / 3, tuned


def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch):
    from dalle.runtime import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
