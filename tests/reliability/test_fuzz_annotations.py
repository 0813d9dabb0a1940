"""Property-based fuzzing of the annotation reader and the startup filter: every field of a video record and of an
image record is replaced by values of any JSON type and size (NaN, inf, 10^30, negatives, nested lists, objects,
captions with bytes that are not UTF-8); the index is built all the same, the good records all survive, and the
broken one is kept or dropped for exactly one counted reason. A dataset where nothing survives ends with one line.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.data import PreprocessParameters
from mindspeed_mm_osp.data import build_index, load_annotations
from mindspeed_mm_osp.data.annotations import DROP_REASONS
from mindspeed_mm_osp.data.index import COUNTER_NAMES
from mindspeed_mm_osp.data.readers import DatasetError
from mindspeed_mm_osp.tools.make_synthetic_dataset import CONFIG_A
from reliability_harness import log

VIDEO = {"path": "v.mp4", "cap": "a clip", "resolution": {"height": 128, "width": 256}, "num_frames": 40, "fps": 24,
         "cut": [0, 40], "crop": [0, 256, 0, 128], "aesthetic": 5.0}
IMAGE = {"path": "i.jpg", "cap": ["an image", "the same image"], "resolution": {"height": 128, "width": 256},
         "aes": 4.5}
GOOD_COPIES = 4  # the minority filter keeps a shape with >= 4 x global batch (1) members
NOT_UTF8 = "\udcff\udcfe"  # bytes 0xff 0xfe of a file that is not UTF-8, as the reader sees them

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6) | st.just(NOT_UTF8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(["height", "width", "x"]),
                                                                      children, max_size=3),
    max_leaves=8)


def _mutations(record: dict):
    """(field, value): any field of `record` (or inside its resolution) replaced by any JSON value, or removed."""
    fields = sorted(record) + ["resolution.height", "resolution.width"]
    return st.tuples(st.sampled_from(fields), ANY_JSON | st.just("<removed>"))


def _apply(record: dict, field: str, value) -> dict:
    out = json.loads(json.dumps(record))
    target, key = (out["resolution"], field.split(".")[1]) if "." in field else (out, field)
    if value == "<removed>":
        target.pop(key, None)
    elif isinstance(target, dict):
        target[key] = value
    return out


def _write(root, records: list) -> str:
    """data.txt naming one annotation file; strings holding NOT_UTF8 become those raw bytes in the file."""
    anno = root / "anno.json"
    text = json.dumps(records, ensure_ascii=False, allow_nan=True)
    anno.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    (root / "data.txt").write_text(f"{root},{anno}\n")
    return str(root / "data.txt")


@pytest.fixture(scope="module")
def preprocess():
    return from_dict(PreprocessParameters, CONFIG_A)


@pytest.fixture(scope="module")
def stats():
    counts = {"cases": 0, "kept": 0, "dropped": {}}
    yield counts
    log(f"annotation fuzzing (one mutated record among {2 * GOOD_COPIES} good ones): {counts}")


def test_every_field_of_every_record_type(preprocess, tmp_path_factory, stats):
    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(["video", "image"]), _mutations(VIDEO), _mutations(IMAGE))
    def run(kind, video_mutation, image_mutation):
        base, mutation = (VIDEO, video_mutation) if kind == "video" else (IMAGE, image_mutation)
        bad = _apply(base, *mutation)
        records = [dict(VIDEO, path=f"v{i}.mp4") for i in range(GOOD_COPIES)]
        records += [dict(IMAGE, path=f"i{i}.jpg") for i in range(GOOD_COPIES)] + [bad]
        loaded = load_annotations(_write(tmp_path_factory.mktemp("anno"), records))
        index, fstats = build_index(loaded.records, preprocess, global_batch_size=1, dropped=loaded.dropped,
                                    first_dropped=loaded.first_dropped)
        good = {f"v{i}.mp4" for i in range(GOOD_COPIES)} | {f"i{i}.jpg" for i in range(GOOD_COPIES)}
        kept = {p.rsplit("/", 1)[-1] for p in index.paths}
        assert good <= kept, (mutation, sorted(good - kept))
        reasons = fstats.reasons()
        assert set(reasons) <= set(DROP_REASONS) | set(COUNTER_NAMES), reasons
        assert sum(reasons.values()) + len(index) == fstats.records_in == len(records), (mutation, reasons)
        stats["cases"] += 1
        stats["kept"] += int(len(index) > len(good))
        for reason in reasons:
            stats["dropped"][reason] = stats["dropped"].get(reason, 0) + reasons[reason]

    run()


def test_nothing_survives_is_one_line_with_counts_and_first_path(preprocess, tmp_path):
    records = [dict(VIDEO, fps=0), dict(IMAGE, cap=NOT_UTF8), dict(VIDEO, crop=[5, 1, 0, 9]), {"cap": "no path"},
               dict(IMAGE, path="first.jpg", resolution={"height": 8, "width": 8})]
    loaded = load_annotations(_write(tmp_path, records))
    assert dict(loaded.dropped) == {"bad_fps": 1, "bad_cap": 1, "bad_crop": 1, "malformed": 1}
    with pytest.raises(DatasetError) as err:
        build_index(loaded.records, preprocess, global_batch_size=1, dropped=loaded.dropped,
                    first_dropped=loaded.first_dropped)
    message = str(err.value)
    assert "\n" not in message and "5 records in" in message and "first.jpg" in message
    assert "'bad_fps': 1" in message and "'img_res_too_small': 1" in message


@pytest.mark.parametrize("content, named", [
    (b'[{"path": "a.mp4", "cap": "x"', "invalid JSON at line 1"),
    (b'{"path": "a.mp4"}', "must hold a JSON array"),
    (b"\xff\xfe" + bytes(range(256)), "invalid JSON"),
])
def test_unreadable_annotation_file_is_named(tmp_path, content, named):
    anno = tmp_path / "anno.json"
    anno.write_bytes(content)
    (tmp_path / "data.txt").write_text(f"{tmp_path},{anno}\n")
    with pytest.raises(DatasetError, match=named) as err:
        load_annotations(tmp_path / "data.txt")
    assert str(anno) in str(err.value)


def test_jsonl_line_that_is_not_json_is_one_dropped_record(tmp_path):
    anno = tmp_path / "anno.jsonl"
    anno.write_bytes(json.dumps(VIDEO).encode() + b"\n{broken\n" + json.dumps(IMAGE).encode() + b"\n")
    (tmp_path / "data.txt").write_text(f"{tmp_path},{anno}\n")
    loaded = load_annotations(tmp_path / "data.txt")
    assert len(loaded.records) == 2 and dict(loaded.dropped) == {"malformed": 1}
    assert loaded.first_dropped == f"{anno} record 1 (malformed)"
