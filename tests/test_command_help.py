"""``--help`` of the suite's own commands: the module docstring's whole first paragraph, examples, real defaults."""

from __future__ import annotations

import importlib

import pytest

from lesion_kd.commands import parser

COMMANDS = ["lesion_kd.commands.reproduce", "lesion_kd.commands.compare", "lesion_kd.commands.export",
            "lesion_kd.commands.segment", "lesion_kd.commands.sweep"]


def help_text(module: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_the_whole_first_paragraph_and_only_real_defaults(module, capsys):
    out = help_text(module, capsys)
    doc = importlib.import_module(module).__doc__
    intro = doc.strip().split("\n\n")[0]
    assert intro in out, "the description is the docstring's whole first paragraph, line breaks kept"
    assert "default: None" not in out and "default: False" not in out and "(default: )" not in out


def test_help_keeps_the_examples_below_the_options_and_shows_numeric_defaults(capsys):
    out = help_text("lesion_kd.commands.reproduce", capsys)
    head, _, rest = out.partition("\noptions:")
    options, _, epilog = rest.rpartition("--dry-run")  # the last option's line
    assert "comparison table, the ablation table" in head  # the intro's second line, above the options
    assert "lesion-kd reproduce-table --profile paper --gpus 0,1,2,3" in epilog  # examples as written, below
    assert "(default: 1)" in options and "(default: smoke)" in options


def test_parser_without_a_second_paragraph_has_no_epilog():
    p = parser("x", "One line.\n")
    assert p.description == "One line." and p.epilog is None
    p.add_argument("--n", type=int, default=3, help="a number")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--name", default=None, help="a name")
    text = p.format_help()
    assert "a number (default: 3)" in text and "a flag\n" in text and "a name\n" in text
