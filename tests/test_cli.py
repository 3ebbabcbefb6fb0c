"""The `loraloop` command as a whole: every verb is registered and the module form works."""

import subprocess
import sys

from click.testing import CliRunner

from loraloop.cli import cli


def test_every_verb_is_registered():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("run", "serve", "imagine", "bot", "db", "dataset", "train", "compare", "adapters"):
        assert f"\n  {verb} " in result.output, verb


def test_python_dash_m_loraloop_is_the_same_command():
    # `accelerate launch -m loraloop train ...` relies on this form.
    result = subprocess.run([sys.executable, "-m", "loraloop", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m loraloop" in result.stdout


def test_run_without_a_discord_token_says_how_to_get_one_and_how_to_try_without(monkeypatch):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 1
    assert "DISCORD_TOKEN is not set" in result.output
    assert "loraloop serve --model tiny" in result.output
