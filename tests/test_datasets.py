"""The dataset SDK on real training trees (copies of the demo's `train/`): sampling, splits, index cache,
bad files, box/mask/padding geometry, shared preprocessing, workers and DDP sharding."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from qmedsam.data.preprocess import geometry_for, preprocess_image, resize_mask
from qmedsam.datasets import modality as datasets
from qmedsam.datasets.modality import DEFAULT_MIN_MASK_PIXELS, GatherModalityDataset, ModalityDataset, Sample

CT_3D = "CT/TotalSeg/3D_CT_TotalSeg_0001.npz"
CT_2D = "CT/TotalSeg/2D_CT_TotalSeg_0001.npz"
MR_MNI = "MR/MNI152/3D_MR_MNI152_0001.npz"
MR_TS = "MR/TotalSeg/3D_MR_TotalSeg_0001.npz"
MICRO = "Microscopy/DSB2018/2D_Microscopy_DSB2018_0001.npz"


@pytest.fixture()
def tree(tmp_path: Path, demo_dir: Path) -> Path:
    """A private copy of the demo's real training tree (hidden folders, i.e. any index, left out)."""
    root = tmp_path / "tree"
    shutil.copytree(demo_dir / "train", root, ignore=shutil.ignore_patterns(".*"))
    return root


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def raw_slice(root: Path, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The original slice (and labels) a key names, read straight from the tree's .npz."""
    rel, z = key.rsplit(":", 1)
    data = load(root / rel)
    gts = data.get("gts")
    if Path(rel).name.startswith("2D_"):
        assert z == "0"
        return data["imgs"], gts
    return data["imgs"][int(z)], None if gts is None else gts[int(z)]


def flip(array: np.ndarray, flips: torch.Tensor) -> np.ndarray:
    hflip, vflip = (bool(f) for f in flips)
    if vflip:
        array = array[::-1]
    if hflip:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def write_manifest(root: Path, splits: dict[str, str]) -> None:
    cases = [{"file": f, "split": s, "labelled": True} for f, s in splits.items()]
    (root / "manifest.json").write_text(json.dumps({"format": "qmedsam training tree", "cases": cases}))


def same(a: Sample, b: Sample) -> bool:
    return (
        torch.equal(a.image, b.image)
        and torch.equal(a.mask, b.mask)
        and torch.equal(a.box, b.box)
        and torch.equal(a.flips, b.flips)
        and (a.labelled, a.label, a.key) == (b.labelled, b.label, b.key)
    )


def differences(a: Sample, b: Sample) -> dict:
    """What differs between two samples that should be equal (for an assertion message)."""
    out: dict = {"keys": (a.key, b.key)}
    for name in ("image", "mask", "box", "flips"):
        x, y = getattr(a, name), getattr(b, name)
        if x.shape != y.shape or not torch.equal(x, y):
            diff = (x.double() - y.double()).abs() if x.shape == y.shape else None
            out[name] = "shape" if diff is None else (float(diff.max()), int((diff > 0).sum()))
    if (a.labelled, a.label) != (b.labelled, b.label):
        out["label"] = ((a.labelled, a.label), (b.labelled, b.label))
    return out


def files_of(keys: list[str]) -> set[str]:
    return {k.rsplit(":", 1)[0] for k in keys}


# --------------------------------------------------------------------------------------------------
# Sampling strategies, epochs, seeds


def test_sampling_strategies_give_documented_counts(tree: Path, caplog: pytest.LogCaptureFixture):
    g = GatherModalityDataset(tree, mod_sample=None)
    assert g.mod_names() == ["CT", "MR", "Microscopy"]
    n = g.mod_sources()
    assert g.mod_samples() == n and len(g) == sum(n)
    assert n[2] == 1 and min(n) == 1 and n[0] > 10 and n[1] > 10  # OneTenth's floor matters for Microscopy
    low = min(n)
    expected = {
        "Min": [low] * 3,
        "OneTenth": [max(k // 10, low) for k in n],
        "All": n,
        None: n,
        5: [min(5, k) for k in n],
        (3, 7, None): [3, 7, n[2]],
        (0, None, 1): [0, n[1], 1],
    }
    for strategy, counts in expected.items():
        g.modify_mod_sample(list(strategy) if isinstance(strategy, tuple) else strategy)
        assert g.mod_samples() == counts, strategy
        assert len(g) == sum(counts) == len(g.sample_keys()) == len(set(g.sample_keys()))
        assert GatherModalityDataset(tree, mod_sample=strategy).mod_samples() == counts
    assert expected["OneTenth"] == [n[0] // 10, n[1] // 10, 1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qmedsam.datasets.modality"):
        g.modify_mod_sample(20)
    assert g.mod_samples() == [20, 20, 1]
    assert any("Microscopy" in r.getMessage() and "sample=20" in r.getMessage() for r in caplog.records)


def test_constructor_inputs_are_validated(tree: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="nowhere"):
        GatherModalityDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        ModalityDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no modality folders"):
        GatherModalityDataset(tmp_path / "empty")
    (tmp_path / "empty" / "CT" / "TotalSeg").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no \.npz files"):
        ModalityDataset(tmp_path / "empty" / "CT")
    with pytest.raises(ValueError, match="no modality folder yields samples"):
        GatherModalityDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="OneTenth"):
        GatherModalityDataset(tree, mod_sample="Half")
    with pytest.raises(ValueError, match=r"2 entries; expected one per modality \(3\)"):
        GatherModalityDataset(tree, mod_sample=[1, 2])
    g = GatherModalityDataset(tree, mod_sample="Min")
    with pytest.raises(ValueError, match="mod_sample"):
        g.modify_mod_sample([1, 2, 3, 4])
    with pytest.raises(ValueError, match="mod_sample"):
        g.modify_mod_sample(-1)
    with pytest.raises(ValueError, match="manifest.json"):
        ModalityDataset(tree / "CT", split="validation")
    with pytest.raises(ValueError, match="unique"):
        GatherModalityDataset([tree / "CT", tmp_path / "empty" / "CT"])


def test_shuffle_redraws_and_the_seed_fixes_the_draws(tree: Path):
    a = ModalityDataset(tree / "MR", sample=10, seed=3)
    b = ModalityDataset(tree / "MR", sample=10, seed=3)
    first = a.sample_keys()
    assert len(first) == 10 and a.num_sources > 10 and first == b.sample_keys()
    assert all(same(a[i], b[i]) for i in range(4))
    a.shuffle()
    assert a.epoch == 1 and a.sample_keys() != first
    b.set_epoch(1)
    assert b.sample_keys() == a.sample_keys() and same(a[0], b[0])
    assert ModalityDataset(tree / "MR", sample=10, seed=4).sample_keys() != first
    fixed = ModalityDataset(tree / "MR", sample=10, seed=3, shuffle=False)
    kept = fixed.sample_keys()
    fixed.shuffle()
    assert fixed.sample_keys() == kept

    g = GatherModalityDataset(tree, mod_sample=5, seed=3)
    before = {d.name: d.sample_keys() for d in g.datasets}
    g.shuffle()
    assert [d.epoch for d in g.datasets] == [1, 1, 1] and g.epoch == 1
    after = {d.name: d.sample_keys() for d in g.datasets}
    assert after["CT"] != before["CT"] and after["MR"] != before["MR"]
    assert after["Microscopy"] == before["Microscopy"]  # n = 1: nothing to re-draw


def test_manifest_selects_the_split(tree: Path, caplog: pytest.LogCaptureFixture):
    write_manifest(tree, {CT_3D: "train", CT_2D: "train", MR_TS: "train", MR_MNI: "validation"})  # Microscopy unlisted
    with caplog.at_level(logging.WARNING, logger="qmedsam.datasets.modality"):
        train = GatherModalityDataset(tree, mod_sample=None)
    assert files_of(train.sample_keys()) == {CT_3D, CT_2D, MR_TS}
    assert train.mod_names() == ["CT", "MR"] and "Microscopy" in train.dropped
    assert any("not in" in r.getMessage() and "Microscopy" in r.getMessage() for r in caplog.records)
    validation = GatherModalityDataset(tree, mod_sample=None, split="validation")
    assert files_of(validation.sample_keys()) == {MR_MNI}
    everything = GatherModalityDataset(tree, mod_sample=None, split="all")
    assert files_of(everything.sample_keys()) == {CT_3D, CT_2D, MR_TS, MR_MNI, MICRO}
    assert len(everything) == len(train) + len(validation) + 1
    assert ModalityDataset(tree / "MR").sample_keys() == [k for k in train.sample_keys() if k.startswith("MR/")]


# --------------------------------------------------------------------------------------------------
# Index cache


def test_index_is_reused_and_follows_file_changes(tree: Path):
    folder = tree / "MR"
    a = ModalityDataset(folder)
    assert a.index_stats == {"reused": 0, "indexed": 2, "removed": 0, "skipped": 0}
    assert a.index_path == folder / ".qmedsam-index" / "index-s256.json"
    index = json.loads(a.index_path.read_text())
    assert index["version"] == datasets.INDEX_VERSION and index["image_size"] == 256
    mri = index["files"]["MNI152/3D_MR_MNI152_0001.npz"]
    table = np.asarray(mri["table"]).reshape(-1, 3)
    assert set(table[:, 1].tolist()) == {1, 2} and (table[:, 2] > 0).all()
    stamp = a.index_path.stat().st_mtime_ns

    b = ModalityDataset(folder)
    assert b.index_stats == {"reused": 2, "indexed": 0, "removed": 0, "skipped": 0}
    assert a.index_path.stat().st_mtime_ns == stamp and b.sample_keys() == a.sample_keys()

    # modify (a real crop of the volume), add (a copy under a new name)
    data = load(tree / MR_MNI)
    np.savez_compressed(tree / MR_MNI, imgs=data["imgs"][:40], gts=data["gts"][:40], spacing=data["spacing"])
    added = folder / "TotalSeg" / "3D_MR_TotalSeg_0002.npz"
    shutil.copy(tree / MR_TS, added)
    c = ModalityDataset(folder)
    assert c.index_stats == {"reused": 1, "indexed": 2, "removed": 0, "skipped": 0}
    mni_slices = [int(k.rsplit(":", 1)[1]) for k in c.sample_keys() if k.startswith(MR_MNI)]
    assert mni_slices and max(mni_slices) < 40
    assert sum(k.startswith("MR/TotalSeg/3D_MR_TotalSeg_0002.npz:") for k in c.sample_keys()) == sum(
        k.startswith(MR_TS + ":") for k in c.sample_keys()
    )

    # remove: its entry and cached arrays go
    added.unlink()
    d = ModalityDataset(folder)
    assert d.index_stats == {"reused": 2, "indexed": 0, "removed": 1, "skipped": 0}
    assert not any("0002" in k for k in d.sample_keys())
    assert not list((folder / ".qmedsam-index" / "arrays").rglob("*0002*"))

    # a lost array cache or another image size rebuilds
    (folder / ".qmedsam-index" / "arrays" / "TotalSeg" / "3D_MR_TotalSeg_0001.npz.imgs.npy").unlink()
    assert ModalityDataset(folder).index_stats["indexed"] == 1
    small = ModalityDataset(folder, image_size=128)
    assert small.index_stats["indexed"] == 2 and small.index_path.name == "index-s128.json"
    assert small[0].image.shape == (3, 128, 128)


def test_index_goes_to_the_cache_when_the_folder_is_not_writable(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Root writes anywhere, so the unwritable folder is simulated at the one probe the SDK makes.
    monkeypatch.setattr(datasets, "_dir_writable", lambda folder: tree not in Path(folder).parents)
    monkeypatch.setenv("QMEDSAM_CACHE", str(tmp_path / "cache"))
    ds = ModalityDataset(tree / "CT")
    assert ds.index_dir.parent == tmp_path / "cache" / "index" and ds.index_dir.name.startswith("CT-")
    assert not (tree / "CT" / ".qmedsam-index").exists()
    assert ModalityDataset(tree / "CT").index_stats["indexed"] == 0
    explicit = ModalityDataset(tree / "CT", cache_dir=tmp_path / "mine")
    assert explicit.index_dir.parent == tmp_path / "mine" and explicit.index_dir.name == ds.index_dir.name
    assert same(explicit[0], ds[0])


# --------------------------------------------------------------------------------------------------
# Bad data


def test_bad_files_are_skipped_with_their_reason(tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    good = ModalityDataset(tree / "CT", cache_dir=tmp_path / "other-cache")
    data = load(tree / CT_3D)
    raw = (tree / CT_3D).read_bytes()
    bad = tree / "CT" / "Damaged"
    bad.mkdir()
    np.savez_compressed(bad / "3D_CT_noimgs.npz", gts=data["gts"], spacing=data["spacing"])
    np.savez_compressed(bad / "3D_CT_shape.npz", imgs=data["imgs"], gts=data["gts"][:, :, :-1])
    with_nan = data["imgs"].astype(np.float32)
    with_nan[3, 10, 10] = np.nan
    np.savez_compressed(bad / "3D_CT_nan.npz", imgs=with_nan, gts=data["gts"])
    np.savez_compressed(bad / "3D_CT_background.npz", imgs=data["imgs"], gts=np.zeros_like(data["gts"]))
    (bad / "3D_CT_truncated.npz").write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    corrupt[len(raw) // 3 : len(raw) // 3 + 2000] = bytes(2000)
    (bad / "3D_CT_corrupt.npz").write_bytes(bytes(corrupt))
    reasons = {
        "noimgs": "no 'imgs' array",
        "shape": "expected the image's spatial shape",
        "nan": "NaN",
        "background": "all background",
        "truncated": "unreadable",
        "corrupt": "unreadable",
    }
    with caplog.at_level(logging.WARNING, logger="qmedsam.datasets.modality"):
        ds = ModalityDataset(tree / "CT")
    assert ds.index_stats["skipped"] == len(reasons) == len(ds.skipped)
    for stem, reason in reasons.items():
        key = f"CT/Damaged/3D_CT_{stem}.npz"
        assert reason in ds.skipped[key], (key, ds.skipped[key])
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and f"3D_CT_{stem}.npz" in r.getMessage()]
        assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert ds.sample_keys() == good.sample_keys() and ds.num_sources == good.num_sources
    assert all(ds[i].labelled for i in range(3))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qmedsam.datasets.modality"):
        again = GatherModalityDataset(tree, mod_sample=None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # warned once, at index time
    assert again.skipped == ds.skipped and again.datasets[0].index_stats["indexed"] == 0
    assert again.mod_sources()[0] == good.num_sources


# --------------------------------------------------------------------------------------------------
# Sample geometry


def test_boxes_contain_masks_and_stay_in_the_resized_extent(tree: Path):
    g = GatherModalityDataset(tree, mod_sample=None, bbox_shift=20, seed=1)
    shapes = {k.rsplit(":", 1)[0]: None for k in g.sample_keys()}
    for rel in shapes:
        imgs = load(tree / rel)["imgs"]
        shapes[rel] = imgs.shape[:2] if Path(rel).name.startswith("2D_") else imgs.shape[1:3]
    flips, margins, paddings = set(), [], set()
    for epoch in (0, 1):
        g.set_epoch(epoch)
        for i in range(len(g)):
            s = g[i]
            new_h, new_w = geometry_for(*shapes[s.key.rsplit(":", 1)[0]]).resized
            assert s.labelled and s.label > 0 and s.image.dtype == torch.float32 and s.mask.dtype == torch.uint8
            assert s.image.shape == (3, 256, 256) and s.mask.shape == (1, 256, 256) and s.box.shape == (4,)
            mask = s.mask[0].numpy()
            assert set(np.unique(mask).tolist()) == {0, 1} and mask.sum() >= DEFAULT_MIN_MASK_PIXELS
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = s.box.tolist()
            assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
            assert 0 <= x0 <= x1 <= new_w - 1 <= 255 and 0 <= y0 <= y1 <= new_h - 1 <= 255
            margins += [xs.min() - x0, ys.min() - y0, x1 - xs.max(), y1 - ys.max()]
            image = s.image.numpy()
            assert image.min() >= 0 and image.max() <= 1
            assert (
                not image[:, new_h:, :].any() and not image[:, :, new_w:].any()
            )  # padding bottom/right, flipped or not
            assert not mask[new_h:, :].any() and not mask[:, new_w:].any()
            flips.add(tuple(s.flips.tolist()))
            paddings.add((new_h < 256, new_w < 256))
    assert flips == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert paddings >= {(True, False), (False, True)}  # bottom padding (CT) and right padding (MNI) both seen
    margins = np.asarray(margins)
    assert margins.min() >= 0 and margins.max() <= 20 and margins.mean() > 3


def test_sample_is_the_shared_preprocessing_of_the_flipped_raw_slice(tree: Path):
    g = GatherModalityDataset(tree, mod_sample=None, seed=2)
    flipped = 0
    for i in range(0, len(g), 5):
        s = g[i]
        image, labels = raw_slice(tree, s.key)
        expected, geometry = preprocess_image(flip(image, s.flips))
        assert torch.equal(s.image, torch.from_numpy(expected[0])), s.key
        assert np.array_equal(s.mask[0].numpy(), resize_mask(flip(labels, s.flips), geometry) == s.label)
        flipped += bool(s.flips.any())
    assert flipped >= 3
    plain = GatherModalityDataset(tree, mod_sample=None, augment=False)
    assert all(not plain[i].flips.any() for i in range(len(plain)))


def test_unlabelled_files_give_random_boxes_and_empty_masks(tree: Path):
    mni = load(tree / MR_MNI)["imgs"]
    (tree / "MR" / "Unlabelled").mkdir()
    np.savez_compressed(tree / "MR" / "Unlabelled" / "3D_MR_nolabel.npz", imgs=mni)  # a real image, gts dropped
    micro = load(tree / MICRO)["imgs"]
    (tree / "Microscopy" / "Unlabelled").mkdir()
    np.savez_compressed(tree / "Microscopy" / "Unlabelled" / "2D_Microscopy_nolabel.npz", imgs=micro)

    mr = ModalityDataset(tree / "MR", seed=5)
    unlabelled = [i for i, k in enumerate(mr.sample_keys()) if k.startswith("MR/Unlabelled/")]
    non_constant = int((mni.reshape(len(mni), -1).max(1) > mni.reshape(len(mni), -1).min(1)).sum())
    assert len(unlabelled) == non_constant and 0 < non_constant <= len(mni)
    new_h, new_w = geometry_for(*mni.shape[1:]).resized
    widths = []
    for i in unlabelled:
        s = mr[i]
        assert not s.labelled and s.label == 0 and not s.mask.any()
        x0, y0, x1, y1 = s.box.tolist()
        assert 0 <= x0 <= x1 <= new_w - 1 and 0 <= y0 <= y1 <= new_h - 1
        w, h = x1 - x0 + 1, y1 - y0 + 1
        assert 0.1 * new_w - 1 <= w <= 0.6 * new_w + 1 and 0.1 * new_h - 1 <= h <= 0.6 * new_h + 1
        widths.append(w / new_w)
        expected, _ = preprocess_image(flip(raw_slice(tree, s.key)[0], s.flips))
        assert torch.equal(s.image, torch.from_numpy(expected[0]))
    assert min(widths) < 0.25 and max(widths) > 0.45  # the documented 10-60 % spread, not one size

    micro_ds = ModalityDataset(tree / "Microscopy")
    assert sorted(micro_ds.sample_keys()) == [
        "Microscopy/DSB2018/2D_Microscopy_DSB2018_0001.npz:0",
        "Microscopy/Unlabelled/2D_Microscopy_nolabel.npz:0",
    ]
    batch = next(iter(DataLoader(micro_ds, batch_size=2, shuffle=False)))
    assert isinstance(batch, Sample) and batch.image.shape == (2, 3, 256, 256) and batch.mask.shape == (2, 1, 256, 256)
    assert batch.labelled.tolist() == [True, False] and batch.flips.shape == (2, 2) and len(batch.key) == 2

    assert not any(k.startswith("MR/Unlabelled/") for k in ModalityDataset(tree / "MR", unlabelled=False).sample_keys())


# --------------------------------------------------------------------------------------------------
# Workers, DDP, pickling


def collect(loader: DataLoader) -> list[Sample]:
    out = []
    for batch in loader:
        for j in range(len(batch.key)):
            out.append(Sample(*(field[j] for field in batch)))
    return out


def test_workers_and_distributed_sampler_cover_each_sample_once(tree: Path):
    g = GatherModalityDataset(tree, mod_sample=[9, 22, 1], seed=5)
    g.set_epoch(2)
    assert len(g) == 32
    serial = collect(DataLoader(g, batch_size=4, num_workers=0))
    parallel = collect(DataLoader(g, batch_size=4, num_workers=2))
    assert [s.key for s in serial] == g.sample_keys() and len(set(g.sample_keys())) == 32
    assert len(parallel) == 32
    differing = [differences(a, b) for a, b in zip(serial, parallel, strict=True) if not same(a, b)]
    assert not differing, differing  # seen once in a full suite run (not reproduced alone): say what differed

    # Two "ranks": independent constructions with the same arguments see the same dataset.
    ranks = [GatherModalityDataset(tree, mod_sample=[9, 22, 1], seed=5) for _ in range(2)]
    for dataset in ranks:
        dataset.set_epoch(2)
    assert ranks[0].sample_keys() == ranks[1].sample_keys() == g.sample_keys()
    seen: list[str] = []
    for rank, dataset in enumerate(ranks):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=11)
        sampler.set_epoch(2)
        got = collect(DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2 if rank else 0))
        assert [s.key for s in got] == [g.sample_key(i) for i in sampler]
        assert all(same(s, serial[i]) for s, i in zip(got, sampler, strict=True))
        seen += [s.key for s in got]
    assert sorted(seen) == sorted(g.sample_keys())  # disjoint and complete

    third = []
    for rank in range(3):  # 32 % 3 != 0: drop_last never repeats a sample
        sampler = DistributedSampler(g, num_replicas=3, rank=rank, shuffle=True, seed=11, drop_last=True)
        sampler.set_epoch(4)
        third += list(sampler)
    assert len(third) == 30 and len(set(third)) == 30

    blob = pickle.dumps(g)  # memory maps are open by now; they are not pickled
    assert len(blob) < 50_000
    copy = pickle.loads(blob)
    assert all(not d._open for d in copy.datasets) and same(copy[7], g[7])
