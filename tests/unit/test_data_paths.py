"""An annotation `path` that leaves its data folder (absolute elsewhere, or `..`) is dropped at index time and
counted, unless the data JSON allows it (docs/data.md, docs/security.md)."""

import json

import pytest

from mindspeed_mm_osp.config import load_data_config
from mindspeed_mm_osp.data.loader import build_index_from_config
from mindspeed_mm_osp.tools.make_synthetic_dataset import data_json_dict

GOOD = {"height": 128, "width": 256}
INSIDE = ["a.jpg", "b.jpg", "sub/c.jpg", "sub/../d.jpg"]
OUTSIDE = ["../up.jpg", "sub/../../up2.jpg", "/elsewhere/x.jpg"]


@pytest.fixture
def data_json(tmp_path):
    folder = tmp_path / "media"
    records = [{"path": p, "cap": "c", "resolution": GOOD} for p in INSIDE + OUTSIDE]
    records.append({"path": str(folder / "abs_inside.jpg"), "cap": "c", "resolution": GOOD})  # absolute, inside
    (tmp_path / "anno.json").write_text(json.dumps(records))
    (tmp_path / "data.txt").write_text(f"{folder},{tmp_path / 'anno.json'}\n")

    def write(**basic) -> str:
        cfg = data_json_dict(tmp_path / "data.txt")
        cfg["dataset_param"]["basic_parameters"].update(basic)
        (tmp_path / "data.json").write_text(json.dumps(cfg))
        return str(tmp_path / "data.json")

    return folder, write


def test_paths_outside_the_data_folder_are_dropped_and_counted(data_json):
    folder, write = data_json
    index, stats = build_index_from_config(load_data_config(write()), global_batch_size=1)
    assert stats.counters["path_outside_data_folder"] == len(OUTSIDE)
    assert sorted(index.paths) == sorted([str(folder / p) for p in INSIDE] + [str(folder / "abs_inside.jpg")])
    assert "path_outside_data_folder" in stats.table()


def test_the_data_json_can_allow_them(data_json):
    _, write = data_json
    index, stats = build_index_from_config(load_data_config(write(allow_paths_outside_data_folder=True)),
                                           global_batch_size=1)
    assert stats.counters["path_outside_data_folder"] == 0 and len(index) == len(INSIDE) + len(OUTSIDE) + 1
