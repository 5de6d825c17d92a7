"""The suite's own subcommands (beside LightningCLI's fit/validate/test/predict).

Only ``argparse`` here: ``lesion_kd.commands.segment`` must import without torch.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` of the suite's commands: the module docstring kept as written (its line breaks and examples),
    and each option's default appended where it has one worth showing (not None, empty, or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", []) or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows a command module's docstring: its first paragraph above the
    options (whole, however many lines it takes), the rest below them."""
    intro, _, rest = (doc or "").strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=intro or None, epilog=rest or None,
                                   formatter_class=HelpFormatter)
