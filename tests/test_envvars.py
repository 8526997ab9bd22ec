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
