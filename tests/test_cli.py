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


@pytest.fixture
def fake_command(monkeypatch):
    """A subcommand ``fake`` whose run raises the exception the test puts in ``raised``."""
    import sys
    import types

    raised: list[BaseException] = []
    module = types.ModuleType("fake_hdopt_command")
    module.configure = lambda parser: None

    def run(args):
        raise raised[0]

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr("hdopt.cli.SUBCOMMANDS", [("fake", "raises", module.__name__)])
    return raised


def test_user_errors_are_one_line_and_exit_2(fake_command, capsys):
    import yaml

    from hdopt.lm.models import ModelLoadError

    for err in (ValueError("bad\nvalue"), FileNotFoundError("no such file"), ModelLoadError("no model"),
                yaml.YAMLError("bad yaml"), SystemExit("hdopt fake: a message")):  # fmt: skip
        fake_command[:] = [err]
        assert main(["fake"]) == 2
        err_text = capsys.readouterr().err
        assert err_text.count("\n") == 1 and "Traceback" not in err_text
    assert err_text == "hdopt fake: a message\n"


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(fake_command, capsys):
    for bug in (KeyError("k"), TypeError("t"), RuntimeError("r"), AssertionError("a")):
        fake_command[:] = [bug]
        with pytest.raises(type(bug)):
            main(["fake"])
    fake_command[:] = [ValueError("bad value")]
    with pytest.raises(ValueError, match="bad value"):
        main(["--debug", "fake"])
    fake_command[:] = [SystemExit(3)]  # a plain exit status passes through
    with pytest.raises(SystemExit) as exit_info:
        main(["fake"])
    assert exit_info.value.code == 3
    fake_command[:] = [KeyboardInterrupt()]
    assert main(["fake"]) == 130
