"""H.264 writing is reproducible: the same frames give the same mp4 bytes whatever the heap held before the encode
(x264's AVX-512 lookahead code reads memory it never wrote; see `video_io._x264_params`)."""

import ctypes
import ctypes.util
import hashlib
import random
import sys

import numpy as np
import pytest

from mindspeed_mm_osp.inference.video_io import write_mp4


def _dirty_heap(rng: random.Random) -> None:
    """Free malloc blocks of varied sizes, each full of an arbitrary byte, for the encoder's next allocations."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    blocks = []
    for _ in range(2000):
        size = rng.choice([64, 256, 1024, 4096, 8192, 65536, 300000, 1 << 20])
        blocks.append(libc.malloc(size))
        libc.memset(blocks[-1], rng.randrange(256), size)
    for block in blocks:
        libc.free(block)


def _frames() -> np.ndarray:
    """A moving smooth pattern under strong noise, 160 pixels wide (a width where x264's AVX-512 code misreads)."""
    g = np.random.default_rng(0)
    x = np.arange(200)
    pattern = 128 + 100 * np.stack([np.sin(x / 5 + c) for c in range(3)], -1)[None].repeat(136, 0)
    return np.stack([pattern[t:t + 96, 2 * t:2 * t + 160] + g.normal(0, 40, (96, 160, 3))
                     for t in range(9)]).clip(0, 255).astype(np.uint8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dirties the heap through glibc's malloc")
def test_same_frames_give_the_same_mp4_bytes(tmp_path):
    frames, rng = _frames(), random.Random(0)
    digests = set()
    for i in range(6):
        _dirty_heap(rng)
        digests.add(hashlib.sha256(write_mp4(tmp_path / f"{i}.mp4", frames, 8).read_bytes()).hexdigest())
    assert len(digests) == 1
