"""``charles``: every subcommand answers --help, and ``charles config show`` prints the resolved configuration."""

from __future__ import annotations

import subprocess
import sys

import pytest

from charles.cli import COMMANDS, help_text, main, usage


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and len(out.splitlines()) >= 3, out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_the_real_program_and_shows_no_rest_markup(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: charles {name}"), out.splitlines()[0]
    assert "``" not in out and ":mod:" not in out and ":func:" not in out, out


def test_help_text_drops_rest_markup():
    doc = "``charles up`` runs :mod:`charles.launcher` (:func:`~charles.launcher.plan`).\n\nThreads::\n"
    assert help_text(doc) == "charles up runs charles.launcher (charles.launcher.plan).\n\nThreads:\n"


def test_version_names_the_package_and_the_checkout(capsys):
    from charles.version import git_describe, package_version

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"charles {package_version()}") and package_version() != "unknown"
    if git_describe():
        assert out.endswith(f"({git_describe()})")


def test_usage_lists_every_command_and_unknown_ones_are_refused(capsys):
    text = usage()
    assert all(f"  {name} " in text for name in COMMANDS)
    assert main(["teleport"]) == 2
    assert "unknown command 'teleport'" in capsys.readouterr().err


def test_config_show_prints_the_resolved_configuration_with_help():
    """A real process, as a user runs it: a --set override and an environment variable both show."""
    env = {"CHARLES__BROKER__SNAPSHOT_HWM": "7", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "charles.cli", "config", "show", "--set", "model.preset=model_0012_regnet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "model_0012_regnet" in out and "snapshot_hwm" in out
    line = next(x for x in out.splitlines() if "snapshot_hwm" in x)
    assert "7" in line
    assert "per topic family" in out  # every field explained: the knob's help is printed
