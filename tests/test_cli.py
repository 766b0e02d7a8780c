import importlib

import pytest

from hdopt import __version__
from hdopt.cli import SUBCOMMANDS, build_parser, main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hdopt {__version__}"
    assert main([]) == 2  # no command: help, and a usage exit code
    help_text = capsys.readouterr().out
    for name, _, _ in SUBCOMMANDS:
        assert name in help_text


@pytest.mark.parametrize("name,module", [(n, m) for n, _, m in SUBCOMMANDS])
def test_every_subcommand_module_implements_the_contract(name, module):
    mod = importlib.import_module(module)
    assert callable(mod.configure) and callable(mod.run), module
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([name, "--help"])
    assert exit_info.value.code == 0


def test_subcommand_names_are_unique():
    names = [n for n, _, _ in SUBCOMMANDS]
    assert len(names) == len(set(names))
