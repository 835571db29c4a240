"""Artifacts verified on read: safetensors digests and sizes, Parquet page checksums, JSON, done
markers checked against their outputs' sizes, and ``DamagedArtifactError`` through Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors

from msif_ray.store.layout import done_marker
from msif_ray.store.markers import done_outputs
from msif_ray.store.storage import DIGESTS_KEY, DamagedArtifactError, RunDir

NAME = "factors/finetune/k/layers/l0.safetensors"


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"Q_A": torch.randn(8, 8, generator=generator), "Q_S": torch.randn(4, 4, dtype=torch.float64, generator=generator),
            "half": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0)}


def flip(path: Path, offset: int) -> None:
    """Flip every bit of the byte at ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_offset(store: RunDir, name: str, key: str) -> int:
    """The file offset of the first byte of tensor ``key``."""
    header = store.tensor_header(name)
    return header["__start__"] + header[key]["data_offsets"][0]


@pytest.fixture
def store(tmp_path: Path) -> RunDir:
    store = RunDir(str(tmp_path))
    store.save_tensors(NAME, tensors(), {"layer": "l0"})
    return store


def test_digests_round_trip_and_the_callers_metadata_is_kept(store: RunDir) -> None:
    loaded, metadata = store.load_tensors(NAME)
    assert metadata == {"layer": "l0"}
    assert all(torch.equal(loaded[k], v) for k, v in tensors().items())
    assert set(json.loads(store.tensor_header(NAME)["__metadata__"][DIGESTS_KEY])) == set(tensors())
    part, _ = store.load_tensors(NAME, ["Q_S", "empty"])
    assert torch.equal(part["Q_S"], tensors()["Q_S"]) and part["empty"].shape == (0,)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "flip header", "flip size"])
def test_damage_raises_naming_the_file(store: RunDir, tmp_path: Path, damage: str) -> None:
    path = tmp_path / NAME
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "flip":
        flip(path, tensor_offset(store, NAME, "Q_A") + 3)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip header":
        flip(path, 20)
    else:
        flip(path, 0)  # the header's length
    with pytest.raises(DamagedArtifactError, match=str(path)) as raised:
        store.load_tensors(NAME)
    assert raised.value.name == NAME and raised.value.root == str(tmp_path)


def test_a_partial_read_detects_a_flipped_byte_in_its_tensor(store: RunDir, tmp_path: Path) -> None:
    flip(tmp_path / NAME, tensor_offset(store, NAME, "Q_S") + 10)
    assert torch.equal(store.load_tensors(NAME, ["Q_A"])[0]["Q_A"], tensors()["Q_A"])  # the others still read
    with pytest.raises(DamagedArtifactError, match="tensor 'Q_S' does not match its sha256"):
        store.load_tensors(NAME, ["Q_S"])


def test_a_partial_read_detects_a_truncated_file(store: RunDir, tmp_path: Path) -> None:
    path = tmp_path / NAME
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DamagedArtifactError, match="where its header describes"):
        store.load_tensors(NAME, ["Q_A"])


def test_files_without_digests_still_load(tmp_path: Path) -> None:
    store = RunDir(str(tmp_path))
    (tmp_path / "old.safetensors").write_bytes(save_safetensors(tensors(), {"layer": "l0"}))
    loaded, metadata = store.load_tensors("old.safetensors")
    assert metadata == {"layer": "l0"} and torch.equal(loaded["Q_A"], tensors()["Q_A"])
    assert torch.equal(store.load_tensors("old.safetensors", ["Q_S"])[0]["Q_S"], tensors()["Q_S"])


def test_parquet_page_checksums_catch_a_flipped_data_byte(tmp_path: Path) -> None:
    store = RunDir(str(tmp_path))
    store.write_parquet("t.parquet", pa.table({"score": pa.array(torch.randn(1000).tolist())}))
    column = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    flip(tmp_path / "t.parquet", start + column.total_compressed_size - 1)  # the last byte of the last page
    with pytest.raises(DamagedArtifactError, match="t.parquet"):
        store.read_parquet("t.parquet")


@pytest.mark.parametrize("data", [b"", b'{"stages": ', b"\xff"])
def test_json_that_does_not_parse_is_damaged(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(DamagedArtifactError, match="manifest.json: not valid JSON"):
        RunDir(str(tmp_path)).read_json("manifest.json")


def test_done_markers_are_checked_against_the_outputs_sizes(tmp_path: Path) -> None:
    store = RunDir(str(tmp_path))
    outputs = [f"scores/k/g0/s{i}.parquet" for i in range(5)]
    for output in outputs:
        store.write_json(done_marker(output), {"bytes": store.write_bytes(output, b"0123456789")})
    (tmp_path / outputs[0]).write_bytes(b"01234")  # truncated
    (tmp_path / outputs[1]).write_bytes(b"")  # emptied
    os.remove(tmp_path / outputs[2])  # missing
    (tmp_path / done_marker(outputs[3])).write_bytes(b"{")  # a damaged marker
    warnings: list[str] = []
    assert list(done_outputs(store, outputs, warnings.append)) == [outputs[4]]
    assert [w.split(": ")[1] for w in warnings] == [str(tmp_path / o) for o in outputs[:4]]
    assert not any(store.exists(done_marker(o)) for o in outputs[:4])  # so that they are reported once
    assert list(done_outputs(store, outputs, warnings.append)) == [outputs[4]] and len(warnings) == 4


def test_ray_re_raises_the_error_as_its_class(ray_session, store: RunDir, tmp_path: Path) -> None:
    (tmp_path / NAME).write_bytes(b"")

    @ray_session.remote
    def load(root: str) -> None:
        RunDir(root).load_tensors(NAME)

    with pytest.raises(DamagedArtifactError) as raised:
        ray_session.get(load.remote(str(tmp_path)))
    assert raised.value.name == NAME and str(tmp_path / NAME) in str(raised.value)


def test_local_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    RunDir(str(tmp_path)).write_bytes("a/b.json", b"{}")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path / "a")
