"""Header validation and one-at-a-time reads of safetensors files (model-formats 1.1)."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffusion.safetensors_io import CheckpointError, SafetensorsFiles, read_header


def write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file from a hand-written header, for shapes of damage save_file never produces."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(
        {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16),
         "v_pred": torch.tensor([]), "alpha": torch.tensor(4.0)},
        str(path), metadata={"modelspec.prediction_type": "v"},
    )
    return path


def test_header_gives_names_dtypes_shapes_and_metadata(small_file):
    header = read_header(small_file)
    assert header.shapes() == {"a": (3, 4), "b": (2,), "v_pred": (0,), "alpha": ()}
    assert {name: info.dtype for name, info in header.tensors.items()} == {
        "a": "F32", "b": "BF16", "v_pred": "F32", "alpha": "F32"}
    assert header.metadata == {"modelspec.prediction_type": "v"}


def test_tensors_read_back_with_file_dtype(small_file):
    with SafetensorsFiles([small_file]) as files:
        assert torch.equal(files.get("a"), torch.arange(12.0).reshape(3, 4))
        assert files.get("b").dtype == torch.bfloat16
        assert files.get("v_pred").shape == (0,)


def test_truncated_file_names_first_tensor_that_does_not_fit(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"first": torch.zeros(4), "second": torch.zeros(100), "third": torch.zeros(100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 500])  # cuts into "second" (ends 400 bytes before the end)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated: tensor 'second'"):
        read_header(path)


def test_garbage_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip renamed to .safetensors
    with pytest.raises(CheckpointError, match=r"renamed\.safetensors: not a safetensors file"):
        read_header(path)


def test_tiny_file_shorter_than_length_prefix_is_rejected(tmp_path):
    path = tmp_path / "stub.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(path)


def test_header_that_is_not_json_is_rejected(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"{notjson")
    with pytest.raises(CheckpointError, match="header is not UTF-8 JSON"):
        read_header(path)


def test_overlapping_ranges_are_rejected(tmp_path):
    path = tmp_path / "overlap.safetensors"
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    write_raw(path, header, bytes(24))
    with pytest.raises(CheckpointError, match="tensors 'x' and 'y' overlap"):
        read_header(path)


def test_gap_between_tensors_is_rejected(tmp_path):
    path = tmp_path / "gap.safetensors"
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "y": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    write_raw(path, header, bytes(20))
    with pytest.raises(CheckpointError, match="4 unused bytes before tensor 'y'"):
        read_header(path)


def test_trailing_undescribed_bytes_are_rejected(tmp_path):
    path = tmp_path / "tail.safetensors"
    write_raw(path, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16))
    with pytest.raises(CheckpointError, match="8 bytes after the last tensor"):
        read_header(path)


def test_unknown_dtype_names_the_tensor(tmp_path):
    path = tmp_path / "dtype.safetensors"
    write_raw(path, {"weird.weight": {"dtype": "F12", "shape": [2], "data_offsets": [0, 3]}}, bytes(3))
    with pytest.raises(CheckpointError, match=r"tensor 'weird.weight' has unknown dtype 'F12'"):
        read_header(path)


def test_size_disagreeing_with_shape_names_the_tensor(tmp_path):
    path = tmp_path / "size.safetensors"
    write_raw(path, {"w": {"dtype": "F16", "shape": [3, 3], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(F16 \[3, 3\]\) needs 18 bytes"):
        read_header(path)


def test_duplicate_names_are_rejected(tmp_path):
    path = tmp_path / "dup.safetensors"
    raw = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           '"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}').encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="names tensor 'w' twice"):
        read_header(path)


def test_shards_read_as_one_source(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "1.safetensors"))
    save_file({"b": torch.ones(3)}, str(tmp_path / "2.safetensors"))
    with SafetensorsFiles([tmp_path / "1.safetensors", tmp_path / "2.safetensors"]) as files:
        assert files.shapes() == {"a": (2,), "b": (3,)}
        assert torch.equal(files.get("b"), torch.ones(3))
        assert files.description.endswith("1.safetensors (+1 shards)")


def test_tensor_in_two_shards_is_rejected(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "1.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "2.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'a' is in both"):
        SafetensorsFiles([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])
