"""``python -m lesion_kd.commands.help_texts``: build the help of ``lesion-kd fit/validate/test/predict --help`` ahead.

``make install`` runs it (so ``make test`` and ``make demo`` do too): it builds, in one process and one Lightning
import, the help texts that are missing or stale in the help cache (``lesion_kd.help_cache``), so that even the
first ``lesion-kd fit --help`` after an install or a change of the code prints without importing Lightning. A
no-op (about 0.1 s) while the code is unchanged.
"""

from __future__ import annotations

import io
import sys

from ..cli import main
from ..help_cache import COMMANDS, cache_dir, cacheable, cached


def warm(commands=COMMANDS, prog: str = "lesion-kd") -> list[str]:
    """Build and keep the help of ``lesion-kd <command> --help`` for each command whose cached text is missing or
    stale (one Lightning import for all of them); returns the commands built. ``make install`` runs it."""
    argv0 = sys.argv[0] if sys.argv else ""
    sys.argv[:1] = [prog]  # the key and the usage line name the program as the console script does
    try:
        stale = [c for c in commands if cached([c, "--help"]) is None] if cacheable(["fit", "--help"]) else []
        for command in stale:
            real, sys.stdout = sys.stdout, io.StringIO()
            try:
                main([command, "--help"])
            except SystemExit as stop:
                if stop.code not in (0, None):
                    raise RuntimeError(f"lesion-kd {command} --help failed (exit {stop.code})") from None
            finally:
                sys.stdout = real
    finally:
        if sys.argv:
            sys.argv[0] = argv0
    return stale


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    built = warm()
    if built:
        print(f"lesion-kd: help of {', '.join(built)} built in {time.perf_counter() - t0:.1f} s and kept in "
              f"{cache_dir()} (`lesion-kd <command> --help` prints it without importing Lightning)")
