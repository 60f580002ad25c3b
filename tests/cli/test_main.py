"""The `smelt` Typer app: the shared preamble refuses a bad config before any work, help explains,
and every printed table comes from cli/render.py."""
from typer.testing import CliRunner

from cli.main import app
from models.settings import load_settings


def test_cli_refuses_bad_config_before_any_work(smelt_home):
    result = CliRunner().invoke(app, ["run", "train.batch_size=0"])
    assert result.exit_code == 2
    assert "train.batch_size = 0" in result.output
    assert not (smelt_home / "datasets").exists() or not any((smelt_home / "datasets").iterdir())


def test_cli_help_explains_commands():
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output and "overrides" in result.output.lower()


def test_show_config_prints_the_validated_preset():
    result = CliRunner().invoke(app, ["show-config", "train.steps=7"])
    assert result.exit_code == 0 and "preset: tiny-cpu" in result.output and "steps: 7" in result.output


def test_the_work_pool_default_comes_from_the_settings(monkeypatch):
    from tasks.config import OrchestrationConfig

    monkeypatch.setenv("SMELT_WORK_POOL", "pool-from-env")
    assert load_settings().work_pool == "pool-from-env" == OrchestrationConfig().work_pool
    monkeypatch.delenv("SMELT_WORK_POOL")
    assert OrchestrationConfig().work_pool == "smelt-local"
