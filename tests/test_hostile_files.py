"""Hostile case files (tests/data/hostile, README "Input limits"): each is refused with the message of the rule
it breaks, the Python and C++ predictors give the same verdict word for word, a batch of all of them plus a
valid case ends with exit 1, every case in timing.csv and the valid one segmented; outputs never follow a
planted symlink; `export --out` never deletes a folder it did not make."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qmedsam.cli import main
from qmedsam.data.cases import CaseError, read_case, write_segmentation
from qmedsam.data.npz import NpzError, read_npz
from qmedsam.datasets.recipes.sources import ensure_writable_dir
from qmedsam.errors import UserFacingError
from qmedsam.export.staging import check_replaceable, staged_directory
from qmedsam.inference.model_dir import shipped_int8_model_dir

CORPUS = Path(__file__).parent / "data" / "hostile"
LIMIT = 32 * 2**20  # the zip bombs inflate to 64 MiB

# file -> the rule it breaks (a fragment of the message both predictors give)
VERDICTS = {
    "3D_65_members.npz": "65 members; at most 64 are accepted",
    "3D_axis_over_65535.npz": "expected at most 65535 along each axis",
    "3D_bad_crc.npz": "member 'imgs.npy' fails its CRC-32 check (corrupted)",
    "3D_boxes_beyond_int.npz": "key 'boxes' has values beyond +-2147483647 in rows [0]",
    "3D_bzip2_member.npz": "uses compression method 12; expected stored or deflate",
    "3D_complex_image.npz": "dtype '<c8' is not accepted",
    "3D_data_trailing_bytes.npz": "7 bytes follow the array data",
    "3D_data_truncated.npz": "array data is truncated (88 of 128 bytes)",
    "3D_duplicate_member.npz": "member 'imgs' appears twice",
    "3D_empty_file.npz": "not a zip archive",
    "3D_encrypted_member.npz": "member 'imgs.npy' is encrypted",
    "3D_header_33_dims.npz": "shape has more than 32 dimensions",
    "3D_header_60kb.npz": "npy header is 60062 bytes; at most 10000 are accepted",
    "3D_header_expression.npz": "npy header is not a plain dict: expected ',' or ')' at offset 52",
    "3D_header_extra_key.npz": "unexpected key 'x'",
    "3D_header_missing_shape.npz": "npy header lacks ['shape']",
    "3D_header_nested.npz": "npy header is not a plain dict: expected a whole number",
    "3D_member_not_npy.npz": "not a .npy array",
    "3D_missing_boxes.npz": "missing key 'boxes' (found keys: ['imgs'])",
    "3D_negative_dimension.npz": "shape has a negative dimension (-1)",
    "3D_empty_shape_overflows.npz": "array of shape (100001553522344, 1553522344, 0, 4) and dtype float16 is empty, "
    "but its nonzero dimensions span more than",
    "3D_not_a_zip.npz": "not a zip archive",
    "3D_npy_version_9.npz": "npy format version 9 is not accepted",
    "3D_object_dtype.npz": "object arrays (pickles) are not accepted",
    "3D_shape_wraps_2_64.npz": "array of shape (4294967296, 4294967296, 1) and dtype uint8 decodes to more than",
    "3D_string_image.npz": "dtype '<U1' is not accepted",
    "3D_structured_dtype.npz": "structured dtypes are not accepted",
    "3D_truncated_zip.npz": "not a zip archive",
    "3D_zip_bomb.npz": "members declare 67108992 bytes, more than the 33554432-byte limit",
    "3D_zip_bomb_lies.npz": "member 'imgs.npy' fails its CRC-32 check (corrupted)",
    "3D_local_name_differs.npz": "not a zip archive",
    "3D_overlapping_entries.npz": "not a zip archive",
    "3D_prepended_bytes.npz": "not a zip archive",
    "3D_trailing_bytes.npz": "not a zip archive",
    "3D_cp437_member_name.npz": "member '\u251c\u2310.npy': not a .npy array",
}


def test_every_corpus_file_has_a_verdict():
    assert sorted(p.name for p in CORPUS.glob("*.npz")) == sorted(VERDICTS)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_python_refuses_each_hostile_file_by_its_rule(name, monkeypatch):
    monkeypatch.setenv("QMEDSAM_MAX_CASE_BYTES", str(LIMIT))
    with pytest.raises(CaseError) as caught:
        read_case(CORPUS / name)
    assert str(caught.value).startswith(f"{CORPUS / name}: ")
    assert VERDICTS[name] in str(caught.value)


def _timing(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "timing.csv").open(newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_both_predictors_give_one_verdict_on_a_hostile_batch(cpp_binary, demo_dir, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    shutil.copytree(CORPUS, inputs, ignore=shutil.ignore_patterns("*.py"))
    valid = "2D_CT_TotalSeg_0001.npz"
    shutil.copy(demo_dir / "cases" / valid, inputs / valid)
    odd_but_valid = _odd_but_valid_archives(inputs)
    (inputs / "3D_a_folder.npz").mkdir()
    os.mkfifo(inputs / "3D_a_fifo.npz")  # reading it would block forever: both must refuse without opening it
    verdicts = {**VERDICTS, "3D_a_folder.npz": "not a regular file", "3D_a_fifo.npz": "not a regular file"}
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    outputs = {"python": tmp_path / "py", "cpp": tmp_path / "cpp"}
    for out in outputs.values():  # a symlink planted at an output name is replaced, never written through
        out.mkdir()
        (out / valid).symlink_to(victim)
    monkeypatch.setenv("QMEDSAM_MAX_CASE_BYTES", str(LIMIT))
    python_args = ["predict", "-i", str(inputs), "-o", str(outputs["python"]), "-m", "int8", "--precision", "f32"]
    assert main(python_args) == 1
    done = subprocess.run(
        [str(cpp_binary), "-i", str(inputs), "-o", str(outputs["cpp"])], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-3000:]
    rows = {side: _timing(out) for side, out in outputs.items()}
    assert sorted(rows["python"]) == sorted(rows["cpp"]) == sorted([*verdicts, valid, *odd_but_valid])
    for name in odd_but_valid:
        assert rows["python"][name]["status"] == rows["cpp"][name]["status"] == "ok", name
    for name, expected in verdicts.items():
        python, cpp = rows["python"][name], rows["cpp"][name]
        assert python["status"] == cpp["status"] == "error", name
        assert cpp["message"] == python["message"], name
        assert expected in python["message"], name
    assert victim.read_text() == "the user's file"
    for out in outputs.values():
        assert rows["python"][valid]["status"] == rows["cpp"][valid]["status"] == "ok"
        assert not (out / valid).is_symlink()
        with np.load(out / valid) as data:
            assert data["segs"].any()
    with np.load(outputs["python"] / valid) as expected, np.load(outputs["cpp"] / valid) as got:
        assert np.count_nonzero(expected["segs"] != got["segs"]) <= max(
            2, expected["segs"].astype(bool).sum() // 10_000
        )


def _odd_but_valid_archives(folder: Path) -> list[str]:
    """Zips that other writers make and both readers must accept: streamed (sizes in data descriptors),
    zip64 records, an archive comment, a non-ASCII member name."""

    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, chunk) -> int:
            self.data += chunk
            return len(chunk)

    image, boxes = np.zeros((2, 8, 8), np.uint8), np.array([[1, 1, 0, 6, 6, 1]])
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in (("imgs.npy", image), ("boxes.npy", boxes)):
            with archive.open(name, "w") as member:
                np.save(member, array)
    (folder / "3D_valid_streamed.npz").write_bytes(bytes(stream.data))
    with zipfile.ZipFile(folder / "3D_valid_zip64.npz", "w") as archive:
        for name, array in (("imgs.npy", image), ("boxes.npy", boxes)):
            with archive.open(name, "w", force_zip64=True) as member:
                np.save(member, array)
    with zipfile.ZipFile(folder / "3D_valid_comment_unicode.npz", "w") as archive:
        archive.comment = b"written by another tool"
        for name, array in (("imgs.npy", image), ("boxes.npy", boxes), ("größe.npy", np.ones(3))):
            with archive.open(name, "w") as member:
                np.save(member, array)
    return ["3D_valid_streamed.npz", "3D_valid_zip64.npz", "3D_valid_comment_unicode.npz"]


def test_decoded_size_limit_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "3D_x.npz"
    np.savez(path, imgs=np.zeros((4, 16, 16), np.uint8), boxes=np.array([[1, 1, 0, 9, 9, 3]]))
    assert read_npz(path)["imgs"].shape == (4, 16, 16)
    monkeypatch.setenv("QMEDSAM_MAX_CASE_BYTES", "1000")
    with pytest.raises(NpzError, match="decodes to more than 1000 bytes"):
        read_npz(path)
    monkeypatch.setenv("QMEDSAM_MAX_CASE_BYTES", "lots")
    with pytest.raises(NpzError, match="QMEDSAM_MAX_CASE_BYTES='lots'"):
        read_npz(path)


def test_what_numpy_writes_is_accepted(tmp_path):
    arrays = {
        "f16": np.linspace(0, 1, 12, dtype=np.float16).reshape(3, 4),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 6)),
        "flags": np.array([True, False]),
    }
    np.savez_compressed(tmp_path / "a.npz", **arrays)
    got = read_npz(tmp_path / "a.npz")
    for key, value in arrays.items():
        np.testing.assert_array_equal(got[key], value)
        assert got[key].dtype == value.dtype.newbyteorder("=") and got[key].dtype.isnative
    assert read_npz(tmp_path / "a.npz", keys=("scalar",)).keys() == {"scalar"}


def test_a_planted_symlink_at_an_output_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "2D_x.npz").symlink_to(victim)
    write_segmentation(out, "2D_x.npz", np.ones((4, 4), np.uint8))
    assert victim.read_bytes() == b"keep" and not (out / "2D_x.npz").is_symlink()


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    users = tmp_path / "data"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert main(["export", "--out", str(users)]) != 0
    assert re.search(r"is not a qmedsam model folder \(.*meta\.json.*--force", capsys.readouterr().err)
    assert (users / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(UserFacingError, match="exists and is not a folder"):
        check_replaceable(a_file)


def test_a_model_folder_is_replaced_and_a_user_file_inside_it_is_not(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(shipped_int8_model_dir(), model)
    check_replaceable(model)  # a model folder made by export: replaceable
    check_replaceable(tmp_path / "missing")
    with staged_directory(model) as staging:
        (staging / "meta.json").write_text(json.dumps({"format": "qmedsam-openvino", "new": True}))
    assert json.loads((model / "meta.json").read_text())["new"] and not (model / "encoder.xml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or replaced folder left
    (model / "results.csv").write_text("mine")
    with pytest.raises(UserFacingError, match=r"also holds \['results.csv'\]"), staged_directory(model):
        pass
    assert (model / "results.csv").read_text() == "mine"
    with staged_directory(model, force=True) as staging:  # --force: the user asked for it
        (staging / "meta.json").write_text("{}")
    assert not (model / "results.csv").exists()


def test_data_builders_refuse_a_folder_holding_a_users_files(tmp_path, capsys):
    users = tmp_path / "home"
    users.mkdir()
    (users / "cases").mkdir()
    (users / "cases" / "2D_CT_TotalSeg_0001.npz").write_bytes(b"the user's own case")
    assert main(["data", "demo", "--out", str(users)]) != 0
    assert "that qmedsam did not write" in capsys.readouterr().err
    assert (users / "cases" / "2D_CT_TotalSeg_0001.npz").read_bytes() == b"the user's own case"
    fresh = tmp_path / "fresh"
    ensure_writable_dir(fresh)  # new: made and marked, so a rerun into it is allowed
    (fresh / "cases").mkdir()
    ensure_writable_dir(fresh)
