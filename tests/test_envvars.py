"""The RLHFKIT_* switches (`rlhfkit.envvars`): unset means the default, a listed value is taken
(case and spaces aside), any other value is one line naming the variable before a command runs."""

from __future__ import annotations

import pytest

from rlhfkit import envvars


@pytest.mark.parametrize("name", sorted(envvars.CHOICES))
def test_unset_or_empty_is_the_default_and_listed_values_are_taken(name, monkeypatch):
    monkeypatch.delenv(name, raising=False)
    assert envvars.setting(name) == envvars.CHOICES[name][0]
    monkeypatch.setenv(name, "")
    assert envvars.setting(name) == envvars.CHOICES[name][0]
    for value in envvars.CHOICES[name]:
        monkeypatch.setenv(name, f" {value.upper()} ")
        assert envvars.setting(name) == value


def test_another_value_is_an_error_naming_the_variable(monkeypatch, capsys):
    """RLHFKIT_DECODE_GEMV=yes used to leave the timed kernel choice in place, silently."""
    from rlhfkit.cli import main
    from rlhfkit.rollout import cpu_gemv

    monkeypatch.setenv("RLHFKIT_DECODE_GEMV", "yes")
    with pytest.raises(ValueError, match=r"RLHFKIT_DECODE_GEMV='yes': must be one of auto, 1, 0 \(unset means auto\)"):
        cpu_gemv.setting()
    assert main(["grpo", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == ("rlhfkit grpo: error: environment variable RLHFKIT_DECODE_GEMV='yes': must be "
                                    "one of auto, 1, 0 (unset means auto)")


@pytest.mark.parametrize("name, value, message", [
    ("RLHFKIT_LOG", "verbose",
     "environment variable RLHFKIT_LOG='verbose': must be one of DEBUG, INFO, WARNING, ERROR"),
    ("RLHFKIT_DEBUG", "no", "environment variable RLHFKIT_DEBUG='no': must be one of 0, 1 (unset means 0)"),
    ("WORLD_SIZE", "two", "environment variable WORLD_SIZE='two': must be a whole number (torchrun sets it)"),
])
def test_the_log_level_debug_switch_and_launcher_sizes_are_checked_too(name, value, message, monkeypatch, capsys):
    """RLHFKIT_LOG=verbose failed inside logging ("Unknown level"), RLHFKIT_DEBUG=no turned
    tracebacks on, WORLD_SIZE=two failed in int(): each is one line naming the variable."""
    from rlhfkit.cli import main

    monkeypatch.setenv(name, value)
    assert main(["grpo", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == f"rlhfkit grpo: error: {message}"
    monkeypatch.setenv(name, "info" if name == "RLHFKIT_LOG" else "1" if name != "RLHFKIT_DEBUG" else "0")
    assert main(["grpo", "--print-config"]) == 0



def test_no_module_reads_a_switch_when_it_is_imported():
    """Every rlhfkit module imports with every switch set to a value it does not take: a switch is
    read where it is used, after the command line has checked it (`envvars.check`), so a bad value
    is its one line. RLHFKIT_FINAL_LAYER=x was a 42-line traceback from an import."""
    import os
    import subprocess
    import sys

    code = ("import importlib, pkgutil, rlhfkit\n"
            "for m in pkgutil.walk_packages(rlhfkit.__path__, 'rlhfkit.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('imported')\n")
    env = {**os.environ, **{name: "x" for name in envvars.CHOICES}}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]
