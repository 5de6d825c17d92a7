"""Downloading and preparing the public datasets, against a loopback HTTP server serving small archives
built here in each dataset's official layout (with its quirks); checksums, resume, idempotence, and
archives that try to escape their folder or explode."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import disk_image
from PIL import Image

from lesion_kd.data import download as dl
from lesion_kd.data import read_image, read_mask, scan_folder
from lesion_kd.data.convert import PRANET_KVASIR_TEST
from lesion_kd.data.registry import DATASETS


# ------------------------------------------------------------------------------------- local server
class ArchiveServer:
    """Serves ``files`` on 127.0.0.1 with HTTP Range support; ``cut[path] = n`` closes the connection after
    n bytes on the first request for ``path``. Every request is logged as (path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                rng = self.headers.get("Range")
                server.log.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                body = data[start:]
                n = server.cut.pop(self.path, None)
                if n is not None:  # an interrupted transfer: promise everything, send n bytes, hang up
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def server():
    s = ArchiveServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A fresh cache (and so a fresh trust-on-first-use record) per test; loopback never via a proxy."""
    monkeypatch.setenv("LESION_KD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(dl.BASE_ENV, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)


# ---------------------------------------------------------------------------- archives in official layouts
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _bmp(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="BMP")
    return buf.getvalue()


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # planar (separate-plane) RGB with deflate, as some CVC-ClinicDB copies: tifffile reads it channel-first
    tifffile.imwrite(buf, arr, planarconfig="separate" if arr.ndim == 3 else None, compression="zlib")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


KVASIR_IDS = [PRANET_KVASIR_TEST[0], PRANET_KVASIR_TEST[1], "cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4"]


def kvasir_zip() -> bytes:
    m = {}
    for k, sid in enumerate(KVASIR_IDS):
        img, mask = disk_image(40, 48, seed=k)
        m[f"Kvasir-SEG/images/{sid}.jpg"] = _jpeg(img, 90)
        m[f"Kvasir-SEG/masks/{sid}.jpg"] = _jpeg(np.repeat(mask[..., None] * 255, 3, axis=2), 60)  # noisy RGB JPEG
    m["Kvasir-SEG/kavsir_bboxes.json"] = json.dumps({KVASIR_IDS[0]: {"height": 40, "width": 48}}).encode()
    return make_zip(m)


def busi_zip() -> tuple[bytes, dict[str, np.ndarray]]:
    m, truth = {}, {}
    root = "Dataset_BUSI_with_GT"
    img, mask = disk_image(36, 44, seed=1)
    gray = np.repeat(img[..., :1], 3, axis=2)  # RGB file whose channels are identical (most of BUSI)
    m[f"{root}/benign/benign (1).png"] = _png(gray)
    m[f"{root}/benign/benign (1)_mask.png"] = _png(mask * 255)
    truth["benign_001"] = mask
    img2, a = disk_image(36, 44, seed=2, cx=0.3, r=0.15)
    _, b = disk_image(36, 44, seed=3, cx=0.75, r=0.1)
    m[f"{root}/benign/benign (12).png"] = _png(img2)
    m[f"{root}/benign/benign (12)_mask.png"] = _png(a * 255)
    m[f"{root}/benign/benign (12)_mask_1.png"] = _png(b * 255)  # a second lesion in its own file
    truth["benign_012"] = a | b
    img3, c = disk_image(30, 30, seed=4)
    m[f"{root}/malignant/malignant (3).png"] = _png(img3[..., 0])
    m[f"{root}/malignant/malignant (3)_mask.png"] = _png(c * 255)
    truth["malignant_003"] = c
    m[f"{root}/normal/normal (1).png"] = _png(disk_image(32, 40, seed=5)[0])
    m[f"{root}/normal/normal (1)_mask.png"] = _png(np.zeros((32, 40), np.uint8))
    truth["normal_001"] = np.zeros((32, 40), np.uint8)
    m[f"__MACOSX/{root}/benign/._benign (1).png"] = b"\x00\x05\x16\x07 resource fork"
    return make_zip(m), truth


def isic_zips() -> tuple[bytes, bytes]:
    inp, gt = {}, {}
    for k in range(3):
        img, mask = disk_image(30, 40, seed=10 + k)
        inp[f"ISIC2018_Task1-2_Training_Input/ISIC_{k:07d}.jpg"] = _jpeg(img)
        gt[f"ISIC2018_Task1_Training_GroundTruth/ISIC_{k:07d}_segmentation.png"] = _png(mask * 255)
    inp["ISIC2018_Task1-2_Training_Input/ATTRIBUTION.txt"] = b"ISIC_0000000: Anonymous, CC-0\n"
    inp["ISIC2018_Task1-2_Training_Input/LICENSE.txt"] = b"CC BY-NC\n"
    return make_zip(inp), make_zip(gt)


def cvc_zip() -> tuple[bytes, dict[str, np.ndarray]]:
    m, truth = {}, {}
    for n in (1, 2, 12):
        img, mask = disk_image(28, 36, seed=20 + n)
        m[f"CVC-ClinicDB/Original/{n}.tif"] = _tiff(img)
        m[f"CVC-ClinicDB/Ground Truth/{n}.tif"] = _tiff(mask * 255)
        truth[f"{n:03d}"] = (img, mask)
    return make_zip(m), truth


def ph2_targz() -> tuple[bytes, dict[str, np.ndarray]]:
    m, truth = {}, {}
    base = "PH2Dataset/PH2 Dataset images"
    for sid in ("IMD002", "IMD003"):
        img, mask = disk_image(30, 34, seed=int(sid[3:]))
        m[f"{base}/{sid}/{sid}_Dermoscopic_Image/{sid}.bmp"] = _bmp(img)
        m[f"{base}/{sid}/{sid}_lesion/{sid}_lesion.bmp"] = _bmp(mask * 255)
        m[f"{base}/{sid}/{sid}_roi/{sid}_R1_Label1.bmp"] = _bmp(mask * 255)  # colour-class ROIs: not the lesion mask
        truth[sid] = mask
    m["PH2Dataset/PH2_dataset.txt"] = b"|| Name || Clinical Diagnosis ||\n"
    return make_targz(m), truth


def assert_suite_layout(root: Path) -> list:
    """The folder reads as a dataset: every mask a {0,1} mask of its image's size."""
    samples = scan_folder(root)
    for s in samples:
        m = read_mask(s.mask)
        assert set(np.unique(m)) <= {0, 1}
        assert m.shape == read_image(s.image).shape[:2]
        with Image.open(s.mask) as im:
            assert im.mode == "L"
    return samples


# -------------------------------------------------------------------------------------------- datasets
def test_kvasir_download_converts_thresholds_jpeg_masks_and_writes_pranet_splits(server, tmp_path, monkeypatch):
    archive = kvasir_zip()
    server.files["/kvasir-seg.zip"] = archive
    monkeypatch.setenv(dl.BASE_ENV, server.base)
    res = dl.prepare_dataset("kvasir-seg", tmp_path / "data", progress=False)
    root = tmp_path / "data" / "Kvasir-SEG"
    assert res.changed and res.path == root and res.counts["images"] == 4
    samples = assert_suite_layout(root)
    assert [s.id for s in samples] == sorted(KVASIR_IDS)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:  # images byte-identical, masks cleaned of JPEG noise
        assert (root / "images" / f"{KVASIR_IDS[2]}.jpg").read_bytes() == zf.read(f"Kvasir-SEG/images/{KVASIR_IDS[2]}.jpg")
    raw = np.asarray(Image.open(io.BytesIO(zipfile.ZipFile(io.BytesIO(archive)).read(f"Kvasir-SEG/masks/{KVASIR_IDS[0]}.jpg"))))
    assert len(np.unique(raw)) > 2  # the source mask really is noisy
    _, truth = disk_image(40, 48, seed=0)
    assert (read_mask(root / "masks" / f"{KVASIR_IDS[0]}.png") != truth).mean() < 0.02
    assert (root / "splits" / "pranet_test.txt").read_text().split() == sorted(KVASIR_IDS[:2])
    assert (root / "splits" / "pranet_train.txt").read_text().split() == sorted(KVASIR_IDS[2:])
    assert (root / "kavsir_bboxes.json").is_file() and "Cite:" in (root / "SOURCE.txt").read_text()
    manifest = json.loads((root / dl.MANIFEST_NAME).read_text())
    assert manifest["archives"][0]["sha256"] == hashlib.sha256(archive).hexdigest()
    tofu = json.loads((tmp_path / "cache" / "downloads" / "checksums.json").read_text())
    assert tofu["kvasir-seg/kvasir-seg.zip"]["size"] == len(archive)
    assert not (tmp_path / "cache" / "downloads" / "kvasir-seg" / "kvasir-seg.zip").exists()  # not kept by default
    assert not list((tmp_path / "data").glob(".*work"))  # the work folder is gone

    # idempotent: no request, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    n_requests = len(server.log)
    again = dl.prepare_dataset("kvasir-seg", tmp_path / "data", progress=False)
    assert not again.changed and len(server.log) == n_requests
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_busi_masks_are_merged_normal_images_marked_and_the_registry_reads_it(server, tmp_path):
    archive, truth = busi_zip()
    server.files["/busi.zip"] = archive
    res = dl.prepare_dataset("busi", tmp_path, urls=[server.url("busi.zip")], progress=False)
    root = res.path
    assert [s.id for s in assert_suite_layout(root)] == sorted(truth)
    for sid, mask in truth.items():
        assert np.array_equal(read_mask(root / "masks" / f"{sid}.png"), mask), sid
    with Image.open(root / "images" / "benign_001.png") as im:
        assert im.mode == "L"  # identical channels stored as gray, losslessly
    rows = {r.split(",")[0]: r.split(",") for r in (root / "metadata.csv").read_text().splitlines()[1:]}
    assert (root / "metadata.csv").read_text().splitlines()[0] == "id,category,original_file,n_mask_files_merged,fg_pixels"
    assert rows["benign_012"][1:4] == ["benign", "benign (12).png", "2"]
    assert rows["benign_012"][4] == str(int(truth["benign_012"].sum()))
    assert rows["normal_001"][1] == "normal" and rows["normal_001"][4] == "0"
    assert res.counts["multi_mask_merged"] == 1 and res.counts["normal"] == 1
    spec = DATASETS["busi"]  # the suite's registry reads the prepared folder like the shared one
    assert {s.id for s in spec.samples(root, False)} == {"benign_001", "benign_012", "malignant_003"}
    assert len(spec.samples(root, True)) == 4


def test_isic_segmentation_masks_are_matched_across_its_two_archives(server, tmp_path, monkeypatch):
    inp, gt = isic_zips()
    server.files["/ISIC2018_Task1-2_Training_Input.zip"] = inp
    server.files["/ISIC2018_Task1_Training_GroundTruth.zip"] = gt
    monkeypatch.setenv(dl.BASE_ENV, server.base + "/")
    res = dl.prepare_dataset("isic2018", tmp_path, progress=False)
    samples = assert_suite_layout(res.path)
    assert [s.id for s in samples] == [f"ISIC_{k:07d}" for k in range(3)]
    assert np.array_equal(read_mask(res.path / "masks" / "ISIC_0000001.png"), disk_image(30, 40, seed=11)[1])
    assert (res.path / "ISIC2018_Task1-2_Training_Input_ATTRIBUTION.txt").is_file()


def test_cvc_clinicdb_tiffs_are_read_with_tifffile(server, tmp_path):
    archive, truth = cvc_zip()
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        (tmp_path / "probe.tif").write_bytes(zf.read("CVC-ClinicDB/Original/1.tif"))
    try:  # why the converter needs tifffile: Pillow fails on, or garbles, separate-plane RGB TIFFs
        with Image.open(tmp_path / "probe.tif") as im:
            pillow_ok = np.asarray(im.convert("RGB")).shape == truth["001"][0].shape
    except OSError:
        pillow_ok = False
    assert not pillow_ok
    server.files["/cvc.zip"] = archive
    res = dl.prepare_dataset("cvc-clinicdb", tmp_path / "data", urls=[server.url("cvc.zip")], progress=False)
    assert [s.id for s in assert_suite_layout(res.path)] == ["001", "002", "012"]
    for sid, (img, mask) in truth.items():
        assert np.array_equal(read_image(res.path / "images" / f"{sid}.png"), img)
        assert np.array_equal(read_mask(res.path / "masks" / f"{sid}.png"), mask)


def test_ph2_nested_bmp_folders_are_flattened_from_a_tar_gz(server, tmp_path):
    archive, truth = ph2_targz()
    server.files["/PH2Dataset.tar.gz"] = archive
    res = dl.prepare_dataset("ph2", tmp_path, urls=[server.url("PH2Dataset.tar.gz")], progress=False)
    assert [s.id for s in assert_suite_layout(res.path)] == ["IMD002", "IMD003"]
    assert sorted(p.name for p in (res.path / "images").iterdir()) == ["IMD002.bmp", "IMD003.bmp"]
    for sid, mask in truth.items():
        assert np.array_equal(read_mask(res.path / "masks" / f"{sid}.png"), mask)
    assert (res.path / "PH2_dataset.txt").is_file()


def test_manual_dataset_says_what_to_fetch_then_prepares_from_the_local_archive(tmp_path, capsys):
    from lesion_kd.cli import main

    assert main(["data", "download", "busi", "--to", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "Dataset_BUSI_with_GT" in err and "--from-archive" in err and "kaggle.com" in err
    assert not (tmp_path / "data" / "BUSI").exists()
    archive, truth = busi_zip()
    (tmp_path / "Dataset_BUSI_with_GT.zip").write_bytes(archive)
    args = ["data", "download", "busi", "--to", str(tmp_path / "data"), "--from-archive",
            str(tmp_path / "Dataset_BUSI_with_GT.zip"), "--no-progress"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().out
    assert len(scan_folder(tmp_path / "data" / "BUSI")) == len(truth)
    assert (tmp_path / "Dataset_BUSI_with_GT.zip").is_file()  # the user's file is never removed
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out
    # an unpacked folder works too; RAR (PH2's format) is named with what to do instead
    (tmp_path / "PH2Dataset.rar").write_bytes(b"Rar!\x1a\x07\x00 not really")
    assert main(["data", "download", "ph2", "--to", str(tmp_path / "d2"), "--from-archive",
                 str(tmp_path / "PH2Dataset.rar")]) == 1
    assert "unrar" in capsys.readouterr().err


def test_a_folder_not_made_by_us_is_never_overwritten(tmp_path, server):
    (tmp_path / "Kvasir-SEG" / "images").mkdir(parents=True)
    server.files["/kvasir-seg.zip"] = kvasir_zip()
    with pytest.raises(dl.DataError, match="not prepared by"):
        dl.prepare_dataset("kvasir-seg", tmp_path, urls=[server.url("kvasir-seg.zip")], progress=False)
    assert server.log == []  # refused before any download


# ------------------------------------------------------------------------------- checksums and resume
def test_changed_archive_fails_its_recorded_checksum_and_is_removed(server, tmp_path):
    server.files["/kvasir-seg.zip"] = kvasir_zip()
    url = [server.url("kvasir-seg.zip")]
    dl.prepare_dataset("kvasir-seg", tmp_path / "a", urls=url, progress=False)  # first use: recorded
    tampered = bytearray(server.files["/kvasir-seg.zip"])
    tampered[100] ^= 0xFF  # same size, different bytes
    server.files["/kvasir-seg.zip"] = bytes(tampered)
    with pytest.raises(dl.ChecksumError, match=r"checksum mismatch for kvasir-seg\.zip.*SHA-256.*recorded at the first"):
        dl.prepare_dataset("kvasir-seg", tmp_path / "b", urls=url, progress=False)
    assert list((tmp_path / "cache" / "downloads" / "kvasir-seg").iterdir()) == []  # no partial or bad file left
    assert not (tmp_path / "b" / "Kvasir-SEG").exists()
    server.files["/kvasir-seg.zip"] = bytes(tampered) + b"extra"  # a size change is caught from the headers
    with pytest.raises(dl.ChecksumError, match="offers"):
        dl.prepare_dataset("kvasir-seg", tmp_path / "b", urls=url, progress=False)


def test_published_checksum_mismatch_names_url_and_removes_the_file(server, tmp_path):
    server.files["/x.zip"] = b"some bytes"
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(dl.ChecksumError, match=r"x\.zip.*expected 0000.*published"):
        dl.download_file(server.url("x.zip"), dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not dest.with_name("x.zip.part").exists()
    good = hashlib.sha256(b"some bytes").hexdigest()
    assert dl.download_file(server.url("x.zip"), dest, sha256=good, progress=False).read_bytes() == b"some bytes"


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    data = os.urandom(300_000)
    server.files["/big.zip"] = data
    server.cut["/big.zip"] = 100_000
    dest = tmp_path / "dl" / "big.zip"
    with pytest.raises(dl.DownloadError, match="run the same command again to resume"):
        dl.download_file(server.url("big.zip"), dest, tofu_key="t/big.zip", retries=0, progress=False)
    part = dest.with_name("big.zip.part")
    assert part.stat().st_size == 100_000 and not dest.exists()
    dl.download_file(server.url("big.zip"), dest, tofu_key="t/big.zip", retries=0, progress=False)
    assert server.log[-1] == ("/big.zip", "bytes=100000-")
    assert dest.read_bytes() == data and not part.exists()
    assert dl.ChecksumRegistry().get("t/big.zip")["sha256"] == hashlib.sha256(data).hexdigest()
    # within one call, retries resume by themselves
    server.cut["/big.zip"] = 50_000
    dest2 = tmp_path / "dl2" / "big.zip"
    dl.download_file(server.url("big.zip"), dest2, tofu_key="t/big.zip", retries=2, progress=False)
    assert server.log[-2:] == [("/big.zip", None), ("/big.zip", "bytes=50000-")] and dest2.read_bytes() == data


# ------------------------------------------------------------------------------------ hostile archives
def _zip_with_symlink(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(info, target)
    return buf.getvalue()


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti


@pytest.mark.parametrize("kind,archive,why", [
    ("zip", make_zip({"ok.txt": b"fine", "../evil.txt": b"escaped"}), r"'\.\.'"),
    ("zip", make_zip({"ok.txt": b"fine", "/tmp/lesion_kd_evil.txt": b"escaped"}), "absolute path"),
    ("zip", make_zip({"ok.txt": b"fine", "a\\..\\..\\evil.txt": b"escaped"}), r"'\.\.'"),
    ("zip", _zip_with_symlink("link", "../../outside"), "link to"),
    ("tar.gz", _tar_with(tarfile.TarInfo("../evil.txt"), b"escaped"), r"'\.\.'"),
    ("tar.gz", _tar_with(tarfile.TarInfo("/tmp/lesion_kd_evil.txt"), b"escaped"), "absolute path"),
    ("tar.gz", _tar_with(_symlink("link", "/etc")), "link to"),
    ("tar.gz", _tar_with(_symlink("sub/link", "../../outside")), "link to"),
])
def test_malicious_archive_is_refused_and_nothing_is_written(tmp_path, kind, archive, why):
    box = tmp_path / "box"
    target = box / "target"
    box.mkdir()
    path = box / f"evil.{kind}"
    path.write_bytes(archive)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(dl.UnsafeArchiveError, match=why):
        dl.safe_extract(path, target, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # not even ok.txt
    assert not Path("/tmp/lesion_kd_evil.txt").exists()


def test_zip_bomb_is_stopped_before_it_is_unpacked(tmp_path, server):
    zeros = b"\0" * (24 << 20)  # 24 MiB that deflate to ~24 KiB
    (tmp_path / "bomb.zip").write_bytes(make_zip({"Kvasir-SEG/images/a.jpg": zeros}))
    with pytest.raises(dl.UnsafeArchiveError, match="zip bomb"):
        dl.safe_extract(tmp_path / "bomb.zip", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "bomb.tar.gz").write_bytes(make_targz({"a.bin": zeros}))
    with pytest.raises(dl.UnsafeArchiveError, match="bomb"):
        dl.safe_extract(tmp_path / "bomb.tar.gz", tmp_path / "out", progress=False)
    # the total limit holds whatever the ratio
    (tmp_path / "big.zip").write_bytes(make_zip({"a.bin": os.urandom(200_000), "b.bin": os.urandom(200_000)}))
    with pytest.raises(dl.UnsafeArchiveError, match="more than 300000 bytes"):
        dl.safe_extract(tmp_path / "big.zip", tmp_path / "out", max_bytes=300_000, progress=False)
    # and through the whole command: no dataset folder, no work folder left behind
    server.files["/kvasir-seg.zip"] = (tmp_path / "bomb.zip").read_bytes()
    with pytest.raises(dl.UnsafeArchiveError):
        dl.prepare_dataset("kvasir-seg", tmp_path / "data", urls=[server.url("kvasir-seg.zip")], progress=False)
    assert list((tmp_path / "data").iterdir()) == []
