"""The `loraloop` command as a whole: every verb is registered and the module form works."""

import subprocess
import sys

from click.testing import CliRunner

from loraloop.cli import cli


def test_every_verb_is_registered():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("run", "serve", "imagine", "bot", "db", "dataset", "train", "compare", "adapters", "console"):
        assert f"\n  {verb} " in result.output, verb


def test_python_dash_m_loraloop_is_the_same_command():
    # `accelerate launch -m loraloop train ...` relies on this form.
    result = subprocess.run([sys.executable, "-m", "loraloop", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m loraloop" in result.stdout


def test_run_refuses_a_public_console_without_an_admin_token(tmp_path, monkeypatch):
    monkeypatch.delenv("LORALOOP_CONSOLE_TOKEN", raising=False)
    (tmp_path / "config.toml").write_text('[console]\nhost = "0.0.0.0"\n')
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "config.toml"), "run"])
    assert result.exit_code == 1
    assert "without LORALOOP_CONSOLE_TOKEN" in result.output
