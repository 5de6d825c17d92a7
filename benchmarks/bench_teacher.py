"""The teacher's cost per training epoch on Kvasir-SEG (CPU): embedding cache vs. online teacher.

Measures, on this machine:
- online: LiteMedSAM ``embed`` of a 256 x 256 augmented view, per image (``--online`` images);
- cache fill: read + embed + write per image, for ``--fill`` training images (one-time cost);
- cache step: ``TeacherEmbeddingCache.view_embeddings`` for a batch of 8 labeled + 8 unlabeled samples
  (16 entry reads with CRC check, fp16 -> fp32, warp onto the views at 64 x 64), median of ``--reps``;
- student step: forward + backward + AdamW step of ``build_model("mamba_unet")`` (or ``"unet"`` if the
  Mamba student is not registered yet) at batch 16, 256 x 256.
The per-epoch figures are *extrapolated* to the 810-image training split (810 teacher embeddings per
epoch online; ceil(810 / 16) cache steps), not measured over a whole epoch.

Old vs new encoder (issue 29): ``--encoders torch,hybrid`` (default) fills the same ``--fill`` images with
each encoder of :mod:`lesion_kd.models.teacher_fast` into its own cache folder, alternating in rounds of
``--round`` images so both see the same machine load, and prints each fill rate (s/image, the encoder's
one-time build/export excluded and printed apart), their ratio and the per-cell cosine of the new entries
to the ``torch`` ones. Threads: whatever ``OMP_NUM_THREADS`` says, the same for both (onnxruntime gets
``torch.get_num_threads()`` intra-op threads). ``--fill-only`` stops after that comparison.

Run: .venv/bin/python benchmarks/bench_teacher.py [--data /work/shared/datasets/Kvasir-SEG] [--json out.json]
Prints a markdown table. The cache is written to a temporary folder (or ``--cache-dir``) and, being just
written, is read from the page cache; a first epoch that reads it from disk pays up to 2 MiB per image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lesion_kd.data.folder import Sample
from lesion_kd.data.io import read_image
from lesion_kd.models import build_model, build_teacher, list_models
from lesion_kd.teacher_cache import TeacherEmbeddingCache, aligned

HFLIP = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
ROT90 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def canonical_view(sample: Sample, size: int = 256) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: the image squashed to the model size, as the data module's views are."""
    img = torch.tensor(read_image(sample.image)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, (size, size), mode="bilinear", align_corners=False, antialias=True)


def random_thetas(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) weak-view geometries: random flip, rot90 and a 0.8-1.0 scale crop."""
    out = []
    for _ in range(n):
        t = torch.eye(3)
        if torch.rand((), generator=gen) < 0.5:
            t = t @ torch.cat([HFLIP, torch.tensor([[0.0, 0.0, 1.0]])])
        for _ in range(int(torch.randint(0, 4, (), generator=gen))):
            t = t @ torch.cat([ROT90, torch.tensor([[0.0, 0.0, 1.0]])])
        s = 0.8 + 0.2 * float(torch.rand((), generator=gen))
        c = (1 - s) * (2 * torch.rand(2, generator=gen) - 1)
        t = t @ torch.tensor([[s, 0.0, float(c[0])], [0.0, s, float(c[1])], [0.0, 0.0, 1.0]])
        out.append(t[:2])
    return torch.stack(out)


def student_step_time(name: str, batch: int, size: int, reps: int) -> float:
    torch.manual_seed(0)
    net = build_model(name, in_channels=3, num_classes=2).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 2, (batch, size, size))
    times = []
    for i in range(reps + 1):  # the first step warms up the allocator
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/shared/datasets/Kvasir-SEG")
    ap.add_argument("--cache-dir", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--train-images", type=int, default=810, help="training-split size the epoch is extrapolated to")
    ap.add_argument("--fill", type=int, default=16, help="images to fill the cache with (>= 16: one batch)")
    ap.add_argument("--online", type=int, default=4, help="views embedded online to time the teacher")
    ap.add_argument("--reps", type=int, default=20, help="timed cache steps")
    ap.add_argument("--student-reps", type=int, default=3, help="timed student steps")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--encoders", default="torch,hybrid",
                    help="comma-separated cache encoders to compare on the fill (the first is the baseline)")
    ap.add_argument("--round", type=int, default=4, help="images per encoder per round of the alternating fill")
    ap.add_argument("--fill-only", action="store_true", help="only the old-vs-new fill comparison")
    args = ap.parse_args()
    encoders = args.encoders.split(",")
    labeled, unlabeled = 8, 8
    batch = labeled + unlabeled

    root = Path(args.data)
    ids = (root / "splits" / "pranet_train.txt").read_text().split()[: max(args.fill, batch)]
    samples = [Sample(id=i, image=root / "images" / f"{i}.jpg") for i in ids]
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as tmp:
        teacher, t_build = timed(build_teacher, "litemedsam")
        caches = {e: TeacherEmbeddingCache(args.cache_dir or tmp, dataset="kvasir-seg", teacher=teacher, encoder=e)
                  for e in encoders}
        setup = {e: timed(lambda c=c: c.image_encoder)[1] for e, c in caches.items()}  # export/build, once
        fill_t = dict.fromkeys(encoders, 0.0)
        fill_n = dict.fromkeys(encoders, 0)
        fill_samples = samples[: args.fill]
        for k in range(0, len(fill_samples), args.round):  # alternate: both see the same load
            for e, c in caches.items():
                n, t = timed(c.fill, fill_samples[k : k + args.round], 0, 1, False)
                fill_t[e] += t
                fill_n[e] += n
        rate = {e: fill_t[e] / max(fill_n[e], 1) for e in encoders}
        base = encoders[0]
        ref = caches[base].get_batch(fill_samples).float()
        enc_cos = {}
        for e in encoders[1:]:
            c = F.cosine_similarity(caches[e].get_batch(fill_samples).float(), ref, dim=1)
            enc_cos[e] = {"min": c.min().item(), "mean": c.mean().item()}
        load_fill = os.getloadavg()[0]
        print(f"\nTeacher cache fill, old vs new encoder: {len(fill_samples)} Kvasir-SEG training images, "
              f"alternating rounds of {args.round}; {torch.get_num_threads()} thread(s) for every encoder "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); load average "
              f"{load_before:.2f} -> {load_fill:.2f}\n")
        print("| encoder | fingerprint (cache folder) | one-time build/export | fill, s/image | speed-up | "
              f"per-cell cosine to {base}: min / mean |\n|---|---|---|---|---|---|")
        for e in encoders:
            cs = enc_cos.get(e)
            print(f"| {e} | {caches[e].fingerprint} | {setup[e]:.1f} s | {rate[e]:.2f} | {rate[base] / rate[e]:.2f}x | "
                  + (f"{cs['min']:.6f} / {cs['mean']:.6f} |" if cs else "(baseline) |"))
        fill_fig = {"encoders": encoders, "fill_images": len(fill_samples), "fill_s_per_image_by_encoder": rate,
                    "encoder_setup_s": setup, "speedup_over_" + base: {e: rate[base] / rate[e] for e in encoders},
                    "cosine_to_" + base: enc_cos, "threads": torch.get_num_threads(),
                    "load_average_before_after_fill": [round(load_before, 2), round(load_fill, 2)]}
        if args.fill_only:
            if args.json:
                Path(args.json).write_text(json.dumps(fill_fig, indent=2))
            return
        cache = caches[base] if base == "torch" else TeacherEmbeddingCache(args.cache_dir or tmp, dataset="kvasir-seg",
                                                                           teacher=teacher, encoder="torch")
        computed = cache.fill(samples, 0, 1, False) + fill_n.get("torch", 0)  # the rest needs 16 torch entries
        fill_per_image = rate.get("torch", float("nan"))
        entry_bytes = cache.entry_path(samples[0]).stat().st_size

        # online: the teacher embeds each augmented 256 x 256 view; also how close the cache gets to it
        online_times, cos = [], {"hflip": [], "rot90": []}
        for k, s in enumerate(samples[: args.online]):
            name, theta = ("hflip", HFLIP) if k % 2 == 0 else ("rot90", ROT90)
            canon = canonical_view(s)
            view = canon.flip(-1) if name == "hflip" else canon.rot90(1, (-2, -1))
            emb, t = timed(teacher.embed, view)
            online_times.append(t)
            cached = aligned(cache.get(s)[None], theta[None])
            cos[name].append(F.cosine_similarity(cached, emb, dim=1).mean().item())
        online_per_image = statistics.median(online_times)

        # cache: one training step's teacher input = 16 entries read and warped onto their views
        gen = torch.Generator().manual_seed(0)
        step_samples = samples[:batch]
        read_times, warp_times, step_times = [], [], []
        for i in range(args.reps + 2):
            theta = random_thetas(batch, gen)
            t0 = time.perf_counter()
            raw = cache.get_batch(step_samples)
            t1 = time.perf_counter()
            out = aligned(raw, theta, (64, 64))
            t2 = time.perf_counter()
            assert out.shape == (batch, 256, 64, 64)
            if i >= 2:  # two warm-up steps
                read_times.append(t1 - t0)
                warp_times.append(t2 - t1)
                step_times.append(t2 - t0)
        cache_step = statistics.median(step_times)

    student = "mamba_unet" if "mamba_unet" in list_models() else "unet"
    student_step = student_step_time(student, batch, 256, args.student_reps)
    load_after = os.getloadavg()[0]

    n = args.train_images
    steps = math.ceil(n / batch)
    online_epoch = n * online_per_image
    cache_epoch = steps * cache_step
    fig = {
        "teacher": teacher.fingerprint,
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "teacher_build_s": t_build,
        "fill_images": computed,
        "fill_s_per_image": fill_per_image,
        "online_views": len(online_times),
        "online_s_per_image": online_per_image,
        "cache_read_ms_per_step": 1e3 * statistics.median(read_times),
        "cache_warp_ms_per_step": 1e3 * statistics.median(warp_times),
        "cache_ms_per_step": 1e3 * cache_step,
        "student": student,
        "student_step_s": student_step,
        "cache_pct_of_student_step": 100 * cache_step / student_step,
        "online_pct_of_student_step": 100 * batch * online_per_image / student_step,
        "epoch_images": n,
        "epoch_steps": steps,
        "online_epoch_s": online_epoch,
        "cache_epoch_s": cache_epoch,
        "epoch_ratio_online_over_cache": online_epoch / cache_epoch,
        "one_time_fill_s": n * fill_per_image,
        "entry_bytes": entry_bytes,
        "cache_mb_per_image": entry_bytes / 1e6,
        "cache_gb_for_epoch_images": n * entry_bytes / 1e9,
        "cosine_cache_vs_online_view": {k: statistics.mean(v) for k, v in cos.items() if v},
        "fill_old_vs_new": fill_fig,
    }

    print(f"\nTeacher cost on Kvasir-SEG, CPU ({fig['torch_threads']} threads, load average "
          f"{fig['load_average_before_after'][0]} -> {fig['load_average_before_after'][1]}), teacher {fig['teacher']}")
    print(f"Per-epoch figures are extrapolated to the {n} training images ({steps} steps of {labeled} + {unlabeled}).\n")
    rows = [
        (f"online teacher, per 256x256 view (median of {fig['online_views']})", f"{online_per_image:.2f} s"),
        (f"cache fill, per image (read + embed + write, {computed} images)", f"{fill_per_image:.2f} s"),
        ("cache read, per step (16 entries, CRC checked)", f"{fig['cache_read_ms_per_step']:.1f} ms"),
        ("cache warp onto views, per step (64x64)", f"{fig['cache_warp_ms_per_step']:.1f} ms"),
        (f"cache read + warp, per step (median of {args.reps})", f"{fig['cache_ms_per_step']:.1f} ms"),
        (f"student step: {student}, batch 16, 256x256, fwd+bwd+AdamW", f"{student_step:.2f} s"),
        ("cache / student step", f"{fig['cache_pct_of_student_step']:.1f} %"),
        ("online teacher / student step", f"{fig['online_pct_of_student_step']:.0f} %"),
        (f"epoch teacher cost, online ({n} x online)", f"{online_epoch:.0f} s"),
        (f"epoch teacher cost, cache ({steps} x cache step)", f"{cache_epoch:.2f} s"),
        ("epoch ratio online / cache", f"{fig['epoch_ratio_online_over_cache']:.0f} x"),
        (f"one-time cache fill ({n} x fill)", f"{fig['one_time_fill_s'] / 60:.1f} min"),
        ("cache size on disk, per image", f"{fig['cache_mb_per_image']:.2f} MB ({entry_bytes} bytes)"),
        (f"cache size on disk, {n} images", f"{fig['cache_gb_for_epoch_images']:.2f} GB"),
    ] + [(f"cosine(aligned cache, online {k} view), mean per cell", f"{v:.3f}")
         for k, v in fig["cosine_cache_vs_online_view"].items()]
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
