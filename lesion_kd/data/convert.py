"""Converters from each dataset's official archive layout to the suite's folder layout (each dataset's spec
in :mod:`lesion_kd.data.catalogue` names its converter).

Every converter takes the unpacked archive folder(s) and writes ``out/images/<id><ext>`` and
``out/masks/<id>.png`` (single-channel PNG, 0 = background, 255 = lesion, the image's height and width),
plus the dataset's extras, exactly as the shared datasets are laid out:

- Kvasir-SEG: JPEG masks thresholded at >127 (they carry compression noise); ``kavsir_bboxes.json``;
  ``splits/pranet_test.txt`` (the 100 ids of the polyp literature's test set) and ``pranet_train.txt``.
- BUSI: ``<class> (<n>).png`` -> id ``<class>_<nnn>``; multi-lesion masks (``_mask``, ``_mask_1``, ...) merged
  by pixel-wise OR; ``metadata.csv`` (id, category, original_file, n_mask_files_merged, fg_pixels), where
  ``normal`` images are the ones with empty masks; gray images stored as single-channel PNG (lossless).
- ISIC 2018 task 1: ``ISIC_<n>.jpg`` matched with ``ISIC_<n>_segmentation.png``.
- CVC-ClinicDB: ``Original/<n>.tif`` and ``Ground Truth/<n>.tif`` read with tifffile (Pillow cannot read
  them), written as PNG; ids zero-padded (``001``).
- PH2: ``IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` and ``IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp``
  flattened to ``images/IMDxxx.bmp`` and ``masks/IMDxxx.png``.

Images are copied byte-identical where the suite can read them as they are. Any problem (an image
without a mask, two files claiming one id, a mask of another size) is a :class:`DataError` naming the files.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .io import DataError, _open_array, atomic_write_bytes, image_size, write_png

log = logging.getLogger(__name__)

# The 100 Kvasir-SEG ids of PraNet's TestDataset/Kvasir, the standard polyp test set (copied from the
# shared dataset's splits/pranet_test.txt, so that a fresh download gets the same split).
PRANET_KVASIR_TEST = tuple("""
    cju0u82z3cuma0835wlxrnrjv cju15wdt3zla10801odjiw7sy cju16ach3m1da0993r1dq3sn2
    cju16whaj0e7n0855q7b6cjkm cju17z0qongpa0993de4boim4 cju1amqw6p8pw0993d9gc5crl
    cju1bm8063nmh07996rsjjemq cju1c3218411b08014g9f6gig cju1cbokpuiw70988j4lq1fpi
    cju1cj3f0qi5n0993ut8f49rj cju1cqc7n4gpy0855jt246k68 cju1ddr6p4k5z08780uuuzit2
    cju1f8w0t65en0799m9oacq0q cju1h89h6xbnx08352k2790o9 cju1hp9i2xu8e0988u2dazk7m
    cju2hfqnmhisa0993gpleeldd cju2hjrqcvi2j0801bx1i6gxg cju2hos57llxm08359g92p6jj
    cju2hqt33lmra0988fr5ijv8j cju2lberzkdzm09938cl40pog cju2mh8t6p07008350e01tx2a
    cju2nnqrqzp580855z8mhzgd6 cju2np2k9zi3v079992ypxqkn cju2omjpeqj5a0988pjdlb8l1
    cju2osuru0ki00855txo0n3uu cju2pag1f0s4r0878h52uq83s cju2rga4psq9n09881z519xx0
    cju2rmd2rsw9g09888hh1efu0 cju2rqo702wpx0855fn7d5cxh cju2top2ruxxy0988p1svx36g
    cju2wve9v7esz0878mxsdcy04 cju2y40d8ulqo0993q0adtgtb cju2yi9tz8vky0801yqip0xyl
    cju2yo1j1v0qz09934o0e683p cju2yv4imv6cz099314jveiib cju2zp89k9q1g0855k1x0f1xa
    cju2zwg05a0oy0801yr73ig7g cju30ajhw09sx0988qyahx9s8 cju30gxjq0djk0988jytm49rs
    cju30j1rgadut0801vuyrsnt8 cju31w6goazci0799n014ly1q cju32srle1xfq083575i3fl75
    cju34m7h536wq0988xz7gx79v cju34xspwzenf0993cyzajv9n cju3tp94kfstl08181awh6z49
    cju3uhb79gcgr0871orbrbi3x cju3v11mrgwwb0755u242ygye cju3x5u2tiihx0818914gzxy1
    cju3xga12iixg0817dijbvjxw cju3ya7goj6at0818v2l5ay7f cju3ykamdj9u208503pygyuc8
    cju40m0rjkpw80871z6n6yg1u cju42qet0lsq90871e50xbnuv cju42wamblrqn098798r2yyok
    cju43jcqim2cp08172dvjvyui cju45rj7ln8980850a7821fov cju45ty6zn9oz0850qy4qnck1
    cju45v0pungu40871acnwtmu5 cju5cky5xb0ay0801oxet697t cju5clr68b48r0755cmuvponm
    cju5hi52odyf90817prvcwg45 cju5hyi9yegob0755ho3do8en cju5k3j3uf6de0817hszzfr7n
    cju5o4pk9h0720755lgp9jq8m cju5wrrs0m2af0818vmnajbtw cju5x00l6m5j608503k78ptee
    cju5xjn5mm78b09871spyqhhr cju5xkwzxmf0z0818gk4xabdm cju5xq3tdm9fn0987pbedxdg5
    cju5y4hgqmk0i08180rjhbwvp cju5yeqiwmkgl0801fzv2douc cju6us80mv1b50871ebyq2wxa
    cju6uy20suzbl0987rzuhz7z9 cju6v1m1xv07w09870ah3njy1 cju6vifjlv55z0987un6y4zdo
    cju6vrs1ov8cr098788h8gs6j cju6x0yqbvxqt0755dhxislgb cju7ajnbo1gvm098749rdouk0
    cju7awzmu1ncs0871hziy65zx cju7bd1qu1mx409877xjxibox cju7bgnvb1sf808717qa799ir
    cju7crgxa28550755wbsgqkel cju7da88w2eod0755wejzynvt cju7ddtz729960801uazp1knc
    cju7do8c72dbo0801vxfzxdc4 cju7dymur2od30755eg8yv2ht cju7ecl9i2i060987xawjp4l0
    cju7fbndk2sl608015ravktum cju7fcgbe2z3p07550vaflqdb cju7fpfzq2wyf0818xxd1oziv
    cju84hibuktj80871u519o71q cju88cddensj00987788yotmg cju88t4fvokxf07558ymyh281
    cju88vx2uoocy075531lc63n3 cju8alhigqn2h0801zksudldd cju8aqq8uqmoq0987hphto9gg
    cju8bk8oirjhw0817hgkua2w8 cju8c2rqzs5t80850d0zky5dy cju8d4jgatgpj0871q2ophhkm
    cju8dqkrqu83i0818ev74qpxq
""".split())

Converter = Callable[[list[Path], Path, bool], dict[str, int]]


# ------------------------------------------------------------------------------------------- helpers
def _walk(roots: Iterable[Path]) -> list[Path]:
    """Every file under ``roots``, sorted, without hidden files and macOS ``__MACOSX`` resource forks."""
    files = []
    for root in roots:
        for p in root.rglob("*"):
            rel = p.relative_to(root).parts
            if any(part.startswith(".") or part == "__MACOSX" for part in rel) or not p.is_file():
                continue
            files.append(p)
    return sorted(files)


def read_array(path: Path) -> np.ndarray:
    """An image file as an array: TIFFs through tifffile (Pillow fails on or garbles CVC-ClinicDB's TIFFs),
    everything else through the suite's reader (:func:`lesion_kd.data.io._open_array`)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for a broken file
            raise DataError(f"{path}: corrupt or unreadable TIFF ({e})") from e
        # planar (separate-plane) RGB comes back channel-first
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
        return arr
    return _open_array(path)


def threshold_mask(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) {0, 1} mask from a source mask of any depth: 0/1 masks at >0, anything else at >127.

    JPEG masks (Kvasir-SEG) hold noisy grey levels around 0 and 255, and colour JPEG masks slightly
    differing channels; they are reduced to luma first (as Pillow's ``convert("L")``), then thresholded,
    like the shared datasets.
    """
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) if arr.shape[2] >= 3 else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: unsupported mask shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    return (arr > (0 if float(arr.max(initial=0)) <= 1 else 127)).astype(np.uint8)


def _check_size(hw: tuple[int, int], mask: np.ndarray, image: Path, mask_path: Path) -> None:
    if tuple(mask.shape) != tuple(hw):
        raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image} is "
                        f"{hw[1]}x{hw[0]}")


def _claim(table: dict[str, Path], key: str, path: Path, what: str) -> None:
    if key in table:
        raise DataError(f"two {what} files for id {key!r}: {table[key]} and {path}")
    table[key] = path


def _pair_up(images: dict[str, Path], masks: dict[str, Path], where: str) -> list[str]:
    """Ids having both an image and a mask; an image without a mask, or the reverse, is an error."""
    if not images:
        raise DataError(f"{where}: no images found (is this the right archive or folder?)")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DataError(f"{images[no_mask[0]]}: no mask for this image ({len(no_mask)} image(s) without a mask)")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DataError(f"{masks[no_image[0]]}: mask without an image ({len(no_image)} such mask(s))")
    return sorted(images)


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _write_pairs(ids: list[str], images: dict[str, Path], masks: dict[str, Path], out: Path, desc: str,
                 progress: bool, copy_image: bool = True) -> dict[str, int]:
    """Copy (or re-encode as PNG) each image and write its thresholded mask; returns counts."""
    empty = 0
    for i in tqdm(ids, desc=desc, disable=not progress):
        src = images[i]
        if copy_image:
            hw = image_size(src)
            dst = out / "images" / f"{i}{src.suffix.lower()}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        else:  # not readable by the suite as it is (CVC's TIFFs): decode once, store losslessly as PNG
            arr = read_array(src)
            if arr.dtype != np.uint8:
                raise DataError(f"{src}: {arr.dtype} image; expected 8-bit")
            hw = arr.shape[:2]
            write_png(out / "images" / f"{i}.png", arr[..., :3] if arr.ndim == 3 else arr)
        mask = threshold_mask(read_array(masks[i]), masks[i])
        _check_size(hw, mask, src, masks[i])
        empty += int(not mask.any())
        write_png(out / "masks" / f"{i}.png", mask * 255)
    return {"images": len(ids), "empty_masks": empty}


# ----------------------------------------------------------------------------------------- datasets
def convert_kvasir(roots: list[Path], out: Path, progress: bool = True) -> dict[str, int]:
    """``Kvasir-SEG/{images,masks}/<id>.jpg`` (+ ``kavsir_bboxes.json``) -> the suite's layout + PraNet splits."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    bboxes = None
    for p in _walk(roots):
        folder = p.parent.name.lower()
        if p.name.lower() == "kavsir_bboxes.json":
            bboxes = p
        elif p.suffix.lower() in (".jpg", ".jpeg", ".png") and folder in ("images", "masks"):
            _claim(images if folder == "images" else masks, p.stem, p, folder[:-1])
    ids = _pair_up(images, masks, f"{', '.join(map(str, roots))} (expected Kvasir-SEG/images and Kvasir-SEG/masks)")
    counts = _write_pairs(ids, images, masks, out, "converting Kvasir-SEG", progress)
    if bboxes is not None:
        shutil.copyfile(bboxes, out / "kavsir_bboxes.json")
    test = [i for i in PRANET_KVASIR_TEST if i in images]
    if len(test) != len(PRANET_KVASIR_TEST):
        log.warning("Kvasir-SEG: only %d of the %d PraNet test ids are in this archive; splits/pranet_test.txt "
                    "lists those present", len(test), len(PRANET_KVASIR_TEST))
    train = sorted(set(ids) - set(test))
    _write_text(out / "splits" / "pranet_test.txt", "".join(f"{i}\n" for i in sorted(test)))
    _write_text(out / "splits" / "pranet_train.txt", "".join(f"{i}\n" for i in train))
    return {**counts, "pranet_test": len(test), "pranet_train": len(train)}


_BUSI_NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(?:_(\d+))?)?\.png$", re.IGNORECASE)


def convert_busi(roots: list[Path], out: Path, progress: bool = True) -> dict[str, int]:
    """``Dataset_BUSI_with_GT/<class>/<class> (<n>)[_mask[_k]].png`` -> ``<class>_<nnn>`` + ``metadata.csv``."""
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    category: dict[str, str] = {}
    for p in _walk(roots):
        m = _BUSI_NAME.match(p.name)
        if not m:
            continue
        cat = m.group(1).lower()
        sid = f"{cat}_{int(m.group(2)):03d}"
        category[sid] = cat
        if m.group(3):
            twin = next((q for q in masks.get(sid, []) if q.name == p.name), None)
            if twin is not None:  # the same file in two copies of the dataset inside the archive
                raise DataError(f"two mask files named {p.name!r}: {twin} and {p}")
            masks.setdefault(sid, []).append(p)
        else:
            _claim(images, sid, p, "image")
    ids = _pair_up(images, {k: v[0] for k, v in masks.items()},
                   f"{', '.join(map(str, roots))} (expected benign/, malignant/, normal/ with '<class> (<n>).png')")
    rows = []
    for sid in tqdm(ids, desc="converting BUSI", disable=not progress):
        src = images[sid]
        arr = _open_array(src)
        rgb = arr[..., :3] if arr.ndim == 3 else None
        opaque = arr.ndim != 3 or arr.shape[2] < 4 or bool((arr[..., 3] == 255).all())
        if rgb is not None and rgb.shape[2] == 3 and opaque and (rgb == rgb[..., :1]).all() and arr.dtype == np.uint8:
            write_png(out / "images" / f"{sid}.png", np.ascontiguousarray(rgb[..., 0]))  # gray stored as gray, losslessly
        else:
            (out / "images").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / "images" / f"{sid}.png")
        merged = np.zeros(arr.shape[:2], np.uint8)
        files = sorted(masks[sid], key=lambda q: q.name)
        for mp in files:
            mask = threshold_mask(read_array(mp), mp)
            _check_size(arr.shape[:2], mask, src, mp)
            merged |= mask  # several lesions in one image: pixel-wise OR of all its mask files
        write_png(out / "masks" / f"{sid}.png", merged * 255)
        rows.append((sid, category[sid], src.name, len(files), int(merged.sum())))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "category", "original_file", "n_mask_files_merged", "fg_pixels"])
    writer.writerows(rows)
    _write_text(out / "metadata.csv", buf.getvalue())
    counts = {"images": len(ids)}
    for cat in ("benign", "malignant", "normal"):
        counts[cat] = sum(category[i] == cat for i in ids)
    counts["multi_mask_merged"] = sum(r[3] > 1 for r in rows)
    return counts


_ISIC_IMAGE = re.compile(r"^(ISIC_\d+)\.jpe?g$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d+)_segmentation\.png$", re.IGNORECASE)


def convert_isic2018(roots: list[Path], out: Path, progress: bool = True) -> dict[str, int]:
    """ISIC 2018 task 1: ``ISIC_<n>.jpg`` (input archive) + ``ISIC_<n>_segmentation.png`` (ground truth)."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    notices: list[Path] = []
    for p in _walk(roots):
        if m := _ISIC_IMAGE.match(p.name):
            _claim(images, m.group(1), p, "image")
        elif m := _ISIC_MASK.match(p.name):
            _claim(masks, m.group(1), p, "mask")
        elif p.name.upper() in ("ATTRIBUTION.TXT", "LICENSE.TXT"):
            notices.append(p)
    ids = _pair_up(images, masks, f"{', '.join(map(str, roots))} (expected ISIC_<n>.jpg and ISIC_<n>_segmentation.png)")
    counts = _write_pairs(ids, images, masks, out, "converting ISIC 2018", progress)
    for p in notices:  # the licence and the per-image attributions travel with the images
        shutil.copyfile(p, out / f"{p.parent.name}_{p.name}")
    return counts


def _cvc_id(stem: str) -> str:
    return f"{int(stem):03d}" if stem.isdigit() else stem


def convert_cvc_clinicdb(roots: list[Path], out: Path, progress: bool = True) -> dict[str, int]:
    """``Original/<n>.tif`` + ``Ground Truth/<n>.tif`` (TIFF preferred over a PNG copy) -> PNG pairs."""
    by_dir: dict[Path, dict[str, dict[str, Path]]] = {}  # parent folder -> {"image"/"mask": {id: path}}
    for p in _walk(roots):
        folder = p.parent.name.lower().replace("_", " ")
        if p.suffix.lower() not in (".tif", ".tiff", ".png", ".bmp", ".jpg"):
            continue
        kind = "image" if folder == "original" else "mask" if folder in ("ground truth", "groundtruth") else None
        if kind:
            _claim(by_dir.setdefault(p.parent.parent, {"image": {}, "mask": {}})[kind], _cvc_id(p.stem), p, kind)
    if not by_dir:
        raise DataError(f"{', '.join(map(str, roots))}: no 'Original/' and 'Ground Truth/' folders found "
                        "(expected CVC-ClinicDB's layout)")
    # The Kaggle copy has both PNG/ and TIF/; the TIFFs are the original data
    def tiff_first(d: Path) -> tuple[int, str]:
        return (0 if any(q.suffix.lower() in (".tif", ".tiff") for q in by_dir[d]["image"].values()) else 1, str(d))
    chosen = sorted(by_dir, key=tiff_first)[0]
    images, masks = by_dir[chosen]["image"], by_dir[chosen]["mask"]
    ids = _pair_up(images, masks, str(chosen))
    return _write_pairs(ids, images, masks, out, "converting CVC-ClinicDB", progress, copy_image=False)


def convert_ph2(roots: list[Path], out: Path, progress: bool = True) -> dict[str, int]:
    """``IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` + ``IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp``, flattened."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    notes: list[Path] = []
    for p in _walk(roots):
        name, parent = p.name.lower(), p.parent.name.lower()
        if name.startswith("ph2_dataset") and p.suffix.lower() in (".txt", ".xlsx"):
            notes.append(p)
        if not name.startswith("imd") or p.suffix.lower() != ".bmp":
            continue
        if parent.endswith("_dermoscopic_image"):
            _claim(images, p.stem, p, "image")
        elif parent.endswith("_lesion") and p.stem.lower().endswith("_lesion"):
            _claim(masks, p.stem[: -len("_lesion")], p, "lesion mask")
    ids = _pair_up(images, masks, f"{', '.join(map(str, roots))} (expected IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp)")
    counts = _write_pairs(ids, images, masks, out, "converting PH2", progress)
    for p in notes:  # the clinical diagnoses (common nevus / atypical nevus / melanoma)
        shutil.copyfile(p, out / p.name)
    return counts

