"""Video/image readers: decord and PyAV agree frame-exactly; failures carry a reason."""

import numpy as np
import pytest

from mindspeed_mm_osp.data import DecordReader, PyAVReader, ReadError, make_video_reader, media_kind, read_image
from mindspeed_mm_osp.tools.make_synthetic_dataset import decode_frame_index, write_image, write_video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {"gop8": write_video(d / "a.mp4", 50, 64, 96, 24.0, gop=8),
            "gop50": write_video(d / "b.MP4", 50, 64, 96, 30.0, gop=50),
            "dir": d}


@pytest.mark.parametrize("clip", ["gop8", "gop50"])
@pytest.mark.parametrize("indices", [[0, 1, 2], [3, 7, 8, 20, 49], [45, 46, 47, 48, 49], [10, 5, 10, 0], [31]])
def test_decord_and_pyav_same_frames(clips, clip, indices):
    a = DecordReader().read(str(clips[clip]), np.array(indices))
    b = PyAVReader().read(str(clips[clip]), np.array(indices))
    assert a.shape == b.shape == (len(indices), 64, 96, 3) and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert [decode_frame_index(f) for f in a] == indices


@pytest.mark.parametrize("reader", [DecordReader, PyAVReader])
def test_failures_have_reasons(clips, reader):
    d = clips["dir"]
    (d / "zero.mp4").write_bytes(b"")
    (d / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    r = reader()
    for name, reason, idx in [("nope.mp4", "missing", [0]), ("zero.mp4", "empty", [0]), ("junk.mp4", "corrupt", [0]),
                              ("a.mp4", "short", [10, 50])]:
        with pytest.raises(ReadError) as e:
            r.read(str(d / name), np.array(idx))
        assert e.value.reason == reason


def test_reader_selection():
    assert make_video_reader("decoder").name == "decord"  # decord2 is installed here
    assert make_video_reader("pyav").name == "pyav" and make_video_reader("decord").name == "decord"
    with pytest.raises(ValueError):
        make_video_reader("torchvision")


def test_images_and_extensions(tmp_path):
    write_image(tmp_path / "x.PNG", 20, 30, mode="RGBA")
    write_image(tmp_path / "y.jpeg", 20, 30, mode="L")
    for name in ("x.PNG", "y.jpeg"):
        img = read_image(str(tmp_path / name))
        assert img.shape == (1, 20, 30, 3) and img.dtype == np.uint8
    assert media_kind("a/B.JPG") == media_kind("c.webp") == 1 and media_kind("v.MOV") == 0
    assert media_kind("notes.txt") is None
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ReadError, match="corrupt"):
        read_image(str(tmp_path / "bad.jpg"))
