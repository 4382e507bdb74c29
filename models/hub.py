"""Models pulled from a Hugging Face-style hub by repository name: `kvside pull OWNER/REPO[:QUANT][@REVISION]`.

The hub's own client lists the repository (sizes and LFS checksums), builds the URLs and headers
(`HF_ENDPOINT`, tokens, `HF_HUB_OFFLINE`) and owns the cache layout; files already in the hub's cache
(pulled by any tool) are used as they are. The transfer itself is kvside's: the hub's client (2.x)
downloads into a file private to its process, so a killed pull starts over, where a pull of several
gigabytes must go on from where it stopped. kvside downloads into the cache's own partial name
(`blobs/<etag>.incomplete`), resumes it with a Range request, hashes as it goes and moves the blob into
place only when size and SHA-256 match the hub's. What was pulled is recorded in
`$KVSIDE_HOME/models/pulled.json` so that the name works everywhere a model name does (`--model`, the
`model` field of a request); the record is written only once every file is present and verified.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvside import atomic
from kvside.errors import KvsideError, ModelNotFound
from kvside.home import subdir

REGISTRY = "pulled.json"
# The quant a pull takes when none is named: the first of these the repository has (llama.cpp's
# and Ollama's usual default first, then larger ones before smaller ones).
PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "BF16", "F16")
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q[1-8](?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?|TQ[12]_0))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_REF = re.compile(r"^(?:(?:https?://)?(?:hf\.co|huggingface\.co)/)?([\w.-]+/[\w.-]+?)(?::([\w.-]+))?(?:@([\w./-]+))?/?$")


class PullError(KvsideError):
    code = "pull_failed"


@dataclass(frozen=True)
class Ref:
    repo: str
    quant: str | None
    revision: str | None

    @property
    def name(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse(text: str) -> Ref:
    """`owner/repo`, `owner/repo:Q4_K_M`, `hf.co/owner/repo:q8_0`, `...@revision`."""
    m = _REF.match(text.strip())
    if not m:
        raise ModelNotFound(f"not a hub model name: {text!r} (expected OWNER/REPO[:QUANT][@REVISION])")
    repo, quant, revision = m.groups()
    return Ref(repo, quant.upper() if quant else None, revision)


def looks_like_ref(text: str) -> bool:
    return bool(_REF.match(text.strip())) and not Path(text).expanduser().exists()


@dataclass(frozen=True)
class HubFile:
    path: str  # relative to the repository root
    size: int
    sha256: str | None  # from the hub's LFS metadata
    git_sha1: str | None  # the git blob id, for files not stored in LFS


def quant_of(path: str) -> str | None:
    """The quantization a GGUF file name carries (the last tag found in its path), upper-case."""
    stem = _SPLIT.sub(".gguf", path)
    found = _QUANT.findall(stem.removesuffix(".gguf"))
    return found[-1].upper() if found else None


def group_by_quant(files: list[HubFile]) -> dict[str, list[HubFile]]:
    """The repository's model GGUFs by quant; split models have all their parts, in order. Vision
    projectors (mmproj) are not models and are left out."""
    groups: dict[str, list[HubFile]] = {}
    for f in files:
        base = f.path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base:
            continue
        groups.setdefault(quant_of(f.path) or base.removesuffix(".gguf").upper(), []).append(f)
    for quant, parts in groups.items():
        parts.sort(key=lambda f: f.path)
        splits = [_SPLIT.search(f.path) for f in parts]
        if any(splits):
            total = {int(s.group(2)) for s in splits if s}
            if not all(splits) or len(total) != 1 or len(parts) != total.pop():
                groups[quant] = []  # a broken or mixed split set: offered by name but refused below
    return groups


def choose(ref: Ref, groups: dict[str, list[HubFile]]) -> tuple[str, list[HubFile]]:
    if not groups:
        raise PullError(f"{ref.repo} has no GGUF files")
    available = ", ".join(sorted(groups))
    if ref.quant:
        quant = ref.quant if ref.quant in groups else next(
            (q for q in groups if q.removeprefix("UD-") == ref.quant), None)
        if quant is None:
            raise PullError(f"{ref.repo} has no {ref.quant} GGUF (it has: {available})")
    elif len(groups) == 1:
        quant = next(iter(groups))
    else:
        quant = next((q for p in PREFERRED_QUANTS for q in (p, f"UD-{p}") if q in groups), None)
        if quant is None:
            raise PullError(f"{ref.repo} has several GGUFs and none of the usual quants; name one: "
                            f"kvside pull {ref.repo}:QUANT (it has: {available})")
    if not groups[quant]:
        raise PullError(f"{ref.repo}:{quant} is split into parts that do not form a whole set")
    return quant, groups[quant]


# -- the record of what was pulled ----------------------------------------------------------------
def _registry_path() -> Path:
    return subdir("models") / REGISTRY


@contextmanager
def _locked():
    """One writer at a time (two pulls, or a pull and an rm, from two terminals)."""
    lock = subdir("models") / f".{REGISTRY}.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def records() -> dict[str, dict]:
    try:
        data = json.loads(_registry_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged record names nothing; a pull rewrites it whole
    return data if isinstance(data, dict) else {}


def _write(data: dict) -> None:
    atomic.write_bytes(_registry_path(), json.dumps(data, indent=2, sort_keys=True).encode())


def pulled() -> list[tuple[str, Path, int]]:
    """(name, first GGUF part, total size) of every pulled model whose files are all present."""
    out = []
    for name, rec in sorted(records().items()):
        paths = [Path(f["path"]) for f in rec.get("files", [])]
        if paths and all(p.is_file() for p in paths):
            out.append((name, paths[0], sum(f["size"] for f in rec["files"])))
    return out


def lookup(query: str) -> tuple[str, Path] | None:
    """The pulled model a name refers to: the exact name, or the repository alone when one quant
    of it was pulled."""
    try:
        ref = parse(query)
    except ModelNotFound:
        return None
    found = pulled()
    exact = [(n, p) for n, p, _ in found if n.lower() == ref.name.lower()]
    if exact:
        return exact[0]
    if ref.quant is None:
        same_repo = [(n, p) for n, p, _ in found if n.split(":")[0].lower() == ref.repo.lower()]
        if len(same_repo) == 1:
            return same_repo[0]
    return None


# -- pulling ----------------------------------------------------------------------------------------
def _api():
    from huggingface_hub import HfApi

    return HfApi()  # HF_ENDPOINT and the token come from the environment, as for the hub's own tools


def list_files(repo: str, revision: str | None) -> tuple[str, list[HubFile]]:
    """The commit a revision stands for, and its files with sizes and checksums."""
    info = _api().model_info(repo, revision=revision, files_metadata=True)
    files = [
        HubFile(s.rfilename, s.lfs.size if s.lfs else (s.size or 0), s.lfs.sha256 if s.lfs else None,
                None if s.lfs else s.blob_id)
        for s in info.siblings or []
    ]
    return info.sha or revision or "main", files


def _hasher(f: HubFile):
    """The hash the hub publishes for f (LFS SHA-256, or the git blob id), fresh; None when it
    publishes none (the size check is all there is then)."""
    if f.sha256:
        return hashlib.sha256()
    if f.git_sha1:
        return hashlib.sha1(b"blob %d\0" % f.size)
    return None


def _digest_ok(path: Path, f: HubFile) -> bool:
    h = _hasher(f)
    if h is None:
        return True
    with open(path, "rb") as src:
        while block := src.read(1 << 22):
            h.update(block)
    return h.hexdigest() == (f.sha256 or f.git_sha1)


def _forget_download(path: Path) -> None:
    """Remove a downloaded file from the hub's cache: the snapshot link and the blob it names."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            p.unlink()
        except OSError:
            pass


def pull(text: str, *, log=print, progress=None) -> tuple[str, Path]:
    """Download (or find, offline) the model `text` names; returns (name, first GGUF part).
    `progress(file, completed, total)` is called as each file's bytes arrive (a HubFile, bytes)."""
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = parse(text)
    try:
        commit, files = list_files(ref.repo, ref.revision)
    except OfflineModeIsEnabled:
        return _offline(ref, "offline mode (HF_HUB_OFFLINE)", log)
    except GatedRepoError:
        raise PullError(f"{ref.repo} is gated: accept its terms on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise PullError(f"no repository {ref.repo} on the hub (or it is private: hf auth login)") from None
    except RevisionNotFoundError:
        raise PullError(f"{ref.repo} has no revision {ref.revision!r}") from None
    except HfHubHTTPError as exc:
        raise PullError(f"the hub refused {ref.repo}: {exc}".splitlines()[0]) from None
    except Exception as exc:  # the network: connection refused, DNS, timeouts
        if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower() or isinstance(exc, OSError):
            return _offline(ref, f"the hub is unreachable ({type(exc).__name__})", log)
        raise
    quant, parts = choose(ref, group_by_quant(files))
    name = f"{ref.repo}:{quant}"
    rec = records().get(name)
    if rec and rec.get("revision") == commit and _intact(rec):
        log(f"{name} is already pulled (revision {commit[:12]})")
        return name, Path(rec["files"][0]["path"])
    total = sum(f.size for f in parts)
    log(f"pulling {name} at {commit[:12]}: {len(parts)} file{'s' * (len(parts) > 1)}, {total / 1e6:.0f} MB")
    done, fresh_downloads = [], set()
    for f in parts:
        try:
            local = _download(ref.repo, commit, f, log, fresh_downloads, progress)
        except HfHubHTTPError as exc:
            raise PullError(f"downloading {f.path} failed: {exc}".splitlines()[0]
                            + " (run the same pull again to resume)") from None
        except (OSError, httpx.HTTPError) as exc:
            raise PullError(f"downloading {f.path} failed: {exc} (run the same pull again to resume)") from None
        size = local.stat().st_size
        from_cache = local not in fresh_downloads  # found in the hub's cache, not checked while downloading
        if from_cache and (size != f.size or not _digest_ok(local, f)):
            _forget_download(local)
            raise PullError(f"{f.path}: the copy in the hub's cache does not match the hub's checksum; it was "
                            "removed, pull again")
        done.append({"path": str(local), "hub_path": f.path, "size": size, "sha256": f.sha256,
                     "mtime_ns": local.stat().st_mtime_ns})
    with _locked():
        data = records()
        before = data.get(name)
        data[name] = {"repo": ref.repo, "quant": quant, "revision": commit, "files": done,
                      "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write(data)
    if before:  # a newer revision replaces the old one: its files would only fill the disk
        fresh_paths = {d["path"] for d in done}
        fresh_blobs = {Path(d["path"]).resolve() for d in done}
        for f in before.get("files", []):
            old = Path(f["path"])
            if f["path"] in fresh_paths:
                continue
            if old.resolve() in fresh_blobs:  # the same bytes under the new revision: only the old link goes
                old.unlink(missing_ok=True)
            else:
                _forget_download(old)
    log(f"pulled {name}: use it as --model {name}")
    return name, Path(done[0]["path"])


class ChecksumMismatch(PullError):
    pass


def _download(repo: str, commit: str, f: HubFile, log, fresh_downloads: set, progress=None) -> Path:
    """The file in the hub's cache (snapshots/<commit>/<path>, a link to blobs/<etag>), downloaded
    or resumed when it is not there yet. Raises ChecksumMismatch (the partial file removed) when the
    bytes are not the ones the hub lists."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    cached = try_to_load_from_cache(repo, f.path, revision=commit)
    if isinstance(cached, str):
        return Path(cached)
    url = hf_hub_url(repo, f.path, revision=commit)
    headers = build_hf_headers()
    meta = get_hf_file_metadata(url, headers=headers)
    etag = (meta.etag or f.sha256 or f.git_sha1 or "").strip('"')
    if not etag or "/" in etag:
        raise PullError(f"the hub gave no usable ETag for {f.path}")
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    blob = storage / "blobs" / etag
    pointer = storage / "snapshots" / commit / f.path
    if not blob.is_file():
        blob.parent.mkdir(parents=True, exist_ok=True)
        part = blob.with_name(blob.name + ".incomplete")
        with open(part, "ab") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # a second pull of the same file waits, then finds the blob
            if not blob.is_file():
                _transfer(meta.location or url, headers, part, out, f, progress)
                os.replace(part, blob)
                fresh_downloads.add(pointer)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        tmp = pointer.with_name(f".{pointer.name}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(blob, pointer.parent))
        os.replace(tmp, pointer)
    return pointer


def _transfer(url: str, headers: dict, part: Path, out, f: HubFile, progress=None) -> None:
    """Append the rest of the file to `part` (from its current size), hashing everything it holds."""
    import httpx
    from huggingface_hub.utils import tqdm

    h = _hasher(f)
    have = part.stat().st_size
    if have > f.size:  # not a prefix of this file: start again
        out.truncate(0)
        have = 0
    if h is not None and have:
        with open(part, "rb") as src:
            while block := src.read(1 << 22):
                h.update(block)
    if have < f.size:
        request = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
        with httpx.stream("GET", url, headers=request, follow_redirects=True, timeout=60) as r:
            if r.status_code == 200 and have:  # the server ignored the Range: take it from the start
                out.truncate(0)
                have = 0
                h = _hasher(f)
            elif r.status_code not in (200, 206):
                raise PullError(f"the hub answered {r.status_code} for {f.path}")
            with tqdm(total=f.size, initial=have, unit="B", unit_scale=True, desc=f.path.rsplit("/", 1)[-1]) as bar:
                if progress is not None:
                    progress(f, have, f.size)
                for block in r.iter_bytes(1 << 20):
                    out.write(block)
                    if h is not None:
                        h.update(block)
                    bar.update(len(block))
                    have += len(block)
                    if progress is not None:
                        progress(f, have, f.size)
        out.flush()
        os.fsync(out.fileno())
    size = part.stat().st_size
    if size != f.size or (h is not None and h.hexdigest() != (f.sha256 or f.git_sha1)):
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{f.path}: the download does not match the hub's checksum ({size} bytes, "
                               f"expected {f.size}); it was removed, pull again")


def _intact(rec: dict) -> bool:
    """Every file is where it was, as it was when verified (size and modification time)."""
    for f in rec.get("files", []):
        try:
            st = Path(f["path"]).stat()
        except OSError:
            return False
        if st.st_size != f["size"] or st.st_mtime_ns != f.get("mtime_ns"):
            return False
    return bool(rec.get("files"))


def _offline(ref: Ref, why: str, log) -> tuple[str, Path]:
    found = lookup(ref.name)
    if found is None:
        raise PullError(f"cannot pull {ref.name}: {why}, and it was not pulled before")
    log(f"{why}: using {found[0]} as pulled before")
    return found


def remove(query: str) -> str | None:
    """Forget a pulled model and delete its files from the hub's cache (blobs another pulled model
    still uses are kept). Returns the name removed, or None when no pulled model has that name."""
    found = lookup(query)
    if found is None:
        return None
    name = found[0]
    with _locked():
        data = records()
        rec = data.pop(name, None)
        if rec is None:
            return None
        keep = {Path(f["path"]).resolve() for r in data.values() for f in r.get("files", [])}
        _write(data)  # the name goes first: a crash below leaves unused files, never a name without them
    for f in rec.get("files", []):
        path = Path(f["path"])
        if path.resolve() not in keep:
            _forget_download(path)
    return name
