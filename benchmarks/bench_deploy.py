"""Deployment benchmark (issue 10): the student in PyTorch eager, torch.compile, TorchScript and onnxruntime,
next to the reference U-Net (eager, onnxruntime) and the LiteMedSAM teacher's image encoder, on the CPU.

    .venv/bin/python benchmarks/bench_deploy.py [--ckpt CKPT] [--size 256] [--json out.json] [--no-compile]

For every configuration: batch-1 latency (median of ``--runs`` calls after warm-up), batch-16 throughput
(images per second, median of ``--throughput-runs`` calls) and peak memory. Memory is the peak resident
set size (VmHWM of /proc/self/status) of a fresh Python process that runs only that configuration
(imports, model load, all timed calls). tracemalloc does not see torch's allocations, and
``getrusage().ru_maxrss`` would not do either: Linux carries the parent's peak across fork and exec. The
rows "python + torch" and "python + onnxruntime" give the runtimes' own share.

Threads: $OMP_NUM_THREADS when set, else every core this process may use; torch (set_num_threads) and
onnxruntime (intra_op_num_threads) get the same number. The teacher's throughput at batch 16 is
extrapolated from a batch of 4 (said in the table). The student is the checkpoint's (--ckpt, default the
cpu-profile run when present) or a randomly initialised one: timings do not depend on the weights.
Exports go through ``lesion_kd.deploy.export.export_network`` (verified against eager PyTorch).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CKPT = "runs/cpu-mamba/lightning_logs/version_0/checkpoints/best-*.ckpt"


def _threads() -> int:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else len(os.sched_getaffinity(0))


def _peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM: the high-water mark of its own address space)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


# --------------------------------------------------------------------------------------------------
# Workers: one configuration per fresh process (its peak RSS is that configuration's)
# --------------------------------------------------------------------------------------------------
def _time(fn, x1, x16, runs: int, thr_runs: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn(x1)
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x1)
        lat.append(time.perf_counter() - t)
    fn(x16)
    thr = []
    for _ in range(thr_runs):
        t = time.perf_counter()
        fn(x16)
        thr.append(time.perf_counter() - t)
    return {"latency_ms": 1000 * statistics.median(lat), "latency_p90_ms": 1000 * float(np.percentile(lat, 90)),
            "throughput": len(x16) / statistics.median(thr)}


def _torch_net(name: str, ckpt: str | None):
    import torch

    from lesion_kd.models import build_model

    if name == "mamba_unet" and ckpt:
        from lesion_kd.models.loading import load_student

        return load_student(ckpt).eval()
    torch.manual_seed(0)
    return build_model(name).eval()


def worker(kind: str, args: argparse.Namespace) -> dict:
    threads, S = _threads(), args.size
    rng = np.random.default_rng(0)
    x1 = rng.random((1, 3, S, S), np.float32)
    x16 = rng.random((16, 3, S, S), np.float32)
    out: dict = {"threads": threads}
    if kind == "baseline-torch":
        import torch  # noqa: F401
    elif kind == "baseline-ort":
        import onnxruntime  # noqa: F401
    elif kind.endswith("onnxruntime"):
        import onnxruntime as ort  # no torch in this process: the deployed footprint

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        if kind.endswith("nospin-onnxruntime"):  # idle worker threads sleep instead of spin-waiting
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(Path(args.artifacts) / f"{kind.split('-')[0]}.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
        out.update(_time(lambda x: sess.run(None, {"image": x}), x1, x16, args.runs, args.throughput_runs))
        t = time.perf_counter()
        for i in range(len(x16)):  # what lesion-kd segment does on the CPU: one image per call
            sess.run(None, {"image": x16[i : i + 1]})
        out["note"] = f"16 calls of batch 1: {len(x16) / (time.perf_counter() - t):.1f} img/s"
    else:
        import torch

        torch.set_num_threads(threads)
        t1, t16 = torch.from_numpy(x1), torch.from_numpy(x16)
        if kind == "teacher-embed":
            from lesion_kd.models import build_teacher

            teacher = build_teacher("litemedsam").eval()
            t4 = t16[:4]
            with torch.inference_mode():
                teacher.embed(t1)  # warm-up
                lat = []
                for _ in range(args.teacher_runs):
                    t = time.perf_counter()
                    teacher.embed(t1)
                    lat.append(time.perf_counter() - t)
                t = time.perf_counter()
                teacher.embed(t4)
                b4 = time.perf_counter() - t
            out.update(latency_ms=1000 * statistics.median(lat), latency_p90_ms=1000 * max(lat), throughput=4 / b4,
                       note="batch-16 throughput extrapolated from one batch of 4")
        else:
            net_name = "unet" if kind.startswith("unet") else "mamba_unet"
            if kind.endswith("torchscript"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    net = torch.jit.load(str(Path(args.artifacts) / "student.pt"))
            else:
                net = _torch_net(net_name, args.ckpt)
            if kind.endswith("compile"):
                t = time.perf_counter()
                net = torch.compile(net)
                with torch.inference_mode():
                    net(t1)
                    net(t16)  # compile both shapes before timing
                out["note"] = f"compile {time.perf_counter() - t:.0f} s (not in the timings)"

            def run(x):
                with torch.inference_mode():
                    return net(x)

            out.update(_time(run, t1, t16, args.runs, args.throughput_runs))
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
CONFIGS = [
    # (key, network, runtime)
    ("student-eager", "student (mamba_unet)", "PyTorch eager"),
    ("student-compile", "student (mamba_unet)", "torch.compile (inductor)"),
    ("student-torchscript", "student (mamba_unet)", "TorchScript (traced, frozen)"),
    ("student-onnxruntime", "student (mamba_unet)", "onnxruntime"),
    ("student-nospin-onnxruntime", "student (mamba_unet)", "onnxruntime, spin-wait off"),
    ("unet-eager", "U-Net", "PyTorch eager"),
    ("unet-onnxruntime", "U-Net", "onnxruntime"),
    ("unet-nospin-onnxruntime", "U-Net", "onnxruntime, spin-wait off"),
    ("teacher-embed", "LiteMedSAM image encoder (embed)", "PyTorch eager"),
    ("baseline-torch", "python + torch (no model)", "-"),
    ("baseline-ort", "python + onnxruntime (no model)", "-"),
]


def _machine() -> dict:
    from machine import cpu_model

    cpu = cpu_model()
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "threads": _threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "gpu": gpu,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _prepare(artifacts: Path, args: argparse.Namespace) -> None:
    """Export the student (ONNX, TorchScript) and the U-Net (ONNX) at S x S, each verified against eager."""
    from lesion_kd.deploy.export import export_network, network_metadata

    for name, fmt, file in (("mamba_unet", "onnx", "student.onnx"), ("mamba_unet", "torchscript", "student.pt"),
                            ("unet", "onnx", "unet.onnx")):
        net = _torch_net(name, args.ckpt)
        report = export_network(net, fmt, artifacts / file, args.size, network_metadata(name, args.size, net),
                                log=lambda s: None)
        print(f"exported {name} to {fmt}: max |logit diff| to eager {report.max_abs_diff:.2e}", flush=True)


def main() -> int:
    from lesion_kd.commands import parser  # argparse only (no torch): the help is shown without loading it

    p = parser("benchmarks/bench_deploy.py", __doc__)  # the docstring's whole first sentence (it spans two lines)
    p.add_argument("--ckpt", default=None, help=f"student checkpoint (default: {DEFAULT_CKPT} when present)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--runs", type=int, default=20, help="timed batch-1 calls per configuration")
    p.add_argument("--throughput-runs", type=int, default=3, help="timed batch-16 calls per configuration")
    p.add_argument("--teacher-runs", type=int, default=3, help="timed batch-1 calls of the teacher")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ckpt is None:
        found = sorted(glob.glob(str(REPO / DEFAULT_CKPT)))
        args.ckpt = found[0] if found else None
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    machine = _machine()
    load0 = os.getloadavg()
    print(f"machine: {machine['cpu']}, {machine['cores_usable']} usable cores; threads {machine['threads']} "
          f"(OMP_NUM_THREADS={machine['OMP_NUM_THREADS']}); torch {machine['torch']}, onnxruntime "
          f"{machine['onnxruntime']}, python {machine['python']}; {machine['date']}")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min)")
    print(f"GPU: {machine['gpu'] or 'none on this machine: GPU rows not measured'}")
    print(f"student: {args.ckpt or 'random initialisation'}; input {args.size}x{args.size}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        _prepare(Path(tmp), args)
        for key, _, _ in CONFIGS:
            if key == "student-compile" and args.no_compile:
                results[key] = {"error": "skipped (--no-compile)"}
                continue
            cmd = [sys.executable, __file__, "--worker", key, "--artifacts", tmp, "--size", str(args.size),
                   "--runs", str(args.runs), "--throughput-runs", str(args.throughput_runs),
                   "--teacher-runs", str(args.teacher_runs)] + (["--ckpt", args.ckpt] if args.ckpt else [])
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode or not lines:
                    results[key] = {"error": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
                else:
                    results[key] = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                results[key] = {"error": f"timed out after {args.timeout} s"}
            print(f"  {key}: {time.perf_counter() - t:.0f} s {results[key]}", flush=True)
    load1 = os.getloadavg()

    print("\n| model | runtime | batch-1 latency, ms (median; p90) | batch-16 throughput, img/s | peak RSS, MB | notes |")
    print("|---|---|---|---|---|---|")
    for key, model, runtime in CONFIGS:
        r = results[key]
        if "error" in r:
            print(f"| {model} | {runtime} | - | - | - | {r['error']} |")
        elif "latency_ms" not in r:
            print(f"| {model} | {runtime} | - | - | {r['peak_rss_mb']:.0f} | runtime footprint |")
        else:
            print(f"| {model} | {runtime} | {r['latency_ms']:.1f}; {r['latency_p90_ms']:.1f} | {r['throughput']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} | {r.get('note', '')} |")
    print(f"\nload average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    teacher = results.get("teacher-embed", {})
    for key in ("student-onnxruntime", "student-nospin-onnxruntime"):
        ort_s = results.get(key, {})
        if "latency_ms" in ort_s and "latency_ms" in teacher:
            ratio = teacher["latency_ms"] / ort_s["latency_ms"]
            print(f"target ({key}): batch-1 latency {ort_s['latency_ms']:.1f} ms (< 25 ms: "
                  f"{'met' if ort_s['latency_ms'] < 25 else 'NOT met'}); teacher encoder / student = {ratio:.0f}x "
                  f"(>= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    eager, comp = results.get("student-eager", {}), results.get("student-compile", {})
    if "latency_ms" in eager and "latency_ms" in comp:
        faster = comp["latency_ms"] < eager["latency_ms"]
        print(f"torch.compile: {comp['latency_ms']:.1f} ms vs eager {eager['latency_ms']:.1f} ms at batch 1 "
              f"({'faster' if faster else 'slower: not worth it here'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "load_start": load0, "load_end": load1,
                                               "size": args.size, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
