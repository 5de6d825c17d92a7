"""The ``lesion-kd`` command: LightningCLI's fit/validate/test/predict plus the suite's own subcommands.

Kept thin: every option lives on the data module, the method or the trainer, where LightningCLI and
jsonargparse type-check it and take its help text from the docstrings.
"""

from __future__ import annotations

import sys
from pathlib import Path

LIGHTNING_COMMANDS = {
    "fit": "train a method (then test its best checkpoint, unless --test_after_fit false)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split and write metrics.json",
    "predict": "write masks and overlays for a split or any folder of images (--data.predict_input)",
}
SUITE_COMMANDS: dict[str, tuple[str, str]] = {
    "cache-teacher": ("lesion_kd.commands.cache_teacher:main", "fill the teacher's embedding cache for a dataset"),
    "data": ("lesion_kd.commands.data:main", "download and prepare public datasets, MSD tasks"),
    "sweep": ("lesion_kd.commands.sweep:main", "run a W&B sweep file locally (no W&B server): propose, run, tabulate"),
    "export": ("lesion_kd.commands.export:main", "export a checkpoint's student to ONNX or TorchScript, verified against PyTorch"),
    "reproduce-table": ("lesion_kd.commands.reproduce:main",
                        "run every unfinished cell of a manifest, then the comparison/ablation/efficiency tables and report"),
    "segment": ("lesion_kd.commands.segment:main", "masks, overlays and segments.csv for a folder of images (a shipped student by name, ONNX, TorchScript, .ckpt)"),
    "demo": ("lesion_kd.commands.demo:main",
             "the method against its supervised student on Kvasir-SEG in minutes: cache, train both, paired test, overlay"),
    "compare": ("lesion_kd.commands.compare:main",
                "paired test of two models on the same test images: Dice/HD95 difference, 95% CI, Wilcoxon p"),
}

HELP = """usage: lesion-kd COMMAND [options]

Semi-supervised 2D lesion segmentation: a frozen MedSAM teacher distilled into a Mamba student, and the
baselines it is compared with.

commands:
{commands}

Every run composes configs: lesion-kd fit --config experiments/data/kvasir-seg.yaml \\
    --config experiments/method/supervised.yaml --config experiments/profile/smoke.yaml
'lesion-kd COMMAND --help' lists every option of a command with its help text.
"""


def _config_args(path: str, seen: tuple[str, ...] = ()) -> list[str]:
    """``--config`` arguments for one config file, with its ``compose:`` list expanded first.

    An experiment file composes data, method and profile configs (paths relative to the file, or to the
    working directory) and may override any option after them::

        compose: [../data/kvasir-seg.yaml, ../method/supervised.yaml, ../profile/cpu.yaml]
        data: {labeled_fraction: 0.2}
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        return ["--config", path]  # jsonargparse reports the missing file (or parses an inline YAML string)
    doc = load_yaml(p) or {}
    if not isinstance(doc, dict) or "compose" not in doc:
        return ["--config", path]
    if str(p.resolve()) in seen:
        raise SystemExit(f"lesion-kd: {path}: compose: includes itself")
    out: list[str] = []
    for item in doc.pop("compose") or []:
        cand = p.parent / item if (p.parent / item).is_file() else Path(item)
        if not cand.is_file():
            raise SystemExit(f"lesion-kd: {path}: compose: {item} not found (relative to {p.parent} or the working directory)")
        out += _config_args(str(cand), (*seen, str(p.resolve())))
    if doc:
        out += ["--config", yaml.safe_dump(doc)]
    return out


_YAML_READ: dict[tuple[str, int, int], object] = {}


def load_yaml(path: Path):
    """A YAML file's content; malformed YAML is a :class:`UserInputError` naming the file, line and column.

    Each file is read and parsed once per command (``expand_configs`` and ``check_method_name`` both read the
    --config files); every call returns its own copy."""
    import copy

    import yaml

    from .errors import UserInputError

    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _YAML_READ:
        return copy.deepcopy(_YAML_READ[key])
    try:
        doc = _YAML_READ[key] = yaml.safe_load(path.read_text())
        return copy.deepcopy(doc)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise UserInputError(f"{where}: not valid YAML: {what}") from None


def expand_configs(argv: list[str]) -> list[str]:
    """Replace every ``--config FILE`` whose YAML has a ``compose:`` list by the configs it composes."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += _config_args(argv[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            out += _config_args(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    return out


SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended


def _model_choice(args: list[str]) -> str | None:
    """The method class a command line selects (``--model X`` or a config's ``model: {class_path: X}``; the
    last one wins, as in jsonargparse), when it is given as a name; None if none or not a plain name."""
    import yaml

    choice = None
    for i, a in enumerate(args):
        value = None
        if a in ("--model", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(("--model=", "--config=")):
            value = a.split("=", 1)[1]
        if value is None:
            continue
        if a.startswith("--model") and not value.lstrip().startswith(("{", "class_path")) and not Path(value).is_file():
            choice = value.strip()
            continue
        doc = load_yaml(Path(value)) if Path(value).is_file() else None
        if doc is None and not Path(value).is_file():
            try:
                doc = yaml.safe_load(value)  # an inline YAML string
            except yaml.YAMLError:
                doc = None
        if a.startswith("--model"):
            doc = {"model": doc}
        model = doc.get("model") if isinstance(doc, dict) else None
        if isinstance(model, str):
            choice = model
        elif isinstance(model, dict) and isinstance(model.get("class_path"), str):
            choice = model["class_path"]
    return choice


def check_method_name(args: list[str]) -> None:
    """An unknown method name is refused naming the available methods and the closest one (jsonargparse
    would print its whole usage and "Expected a dot import path string"). A dotted path outside
    ``lesion_kd`` (a user's own method class) is left to jsonargparse."""
    import difflib

    from .errors import UserInputError

    choice = _model_choice(args)
    if not choice or ("." in choice and not choice.startswith("lesion_kd.")):
        return
    from . import methods

    names = sorted(n for n in methods.__all__ if isinstance(getattr(methods, n), type)
                   and issubclass(getattr(methods, n), methods.SegmentationModule) and n != "SegmentationModule")
    name = choice.rsplit(".", 1)[-1]
    if name in names:
        return
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.5)
    hint = f"; did you mean {lower[close[0]]!r}?" if close else ""
    raise UserInputError(f"--model {choice}: no such method{hint} Available methods: {', '.join(names)} "
                         f"(each with its config in experiments/method/)")


def run_lightning(args: list[str] | None) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .lightning_cli import run_lightning as _run  # Lightning and the training code load only here

    check_method_name(args or [])

    finished = False
    try:
        _run(args)
        finished = True
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit without a code, i.e. exit status 0: a preempted run
        # (checkpoint saved, not finished) would look done to a scheduler or a `&&` chain
        return SIGTERM_EXIT
    finally:
        shutdown_distributed(synchronize=finished)
    return 0


def shutdown_distributed(synchronize: bool) -> None:
    """Destroy the DDP process group while the interpreter is fully alive.

    Lightning leaves it to an ``atexit`` handler; under gloo a rank whose worker threads still hold work from the
    last collective (the test metrics' gather) can then abort at interpreter teardown ("terminate called without
    an active exception", exit status -6) after a run that finished and wrote its results (pytorch#190489). A
    finished run first waits at a barrier, so no rank tears down while another still talks to it; a failed one
    does not (its peers may be gone) and only destroys its own group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def _call(target: str, args: list[str]):
    import importlib

    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"  {k:<15} {v}" for k, v in LIGHTNING_COMMANDS.items()]
        lines += [f"  {k:<15} {v[1]}" for k, v in SUITE_COMMANDS.items()]
        print(HELP.format(commands="\n".join(lines)))
        return 0
    if argv[0] in SUITE_COMMANDS:
        return report_user_errors(argv[0], lambda: int(_call(SUITE_COMMANDS[argv[0]][0], argv[1:]) or 0))
    if argv[0] not in LIGHTNING_COMMANDS:
        print(f"lesion-kd: unknown command {argv[0]!r}; run 'lesion-kd --help' for the list", file=sys.stderr)
        return 2
    from .help_cache import cached, run_and_keep

    text = cached(argv)  # `lesion-kd fit --help` as printed before, while the code is the same: no Lightning import
    if text is not None:
        sys.stdout.write(text)
        return 0
    import logging
    import warnings

    # we always hand LightningCLI the (expanded) arguments; its warning about sys.argv also being set is moot
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # a mid-epoch resume is exact here without a resumable data loader: the training samplers place every stream
    # from the trainer's batch count (lesion_kd/data/sampling.py; tests/test_resume.py), so Lightning's warning
    # that it "can cause unreliable results" does not apply
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning's own call of a torch API that torch 2.14 deprecates: nothing a user can act on
    warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)` is deprecated")
    # Lightning's advertisement of its cloud services (litlogger, litmodels) on every run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(drop_lightning_tips)
    return report_user_errors(argv[0], lambda: run_and_keep(argv, lambda: run_lightning(expand_configs(argv))))


LIGHTNING_TIPS = ("💡 Tip: For seamless cloud logging", "💡 Tip: For seamless cloud uploads")


def drop_lightning_tips(record) -> bool:
    """A logging filter: False for Lightning's tips to install litlogger / litmodels (logged at INFO on every
    run by ``lightning.pytorch.utilities.rank_zero``), True for every other record."""
    return not str(record.msg).startswith(LIGHTNING_TIPS)


def report_user_errors(command: str, run) -> int:
    """Run ``run()``; a user error (bad data or option, ``errors.is_user_error``) is one message on stderr and
    exit status 2, its traceback only with ``LESION_KD_DEBUG=1``. Bugs keep their traceback."""
    import os

    from .errors import DEBUG_ENV, find_user_error

    try:
        return run()
    except Exception as e:
        user = find_user_error(e)
        if user is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"lesion-kd {command}: error: {user}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
