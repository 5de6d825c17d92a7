"""Getting the public datasets: resumable checked downloads, safe unpacking, and the preparation of a
dataset folder. What to fetch, and from where, is the dataset's spec in :mod:`lesion_kd.data.catalogue`.

``prepare_dataset("kvasir-seg", to="data")`` fetches the official archive(s) into the cache
(``$LESION_KD_CACHE/downloads``, resumable with HTTP ``Range``), verifies them, unpacks them into a work
folder beside the target (refusing members that would land outside it, and stopping zip bombs), converts
them to the suite's folder layout (:mod:`lesion_kd.data.convert`) and moves the finished folder into place
with its manifest. A second call finds the manifest and does nothing, without any network request.

Checksums: where the publisher gives a SHA-256 it is recorded in the dataset's spec (``ArchiveSpec``) and
checked. None of the five publishers does, so every archive is checked by *trust on first use*: the size
and SHA-256 of the first complete download are recorded in ``$LESION_KD_CACHE/downloads/checksums.json`` and every later
download of the same archive must match them (a changed or tampered archive is refused, not converted).

Datasets behind a login or licence form (BUSI, CVC-ClinicDB, PH2) are *manual*: the command says exactly
what to fetch by hand, then ``--from-archive FILE`` prepares it from the local file (or unpacked folder).
Tests and mirrors point the URLs elsewhere: ``url=`` / ``--url``, or ``$LESION_KD_DOWNLOAD_BASE`` (a base
URL under which every archive is found by its official file name).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import http.client
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .catalogue import DatasetSpec, get_dataset
from .io import DataError, atomic_write_bytes
from .prep import cache_root

log = logging.getLogger(__name__)

BASE_ENV = "LESION_KD_DOWNLOAD_BASE"
MANIFEST_NAME = "lesion_kd_manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20
RETRY_BACKOFF_S = 2.0  # first retry waits this long, then doubles (tests set it to 0)
# Unpacking limits. The largest archive here (ISIC 2018 training input) unpacks to about 10.5 GB of
# JPEGs that barely compress (ratio ~1); PH2's BMP masks reach ~100:1 but are under 1 MiB each.
MAX_UNPACKED_BYTES = 32 << 30
MAX_RATIO = 100.0
RATIO_MIN_MEMBER_BYTES = 1 << 20  # a per-member ratio is only judged for members at least this large


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, interrupted transfer); the message names the URL and file."""


class ChecksumError(DownloadError):
    """A downloaded archive does not match its published or recorded size/SHA-256 (the file was removed)."""


class UnsafeArchiveError(DataError):
    """An archive member would land outside the target, or the archive unpacks to an absurd size."""


class ManualDownloadRequired(DataError):
    """The dataset needs a manual download (licence form, login); the message says what to fetch."""


# ----------------------------------------------------------------------------------- checksum registry
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ChecksumRegistry:
    """Trust-on-first-use record of archive sizes and SHA-256s: ``<cache>/downloads/checksums.json``."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.path = cache_root(cache_dir) / "downloads" / "checksums.json"

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}: unreadable checksum registry ({e}); fix or delete it") from e
        if not isinstance(doc, dict):
            raise DataError(f"{self.path}: checksum registry is not a JSON object; fix or delete it")
        return doc

    def get(self, key: str) -> dict | None:
        return self._load().get(key)

    def record(self, key: str, size: int, sha256: str, url: str) -> None:
        doc = self._load()
        doc[key] = {"size": size, "sha256": sha256, "url": url, "recorded": _now()}
        atomic_write_bytes(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path: Path, progress: bool = False) -> str:
    """SHA-256 of a file, streamed (a progress bar for large files)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {path.name}",
                                     disable=not progress or size < (64 << 20)) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- download
class _Interrupted(Exception):
    pass


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _transfer(url: str, part: Path, expected_size: int | None, timeout: float, progress: bool) -> None:
    """One HTTP request appending to ``part`` from its current size; raises :class:`_Interrupted` if cut."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "lesion-kd (dataset download)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset and (expected_size is None or offset == expected_size):
            return  # the range starts at the end: the partial file is already complete
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    with resp:
        if offset and resp.status == 206 and _content_range_start(resp.headers.get("Content-Range")) == offset:
            mode = "ab"
        else:  # a server that ignores Range sends the whole file again: start over
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: the server offers {total} bytes but the archive should have {expected_size} "
                                "bytes; refusing it (a changed or wrong file)")
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=f"downloading {part.name[:-5]}", disable=not progress) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (http.client.IncompleteRead, OSError) as e:
                    raise _Interrupted(str(e)) from e
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"connection closed after {got} of {total} bytes")


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    size: int | None = None,
    tofu_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, and return ``dest``.

    Verification: ``sha256``/``size`` when given (published values); else, with ``tofu_key``, the size and
    SHA-256 recorded at the first download of that key (recorded now if there is none). A mismatch
    removes the file and raises :class:`ChecksumError`. An interrupted transfer is retried ``retries``
    times from where it stopped (HTTP Range); past that, :class:`DownloadError` keeps the partial file so
    that the next call resumes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    registry = ChecksumRegistry(cache_dir) if tofu_key and not sha256 else None
    recorded = registry.get(tofu_key) if registry else None
    want_size = size if size is not None else (recorded or {}).get("size")
    want_sha = sha256 or (recorded or {}).get("sha256")
    if dest.is_file():  # complete from an earlier call (kept archive): verify rather than trust it
        try:
            _verify(dest, url, want_sha, want_size, recorded, registry, progress)
            return dest
        except ChecksumError as e:
            log.warning("%s; downloading it again", e)
    part = dest.with_name(dest.name + ".part")
    if want_size is not None and part.exists() and part.stat().st_size > want_size:
        part.unlink()  # longer than the archive can be: not a prefix of it
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, want_size, timeout, progress)
            break
        except _Interrupted as e:
            got = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DownloadError(
                    f"{url}: transfer interrupted ({e}); {got} bytes kept in {part}: run the same command again "
                    "to resume"
                ) from e
            wait = RETRY_BACKOFF_S * 2**attempt
            log.warning("%s: transfer interrupted (%s); resuming from byte %d in %.0f s", url, e, got, wait)
            time.sleep(wait)
        except urllib.error.URLError as e:  # connection refused, DNS, timeout before any byte
            raise DownloadError(f"{url}: cannot connect ({e.reason}); {part} is kept for a resume") from e
        except (TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise DownloadError(f"{url}: {e}; {part} is kept: run the same command again to resume") from e
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    _verify(part, url, want_sha, want_size, recorded, registry, progress)
    os.replace(part, dest)
    if registry is not None and recorded is None:
        registry.record(tofu_key, dest.stat().st_size, sha256_file(dest), url)  # type: ignore[arg-type]
        log.info("recorded size and SHA-256 of %s in %s (trust on first use)", dest.name, registry.path)
    return dest


def _verify(path: Path, url: str, sha: str | None, size: int | None, recorded: dict | None,
            registry: ChecksumRegistry | None, progress: bool) -> None:
    """Check size then SHA-256; on mismatch remove ``path`` and raise :class:`ChecksumError`."""
    got_size = path.stat().st_size
    problem = None
    if size is not None and got_size != size:
        problem = f"size {got_size} bytes, expected {size}"
    elif sha is not None:
        got_sha = sha256_file(path, progress)
        if got_sha.lower() != sha.lower():
            problem = f"SHA-256 {got_sha}, expected {sha}"
    if problem is None:
        return
    path.unlink(missing_ok=True)
    origin = ("the published checksum" if recorded is None else
              f"the size/SHA-256 recorded at the first download ({recorded.get('recorded')}, in {registry.path})")  # type: ignore[union-attr]
    hint = ("" if recorded is None else
            " If the publisher really replaced the archive, delete its entry from that file and download again.")
    raise ChecksumError(f"{url}: checksum mismatch for {path.name}: {problem} ({origin}); the file was removed.{hint}")


# ------------------------------------------------------------------------------------- safe unpacking
def _member_target(root: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` goes under ``root``; :class:`UnsafeArchiveError` if it would leave ``root``."""
    norm = name.replace("\\", "/")  # a Windows-made zip may use backslashes; judge them as separators
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} leaves the target folder ('..'); refusing the archive")
    if not parts:
        raise UnsafeArchiveError(f"{archive}: member with an empty name {name!r}; refusing the archive")
    return root.joinpath(*parts)


def _link_stays_inside(name: str, link: str, hard: bool) -> bool:
    """Whether a link member's target resolves inside the archive root (tar hard links are root-relative)."""
    link = link.replace("\\", "/")
    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
        return False
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, link))
    return not (resolved == ".." or resolved.startswith("../"))


@dataclass
class _Member:
    name: str
    size: int
    compressed: int | None  # None where the format does not say (tar)
    kind: str  # "file" | "dir" | "link"
    link: str = ""
    hard: bool = False


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            out.append(_Member(info.filename, info.file_size, info.compress_size, "link",
                               zf.read(info).decode("utf-8", "replace")))
        elif info.is_dir():
            out.append(_Member(info.filename, 0, 0, "dir"))
        else:
            out.append(_Member(info.filename, info.file_size, info.compress_size, "file"))
    return out


def _tar_member(ti: tarfile.TarInfo) -> _Member:
    if ti.issym() or ti.islnk():
        return _Member(ti.name, 0, None, "link", ti.linkname, hard=ti.islnk())
    if ti.isdir():
        return _Member(ti.name, 0, None, "dir")
    if ti.isfile():
        return _Member(ti.name, ti.size, None, "file")
    return _Member(ti.name, 0, None, "special")


def _check_members(members: Sequence[_Member], archive: Path, root: Path, max_bytes: int, max_ratio: float) -> None:
    """Refuse the archive before anything is written if any member is unsafe or the total is absurd."""
    archive_size = max(archive.stat().st_size, 1)
    total = 0
    for m in members:
        _member_target(root, m.name, archive)
        if m.kind == "link" and not _link_stays_inside(m.name, m.link, m.hard):
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a link to {m.link!r}, outside the target folder; refusing the archive")
        if m.kind == "special":
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device, FIFO or other special file; refusing")
        total += m.size
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{archive}: unpacks to more than {max_bytes} bytes (limit; a zip bomb or not this dataset); stopped")
        if m.compressed is not None and m.size >= RATIO_MIN_MEMBER_BYTES and m.size > max_ratio * max(m.compressed, 1):
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} expands {m.size / max(m.compressed, 1):.0f}-fold ({m.size} bytes; "
                f"limit {max_ratio:.0f}x): a zip bomb; stopped")
    if total >= RATIO_MIN_MEMBER_BYTES and total > max_ratio * archive_size:
        raise UnsafeArchiveError(
            f"{archive}: unpacks to {total} bytes, {total / archive_size:.0f} times its size (limit {max_ratio:.0f}x): "
            "a zip bomb; stopped")


def _copy_limited(src, dst_path: Path, limit: int, name: str, archive: Path) -> int:
    """Copy a member stream; stop if it yields more than ``limit`` bytes (a header that lies)."""
    n = 0
    with open(dst_path, "wb") as out:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > limit:
                raise UnsafeArchiveError(f"{archive}: member {name!r} yields more data than its header declares; stopped")
            out.write(chunk)
    return n


def archive_kind(path: Path) -> str:
    """``zip``, ``tar`` (plain or compressed) or ``dir``; :class:`DataError` for anything else (e.g. RAR)."""
    if path.is_dir():
        return "dir"
    if not path.is_file():
        raise DataError(f"{path}: archive not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"Rar!"):
        raise DataError(f"{path}: a RAR archive, which is not read here; unpack it ('unrar x' or '7z x') and pass "
                        "the unpacked folder instead")
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise DataError(f"{path}: not a .zip or .tar(.gz/.bz2/.xz) archive")


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike, max_bytes: int = MAX_UNPACKED_BYTES,
                 max_ratio: float = MAX_RATIO, progress: bool = True) -> Path:
    """Unpack an untrusted .zip/.tar(.gz) into ``target``, which must be empty or absent.

    Every member is checked first (absolute paths, ``..``, links pointing outside, special files, total
    unpacked size above ``max_bytes``, expansion ratio above ``max_ratio``): one bad member refuses the
    whole archive and nothing is written. Links that stay inside are skipped (the datasets need none).
    While unpacking, the bytes written are counted again, so a member that lies about its size stops it.
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind == "dir":
        raise DataError(f"{archive}: a folder, not an archive")
    if target.exists() and any(target.iterdir()):
        raise DataError(f"{target}: unpack target is not empty")
    target.mkdir(parents=True, exist_ok=True)
    try:
        return _safe_extract(archive, target, kind, max_bytes, max_ratio, progress)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # a half-unpacked archive is of no use to anyone
        raise


def _safe_extract(archive: Path, target: Path, kind: str, max_bytes: int, max_ratio: float, progress: bool) -> Path:
    root = target.resolve()
    if kind == "zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(zf)
                _check_members(members, archive, root, max_bytes, max_ratio)
                _unpack(members, root, archive, lambda m: zf.open(m.name), max_bytes, progress)
        except zipfile.BadZipFile as e:
            raise DataError(f"{archive}: corrupt zip archive ({e})") from e
        return target
    try:
        with tarfile.open(archive, "r:*") as tf:
            infos: dict[str, tarfile.TarInfo] = {}
            members: list[_Member] = []
            total, archive_size = 0, max(archive.stat().st_size, 1)
            for ti in tf:  # headers come before data: an absurd size is caught before it is decompressed
                m = _tar_member(ti)
                _check_members([m], archive, root, max_bytes, max_ratio)
                total += m.size
                if total > max_bytes or (total >= RATIO_MIN_MEMBER_BYTES and total > max_ratio * archive_size):
                    raise UnsafeArchiveError(
                        f"{archive}: unpacks to more than {min(total, max_bytes)} bytes ({total / archive_size:.0f} "
                        f"times its size; limits {max_bytes} bytes, {max_ratio:.0f}x): a tar bomb; stopped")
                members.append(m)
                infos[m.name] = ti
            _check_members(members, archive, root, max_bytes, max_ratio)
            _unpack(members, root, archive, lambda m: tf.extractfile(infos[m.name]), max_bytes, progress)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        raise DataError(f"{archive}: corrupt tar archive ({e})") from e
    return target


def _unpack(members: Sequence[_Member], root: Path, archive: Path, opener, max_bytes: int, progress: bool) -> None:
    written = 0
    files = [m for m in members if m.kind == "file"]
    with tqdm(total=sum(m.size for m in files), unit="B", unit_scale=True, desc=f"unpacking {archive.name}",
              disable=not progress) as bar:
        for m in members:
            dst = _member_target(root, m.name, archive)
            if m.kind == "dir":
                dst.mkdir(parents=True, exist_ok=True)
            elif m.kind == "file":
                dst.parent.mkdir(parents=True, exist_ok=True)
                # never write through something already there (e.g. a link made by another tool)
                if dst.is_symlink() or (dst.exists() and not dst.is_file()):
                    raise UnsafeArchiveError(f"{archive}: member {m.name!r} would overwrite a link or folder; stopped")
                src = opener(m)
                if src is None:
                    continue
                with src:
                    n = _copy_limited(src, dst, min(m.size, max_bytes - written), m.name, archive)
                written += n
                bar.update(n)
            elif m.kind == "link":
                log.info("%s: skipping link member %s -> %s (not needed)", archive.name, m.name, m.link)


# --------------------------------------------------------------------------------------- preparation
@dataclass
class PrepareResult:
    """Outcome of :func:`prepare_dataset`: the dataset folder, and whether this call changed anything."""

    path: Path
    changed: bool
    counts: dict = field(default_factory=dict)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a folder prepared by this module, or None."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete the folder {folder} and prepare it again") from e


def archive_urls(source: DatasetSpec, urls: Sequence[str] | None = None) -> list[str | None]:
    """The URL of each archive: ``urls`` (one per archive), else ``$LESION_KD_DOWNLOAD_BASE/<file name>``,
    else the registry's URL (None for a manual download)."""
    if urls:
        if len(urls) != len(source.archives):
            names = ", ".join(a.filename for a in source.archives)
            raise DataError(f"{source.name}: {len(urls)} --url given, but it has {len(source.archives)} archive(s) "
                            f"({names}); give one --url per archive, in that order")
        return list(urls)
    base = os.environ.get(BASE_ENV)
    if base:
        return [f"{base.rstrip('/')}/{a.filename}" for a in source.archives]
    return [a.url for a in source.archives]


def _match_local_archives(source: DatasetSpec, paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Order user-given archives like the registry's; with several archives they are matched by file name."""
    paths = [Path(p).expanduser() for p in paths]
    for p in paths:
        if not p.exists():
            raise DataError(f"--from-archive {p}: no such file or folder")
    if len(source.archives) == 1:
        if len(paths) != 1:
            raise DataError(f"{source.name}: expects one archive (or unpacked folder), got {len(paths)}")
        return paths
    by_name = {p.name: p for p in paths}
    missing = [a.filename for a in source.archives if a.filename not in by_name and a.filename.rsplit(".", 1)[0] not in by_name]
    if missing or len(paths) != len(source.archives):
        raise DataError(f"{source.name}: --from-archive needs the files {', '.join(a.filename for a in source.archives)} "
                        f"(or their unpacked folders, named without .zip); missing: {', '.join(missing) or '-'}")
    return [by_name.get(a.filename) or by_name[a.filename.rsplit(".", 1)[0]] for a in source.archives]


def _source_txt(source: DatasetSpec, archives: list[dict], counts: dict) -> str:
    lines = [
        f"Dataset: {source.folder}",
        f"Prepared by: lesion-kd data download {source.name}",
        f"Homepage: {source.homepage}",
        "Archives:",
        *[f"  {a['file']}  size={a['size']}  sha256={a['sha256']}  from={a['origin']}" for a in archives],
        f"Counts: {', '.join(f'{k}={v}' for k, v in counts.items())}",
        f"Notes: {source.notes}",
        "",
        f"License: {source.licence}",
        f"Cite: {source.citation}",
        "",
        "Layout: images/<id><ext> and masks/<id>.png (single-channel 'L' PNG, values {0,255}).",
        "",
    ]
    return "\n".join(lines)


def prepare_dataset(
    name: str,
    to: str | os.PathLike,
    from_archives: Sequence[str | os.PathLike] | None = None,
    urls: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    keep_archives: bool = False,
    retries: int = 3,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_ratio: float = MAX_RATIO,
    progress: bool = True,
) -> PrepareResult:
    """Download (or take from ``from_archives``), verify, unpack and convert dataset ``name`` into
    ``to/<folder>`` in the suite's layout. Does nothing (no network) when the folder's manifest says it is
    complete, unless ``force``. A folder there without a manifest is never touched: it is an error.
    """
    source = get_dataset(name)
    to = Path(to).expanduser()
    dest = to / source.folder
    manifest = read_manifest(dest) if dest.is_dir() else None
    if manifest is not None and not force:
        if manifest.get("dataset") != name or manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{dest / MANIFEST_NAME}: prepared for {manifest.get('dataset')!r} (format "
                            f"{manifest.get('format')}), not {name!r}; use --force to rebuild it")
        n_images = sum(1 for p in (dest / "images").iterdir() if not p.name.startswith(".")) \
            if (dest / "images").is_dir() else 0
        if n_images != manifest.get("counts", {}).get("images"):
            raise DataError(f"{dest}: {n_images} files in images/ but the manifest lists "
                            f"{manifest.get('counts', {}).get('images')}: files were changed; use --force to rebuild")
        return PrepareResult(dest, False, manifest.get("counts", {}))
    if dest.exists() and manifest is None:
        raise DataError(f"{dest}: exists but was not prepared by 'lesion-kd data download' (no {MANIFEST_NAME}); "
                        "it is left alone: move it away or choose another --to")

    # 1. the archives: local files, or downloads into the cache
    fetched: list[Path] = []
    records: list[dict] = []
    if from_archives:
        local = _match_local_archives(source, from_archives)
        for spec, path in zip(source.archives, local, strict=True):
            sha = size = None
            if path.is_file():
                size = path.stat().st_size
                sha = sha256_file(path, progress)
                if spec.sha256 and sha != spec.sha256.lower():
                    raise ChecksumError(f"{path}: SHA-256 {sha} differs from the published {spec.sha256}; "
                                        "is this the official archive?")
            records.append({"file": path.name, "size": size, "sha256": sha, "origin": str(path)})
        archives = local
    else:
        resolved = archive_urls(source, urls)
        if any(u is None for u in resolved):
            raise ManualDownloadRequired(
                f"{name}: no direct public download; get it by hand:\n{source.manual}\n"
                f"(or point ${BASE_ENV} / --url at a mirror holding {', '.join(a.filename for a in source.archives)})")
        archives = []
        for spec, url in zip(source.archives, resolved, strict=True):
            path = download_file(url, cache_root(cache_dir) / "downloads" / name / spec.filename, spec.sha256,  # type: ignore[arg-type]
                                 spec.size, tofu_key=f"{name}/{spec.filename}", cache_dir=cache_dir,
                                 retries=retries, progress=progress)
            archives.append(path)
            fetched.append(path)
            records.append({"file": spec.filename, "size": path.stat().st_size,
                            "sha256": spec.sha256 or (ChecksumRegistry(cache_dir).get(f"{name}/{spec.filename}") or {}).get("sha256"),
                            "origin": url})

    # 2. unpack into a work folder beside the target (same file system: the final move is a rename)
    work = to / f".{source.folder}.lesion_kd-work"
    if work.exists():
        shutil.rmtree(work)  # left by an interrupted run of ours
    work.mkdir(parents=True)
    try:
        roots = []
        for i, path in enumerate(archives):
            if archive_kind(path) == "dir":
                roots.append(path)
            else:
                roots.append(safe_extract(path, work / "unpacked" / str(i), max_bytes, max_ratio, progress))
        out = work / "out"
        counts = source.convert(roots, out, progress)
        atomic_write_bytes(out / "SOURCE.txt", _source_txt(source, records, counts).encode())
        doc = {"dataset": name, "format": MANIFEST_FORMAT, "folder": source.folder, "prepared": _now(),
               "archives": records, "counts": counts}
        # the manifest is the last file written; the folder then appears complete in one rename
        atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(doc, indent=1) + "\n").encode())
        if dest.exists():  # --force over our own earlier folder
            os.replace(dest, work / "previous")
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep_archives:
        for path in fetched:
            path.unlink(missing_ok=True)  # the checksum record stays, so a re-download is still verified
    return PrepareResult(dest, True, counts)
