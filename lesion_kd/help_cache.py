"""``lesion-kd fit --help`` (and validate/test/predict) from a cache: the help text without importing Lightning.

LightningCLI builds the help from the signatures and docstrings of the trainer, the methods and the data
module, so it needs Lightning imported, and importing Lightning (torch, torch._dynamo, torchmetrics, which
imports torchvision, scipy.signal and matplotlib eagerly: Lightning-AI/torchmetrics#3457) takes most of the
~10 s a bare ``lesion-kd fit --help`` costs on a busy 2-core machine (benchmarks/README.md, "Start-up").
The text only changes when the code does, so the first ``lesion-kd <command> --help`` writes it to
``$LESION_KD_CACHE/help/`` (default ``~/.cache/lesion_kd/help/``) and the next ones print it from there.

A cached text is used only for exactly ``lesion-kd <command> --help`` (or ``-h``: with any other argument,
a ``--config`` say, the help is built as usual) and only while everything it depends on is as it was: the
command line and the program's name, the interpreter, every source file of lesion_kd (path, size and
modification time) and the installed Lightning, jsonargparse, torch and torchmetrics (their package files' size
and modification time). ``LESION_KD_HELP_CACHE=0`` turns it off.

These texts are wrapped at ``HELP_COLUMNS`` (80) whatever the terminal's width, so that one text serves every
terminal, and ``make install`` (so ``make test`` and ``make demo`` too) builds them ahead
(``python -m lesion_kd.commands.help_texts``): even the first ``lesion-kd fit --help`` after an install or a change of
the code prints without importing Lightning, whose import alone takes 6-8 s on a busy 2-core machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

ENV = "LESION_KD_HELP_CACHE"
# the packages whose code makes the help text: their signatures, docstrings and the help formatter
PACKAGES = ("lightning", "jsonargparse", "torch", "torchmetrics", "docstring_parser")
PACKAGE_ROOT = Path(__file__).resolve().parent
VERSION = 2  # of the key's recipe (2: fixed width, no terminal width in the key)
HELP_COLUMNS = 80  # the width every cached help is wrapped to (argparse reads $COLUMNS)
COMMANDS = ("fit", "validate", "test", "predict")


def cacheable(argv: list[str]) -> bool:
    return len(argv) == 2 and argv[1] in ("--help", "-h") and os.environ.get(ENV, "1") not in ("0", "")


def cache_dir() -> Path:
    # lesion_kd.data.prep.cache_root's rule (not imported: that module loads numpy and Pillow)
    return Path(os.environ.get("LESION_KD_CACHE") or Path.home() / ".cache" / "lesion_kd").expanduser() / "help"


def source_fingerprint(root: Path = PACKAGE_ROOT) -> list:
    """(relative path, size, mtime_ns) of every Python file under ``root``, sorted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        out.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def package_fingerprint(names=PACKAGES) -> list:
    """(name, file, size, mtime_ns) of each package's ``__init__.py`` (a reinstall rewrites it), found without
    importing the package; a package that is not installed is (name, None)."""
    import importlib.util

    out: list = []
    for name in names:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin and os.path.exists(origin):
            st = os.stat(origin)
            out.append((name, origin, st.st_size, st.st_mtime_ns))
        else:
            out.append((name, None))
    return out


def key(argv: list[str], root: Path = PACKAGE_ROOT) -> str:
    # the program name heads the usage line: `lesion-kd`, or `cli.py` under `python -m lesion_kd.cli`
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parts = [VERSION, argv, prog, sys.version, sys.executable, source_fingerprint(root), package_fingerprint()]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


def cached(argv: list[str]) -> str | None:
    """The cached help text of this command line, or None."""
    if not cacheable(argv):
        return None
    path = cache_dir() / f"{argv[0]}-{key(argv)}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class _Tee(io.TextIOBase):
    def __init__(self, out) -> None:
        self.out, self.seen = out, io.StringIO()

    def write(self, s: str) -> int:
        self.seen.write(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def run_and_keep(argv: list[str], run) -> int:
    """``run()`` (the Lightning command), keeping what it prints on stdout as the help of ``argv`` when it ends
    as a help does (SystemExit with status 0). Nothing is kept for any other command line."""
    if not cacheable(argv):
        return run()
    real, tee = sys.stdout, _Tee(sys.stdout)
    sys.stdout = tee
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # one width for every terminal: the text is not keyed by it
    try:
        return run()
    except SystemExit as stop:
        text = tee.seen.getvalue()
        if stop.code in (0, None) and text:
            try:
                store(argv, text)
            except OSError:
                pass  # a read-only or full cache folder: the help was printed, nothing else matters
        raise
    finally:
        sys.stdout = real
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def store(argv: list[str], text: str) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{argv[0]}-*.txt"):  # the texts of earlier code: never read again
        old.unlink(missing_ok=True)
    path = folder / f"{argv[0]}-{key(argv)}.txt"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
