"""``lesion-kd sweep``: run a W&B sweep file locally, without a W&B server.

The same sweep file that ``wandb sweep FILE`` + ``wandb agent ID`` run online runs here on one machine:
each run's parameters are proposed by W&B's own open-source search algorithms (the ``sweeps`` package:
grid, random, bayes; bayes is fed every finished run's metric), the run is the sweep's ``command:`` with
W&B's macros expanded (``${env}``, ``${interpreter}``, ``${program}``, ``${args}`` and the other ``${args_*}``
forms, ``${envvar:NAME}``), logged offline (``wandb sync`` uploads it later), and every run's parameters and
metrics are collected into ``OUT/sweep_results.csv`` and ``OUT/sweep_results.md``.

Layout of OUT (default ``runs/sweeps/<sweep file name>``)::

    sweep.yaml                the sweep config in use (a later call must use the same one)
    run-001/proposal.json     the proposed parameters and the exact command line
    run-001/output.log        the run's stdout and stderr
    run-001/progress.json     the run's step, loss and val Dice while it runs (shown as a progress bar, or a
                              line per validation where stderr is not a terminal)
    run-001/result.json       state, return code, metric history, best val Dice, test Dice (written at the end)
    run-001/lightning_logs/   the run directory (--trainer.default_root_dir OUT/run-001)
    sweep_results.csv / .md   one row per run

Resumable: ``--count N`` is the total number of runs the sweep should hold; a second call with the same OUT
re-runs only an interrupted run (one with a proposal but no result) and proposes the missing ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..io_utils import atomic_write_text
from . import parser

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "the 'sweeps' package (W&B's open-source sweep algorithms) is not installed; install it without its "
    "numpy<2 pin: pip install --no-deps 'sweeps==0.3.0' jsonschema jsonref scikit-learn (make install does this)"
)
ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


def import_sweeps():
    """The ``sweeps`` package, or a SystemExit saying how to install it."""
    try:
        with warnings.catch_warnings():
            # sweeps 0.3.0 declares a pydantic-v1 config key; harmless, but noisy on every import
            warnings.filterwarnings("ignore", message="Valid config keys have changed in V2", category=UserWarning)
            import sweeps
    except ImportError as e:
        raise SystemExit(f"lesion-kd sweep: {INSTALL_HINT} ({e})") from e
    return sweeps


# ------------------------------------------------------------------------------------------ config
def load_sweep_config(path: str | os.PathLike) -> dict:
    """Read and validate a W&B sweep file; errors name the file and every schema violation."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"lesion-kd sweep: {p}: sweep file not found")
    cfg = yaml.safe_load(p.read_text())
    if not isinstance(cfg, dict):
        raise SystemExit(f"lesion-kd sweep: {p}: not a YAML mapping (a W&B sweep config)")
    problems = import_sweeps().schema_violations_from_proposed_config(cfg)
    if problems:
        raise SystemExit(f"lesion-kd sweep: {p}: not a valid W&B sweep config:\n  " + "\n  ".join(problems))
    if not cfg.get("command"):
        raise SystemExit(f"lesion-kd sweep: {p}: no command: section (the local runner needs the command line)")
    return cfg


def plain(v: Any) -> Any:
    """numpy scalars (what the search algorithms propose) as plain Python values."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def proposal_values(run_config: dict) -> dict[str, Any]:
    """``{"model.lambda_kd": {"value": 0.5}}`` -> ``{"model.lambda_kd": 0.5}``."""
    return {k: plain(v["value"]) for k, v in run_config.items()}


def propose(cfg: dict, runs: list, seed: int) -> dict[str, Any] | None:
    """The next run's parameters (``{name: value}``) by W&B's algorithm for ``cfg["method"]``, or None
    when a grid is exhausted. ``runs`` are ``sweeps.SweepRun`` of the runs so far (bayes learns from them);
    the draw is seeded so that a resumed sweep proposes what an uninterrupted one would."""
    sweeps = import_sweeps()
    np_state = _seed_numpy(seed)
    try:
        with warnings.catch_warnings():
            # bayes fits a Gaussian process on a handful of runs; its length-scale warnings are expected noise
            warnings.filterwarnings("ignore", module="sklearn")
            nxt = sweeps.next_run(cfg, runs, validate=True)
    finally:
        _restore_numpy(np_state)
    return None if nxt is None else proposal_values(nxt.config)


def _seed_numpy(seed: int):
    import numpy as np

    state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return state


def _restore_numpy(state) -> None:
    import numpy as np

    np.random.set_state(state[0])
    random.setstate(state[1])


# ----------------------------------------------------------------------------------------- command
def command_args(values: dict[str, Any]) -> dict[str, list[str]]:
    """The ``${args*}`` macro expansions exactly as the W&B agent formats them (``--name=value``, str(value))."""
    flags, no_hyphens, no_bool, no_equals = [], [], [], []
    for name, v in values.items():
        flag = f"{name}={v}"
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{name}", str(v)]
        if isinstance(v, bool):
            if v:
                no_bool.append("--" + name)
        else:
            no_bool.append("--" + flag)
    return {
        "args": flags, "args_no_hyphens": no_hyphens, "args_no_boolean_flags": no_bool, "args_no_equals": no_equals,
        "args_json": [json.dumps(values)],
        "args_append_hydra": ["+" + f for f in no_hyphens], "args_override_hydra": ["++" + f for f in no_hyphens],
    }


def expand_command(cfg: dict, values: dict[str, Any], interpreter: str | None = None) -> list[str]:
    """The sweep's ``command:`` for one run, W&B's macros expanded.

    ``${interpreter}`` is this Python (the agent uses ``python`` from PATH), ``${env}`` ``/usr/bin/env``
    (dropped where it does not exist, as the agent does on Windows), ``${program}`` the sweep's ``program:``.
    An unknown macro is an error here (the agent would silently drop it).
    """
    macros: dict[str, list[str]] = {
        "interpreter": [interpreter or sys.executable],
        "env": ["/usr/bin/env"] if Path("/usr/bin/env").exists() else [],
        **command_args(values),
    }
    if cfg.get("program"):
        macros["program"] = [str(cfg["program"])]
    out: list[str] = []
    for item in cfg["command"]:
        item = ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), str(item))
        if item.startswith("${") and item.endswith("}"):
            key = item[2:-1]
            if key not in macros:
                raise SystemExit(f"lesion-kd sweep: command: unknown macro {item} (known: "
                                 f"{', '.join('${' + k + '}' for k in sorted(macros))})")
            out += macros[key]
        else:
            out.append(item)
    return out


def swap_profile(command: list[str], profile: str) -> list[str]:
    """Replace the command's profile config (``--config .../profile/NAME.yaml``) by ``profile`` (a name in
    experiments/profile/ or a file)."""
    new = profile if Path(profile).is_file() else str(Path("experiments") / "profile" / f"{profile}.yaml")
    if not Path(new).is_file() and not (REPO / new).is_file():
        raise SystemExit(f"lesion-kd sweep: --profile {profile}: neither a file nor experiments/profile/{profile}.yaml")
    out, swapped = list(command), False
    for i, a in enumerate(out[:-1]):
        if a == "--config" and Path(out[i + 1]).parent.name == "profile":
            out[i + 1], swapped = new, True
    if not swapped:
        raise SystemExit(f"lesion-kd sweep: --profile {profile}: the sweep's command has no "
                         "--config .../profile/*.yaml to swap")
    return out


def run_env() -> dict[str, str]:
    """Environment of a local run: offline W&B unless WANDB_MODE says otherwise, this Python's scripts first
    on PATH (so that ``lesion-kd`` in a command is the one of this installation)."""
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # not a W&B agent's run
        env.pop(k, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# ----------------------------------------------------------------------------------------- results
def read_metric_history(run_root: Path, name: str) -> list[float]:
    """Values of metric ``name`` in the newest ``metrics.csv`` under ``run_root`` (Lightning's CSV logger)."""
    files = sorted(run_root.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with files[-1].open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        v = row.get(name, "")
        if v not in ("", None):
            x = float(v)
            if math.isfinite(x):
                out.append(x)
    return out


def read_test_dice(run_root: Path) -> float | None:
    files = sorted(run_root.glob("lightning_logs/version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return float(json.loads(files[-1].read_text())["dice"]["mean"]) if files else None


def best(values: list[float], goal: str) -> float | None:
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def collect(out: Path) -> list[dict]:
    """One record per run directory in ``out``: proposal + result (if finished), in run order."""
    records = []
    for d in sorted(out.glob("run-*")):
        if not (d / "proposal.json").is_file():
            continue
        rec = json.loads((d / "proposal.json").read_text())
        rec["dir"] = d
        if (d / "result.json").is_file():
            rec["result"] = json.loads((d / "result.json").read_text())
        records.append(rec)
    return records


def sweep_runs(records: list[dict], cfg: dict) -> list:
    """The finished/failed runs as ``sweeps.SweepRun`` with their metric history (what bayes learns from)."""
    sweeps = import_sweeps()
    metric = (cfg.get("metric") or {}).get("name", "val/dice")
    runs = []
    for rec in records:
        res = rec.get("result")
        if res is None:
            continue
        runs.append(sweeps.SweepRun(
            name=rec["run"], state=res["state"],
            config={k: {"value": v} for k, v in rec["values"].items()},
            history=[{metric: v} for v in res.get("metric_history", [])],
        ))
    return runs


def write_tables(out: Path, cfg: dict, records: list[dict]) -> tuple[Path, Path]:
    """``sweep_results.csv`` and ``.md``: one row per run (parameters, best metric, test Dice)."""
    metric = (cfg.get("metric") or {}).get("name", "val/dice")
    goal = (cfg.get("metric") or {}).get("goal", "maximize")
    params = list((cfg.get("parameters") or {}).keys())
    metric_cols = [f"{metric} (best)"] + (["val/dice (best)"] if metric != "val/dice" else [])
    header = ["run", "state", *params, *metric_cols, "test/dice", "seconds", "run_dir"]
    rows = []
    for rec in records:
        res = rec.get("result") or {}
        row = {"run": rec["run"], "state": res.get("state", "interrupted"), "run_dir": str(rec["dir"])}
        row.update({p: rec["values"].get(p, "") for p in params})
        row[f"{metric} (best)"] = res.get("metric_best")
        if metric != "val/dice":
            row["val/dice (best)"] = res.get("val_dice_best")
        row["test/dice"] = res.get("test_dice")
        row["seconds"] = res.get("seconds")
        rows.append(row)

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row.get(k) for k in header})
    csv_path = out / "sweep_results.csv"
    atomic_write_text(csv_path, buf.getvalue())

    def fmt(v: Any) -> str:
        if v is None or v == "":
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    key = f"{metric} (best)"
    scored = [r for r in rows if isinstance(r.get(key), (int, float))]
    top = (max if goal == "maximize" else min)(scored, key=lambda r: r[key]) if scored else None
    md_cols = [c for c in header if c != "run_dir"]
    lines = [f"# Sweep {cfg.get('name', out.name)} ({cfg['method']}, {goal} {metric})", ""]
    if top is not None:
        lines += [f"Best: {top['run']} with {key} = {fmt(top[key])}.", ""]
    lines += ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for r in rows:
        cells = [fmt(r.get(c)) for c in md_cols]
        if r is top:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    md_path = out / "sweep_results.md"
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


# --------------------------------------------------------------------------------------------- run
PROGRESS_FILE_ENV = "LESION_KD_PROGRESS_FILE"  # lesion_kd.callbacks.PROGRESS_FILE_ENV (not imported: Lightning)
POLL_SECONDS = 1.0


class RunProgress:
    """A run's progress on the console while it runs, from the JSON file its ``ProgressFile`` callback rewrites
    every few seconds (a command that is not ``lesion-kd fit`` writes none: elapsed time only).

    On a terminal, a progress bar (tqdm, on stderr): steps done of the run's total, elapsed and remaining time,
    the stage (starting, training, testing), the last training loss and validation Dice. Elsewhere (a log
    file), a line on stdout at every change of stage, every new validation Dice and every ``minutes``."""

    def __init__(self, name: str, path: Path, minutes: float = 5.0, tty: bool | None = None) -> None:
        self.name, self.path, self.minutes = name, path, minutes
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = self._last_line = time.monotonic()
        self._said: tuple | None = None
        self._doc: dict | None = None
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, desc=f"[sweep] {name}", unit="step", dynamic_ncols=True, leave=False)
            self.bar.set_postfix_str("starting", refresh=True)

    def read(self) -> dict | None:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def describe(self, doc: dict | None) -> str:
        minutes = (time.monotonic() - self.t0) / 60
        if doc is None:
            return f"[sweep] {self.name}: starting, {minutes:.1f} min"
        stage = {"train": "training", "trained": "trained", "test": "testing", "tested": "tested"}.get(
            doc.get("stage"), str(doc.get("stage")))
        step, total = int(doc.get("step", 0)), max(int(doc.get("total", 0)), 1)
        text = f"[sweep] {self.name}: {stage}, step {step}/{total} ({100 * step / total:.0f}%), {minutes:.1f} min"
        for key, label in (("loss", "loss"), ("val_dice", "val Dice")):
            if isinstance(doc.get(key), (int, float)):
                text += f", {label} {doc[key]:.4f}"
        return text

    def poll(self) -> str | None:
        """Update the bar, or return (and print) the line due now, if any."""
        doc = self._doc = self.read() or self._doc
        if self.bar is not None:
            if doc is not None:
                self.bar.total = max(int(doc.get("total", 0)), 1)
                self.bar.n = int(doc.get("step", 0))
                post = [{"train": "training", "test": "testing"}.get(doc.get("stage"), str(doc.get("stage")))]
                post += [f"{label} {doc[key]:.4f}" for key, label in (("loss", "loss"), ("val_dice", "val Dice"))
                         if isinstance(doc.get(key), (int, float))]
                self.bar.set_postfix_str(", ".join(post), refresh=False)
            self.bar.refresh()
            return None
        said = None if doc is None else (doc.get("stage"), doc.get("val_dice"))
        now = time.monotonic()
        if said != self._said or now - self._last_line >= 60 * self.minutes:
            self._said, self._last_line = said, now
            line = self.describe(doc)
            print(line, flush=True)
            return line
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_one(rec: dict, cfg: dict, env: dict[str, str], index: int, count: int) -> dict:
    """Run one proposal to completion; returns and writes its ``result.json``."""
    d: Path = rec["dir"]
    metric = (cfg.get("metric") or {}).get("name", "val/dice")
    goal = (cfg.get("metric") or {}).get("goal", "maximize")
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec["values"].items())
    print(f"[sweep] run {index}/{count} {rec['run']}: {shown}  (log: {d / 'output.log'})", flush=True)
    t0 = time.time()
    progress_file = d / "progress.json"
    progress_file.unlink(missing_ok=True)  # an interrupted earlier attempt's
    progress = RunProgress(rec["run"], progress_file)
    with (d / "output.log").open("w") as log:
        log.write("$ " + " ".join(rec["command"]) + "\n")
        log.flush()
        # the run's output goes to its log; its progress (lesion_kd.callbacks.ProgressFile) comes here
        proc = subprocess.Popen(rec["command"], stdout=log, stderr=subprocess.STDOUT,
                                env={**env, PROGRESS_FILE_ENV: str(progress_file)})
        try:
            while proc.poll() is None:
                progress.poll()
                time.sleep(POLL_SECONDS)
        except BaseException:  # as subprocess.run: an interrupted sweep does not leave its run behind
            proc.kill()
            proc.wait()
            raise
        finally:
            progress.close()
        rc = proc.returncode
    history = read_metric_history(d, metric)
    val_dice = history if metric == "val/dice" else read_metric_history(d, "val/dice")
    res = {
        "state": "finished" if rc == 0 else "failed", "returncode": rc, "seconds": round(time.time() - t0, 1),
        "metric": metric, "metric_history": history, "metric_best": best(history, goal),
        "val_dice_best": best(val_dice, "maximize"), "test_dice": read_test_dice(d),
    }
    atomic_write_text(d / "result.json", json.dumps(res, indent=1) + "\n")
    if rc != 0:
        tail = (d / "output.log").read_text().splitlines()[-15:]
        print(f"[sweep] {rec['run']} FAILED (exit {rc}) after {res['seconds']} s; last lines of its log:\n    "
              + "\n    ".join(tail), flush=True)
    else:
        shown_m = "n/a" if res["metric_best"] is None else f"{res['metric_best']:.4f}"
        print(f"[sweep] {rec['run']} done in {res['seconds']} s: best {metric} = {shown_m}", flush=True)
    return res


def main(argv: list[str]) -> int:
    p = parser("lesion-kd sweep", __doc__)
    p.add_argument("sweep_file", help="a W&B sweep config (experiments/sweeps/*.yaml)")
    p.add_argument("--count", type=int, required=True,
                   help="total number of runs the sweep should hold in OUT (finished runs found there count)")
    p.add_argument("--profile", default=None,
                   help="swap the command's profile config for this one (a name in experiments/profile/, e.g. "
                        "smoke, or a file): quick runs to check the machinery")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<sweep file name>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the proposals (run i draws with seed + i)")
    p.add_argument("--max_failures", type=int, default=3,
                   help="stop after this many failed runs in a row (a broken command fails every run)")
    p.add_argument("--dry_run", action="store_true", help="print the next proposals' command lines, run nothing")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count {args.count}: must be at least 1")

    cfg = load_sweep_config(args.sweep_file)
    out = Path(args.out or Path("runs") / "sweeps" / Path(args.sweep_file).stem)
    # a sweep directory belongs to one search space: mixing runs of two would mislead bayes and the table
    used = {k: cfg.get(k) for k in ("method", "metric", "parameters", "command")}
    saved = out / "sweep.yaml"
    if saved.is_file():
        before = yaml.safe_load(saved.read_text()) or {}
        if {k: before.get(k) for k in used} != used:
            raise SystemExit(f"lesion-kd sweep: {out} holds runs of a different sweep config ({saved}); "
                             "use another --out")
    elif not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, yaml.safe_dump(cfg, sort_keys=False))
    for i, a in enumerate(cfg["command"][:-1]):  # relative configs resolve against the working directory
        nxt = str(cfg["command"][i + 1])
        if a == "--config" and not nxt.startswith("${") and not Path(nxt).is_file():
            raise SystemExit(f"lesion-kd sweep: {args.sweep_file}: command config {nxt} not found from "
                             f"{Path.cwd()}; run from the repository root")
    env = run_env()
    program = [a for a in expand_command(cfg, {}) if a != "/usr/bin/env"][:1]
    if not program or shutil.which(program[0], path=env["PATH"]) is None:
        raise SystemExit(f"lesion-kd sweep: {args.sweep_file}: the command's program {program[:1]} is not on PATH "
                         f"(nor beside {sys.executable})")

    records = collect(out)
    n_done = sum(1 for r in records if "result" in r)
    n_failed = sum(1 for r in records if r.get("result", {}).get("state") == "failed")
    print(f"[sweep] {cfg.get('name', out.name)}: {cfg['method']} search, {n_done} run(s) done ({n_failed} failed) "
          f"in {out}, target {args.count}", flush=True)
    failures = 0
    for rec in records:  # an interrupted run (proposal, no result) is run again with the same parameters
        if "result" not in rec and not args.dry_run:
            rec["result"] = run_one(rec, cfg, env, records.index(rec) + 1, args.count)
            failures = failures + 1 if rec["result"]["state"] == "failed" else 0
            write_tables(out, cfg, records)

    index = len(records)
    while index < args.count:
        if failures >= args.max_failures:
            write_tables(out, cfg, records)
            raise SystemExit(f"lesion-kd sweep: {failures} runs failed in a row; see their output.log in {out}")
        values = propose(cfg, sweep_runs(records, cfg), args.seed + index)
        if values is None:
            print(f"[sweep] the grid is exhausted after {index} runs", flush=True)
            break
        index += 1
        name = f"run-{index:03d}"
        command = expand_command(cfg, values)
        if args.profile:
            command = swap_profile(command, args.profile)
        command += ["--trainer.default_root_dir", str(out / name)]
        if args.dry_run:
            print(" ".join(command))
            records.append({"run": name, "values": values, "command": command, "dir": out / name,
                            "result": {"state": "finished"}})  # feeds the next proposal; nothing written
            continue
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        rec = {"run": name, "values": values, "command": command, "seed": args.seed + index - 1}
        atomic_write_text(d / "proposal.json", json.dumps(rec, indent=1) + "\n")
        rec["dir"] = d
        records.append(rec)
        rec["result"] = run_one(rec, cfg, env, index, args.count)
        failures = failures + 1 if rec["result"]["state"] == "failed" else 0
        write_tables(out, cfg, records)
    if args.dry_run:
        return 0
    csv_path, md_path = write_tables(out, cfg, records)
    print(f"[sweep] results: {csv_path} and {md_path}", flush=True)
    return 0
