"""The Dockerfile and compose.yaml parse, and every command they run exists in the project.

No Docker engine runs here, so this checks what can be checked without one: structure,
the non-root user, the volume, the health check, and that `loraloop ...` commands resolve.
"""

import json
import shlex
from pathlib import Path

import click
import yaml
from dockerfile_parse import DockerfileParser

from loraloop.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def instructions() -> list[dict]:
    return [i for i in dockerfile().structure if i["instruction"] != "COMMENT"]


def resolves_to_a_command(argv: list[str]) -> bool:
    """Whether `loraloop ARGS` names a real subcommand and every option it passes is accepted."""
    assert argv[0] == "loraloop", argv
    command: click.Command = cli
    args = list(argv[1:])
    with click.Context(cli) as context:
        while isinstance(command, click.Group):
            if not args:
                return False
            sub = command.get_command(context, args.pop(0))
            if sub is None:
                return False
            command = sub
        try:
            command.make_context(command.name, args, parent=context)
        except click.UsageError:
            return False
    return True


def test_the_dockerfile_runs_the_service_as_a_non_root_user_with_a_data_volume():
    names = [i["instruction"] for i in instructions()]
    assert names[0] == "FROM" and "cuda" in dockerfile().baseimage
    assert {"USER", "VOLUME", "HEALTHCHECK"} <= set(names)
    users = [i["value"] for i in instructions() if i["instruction"] == "USER"]
    assert users[-1] not in ("root", "0")
    health = next(i["value"] for i in instructions() if i["instruction"] == "HEALTHCHECK")
    assert "/healthz" in health


def test_the_dockerfile_command_exists_in_the_project():
    cmd = next(i["value"] for i in reversed(instructions()) if i["instruction"] == "CMD")
    argv = json.loads(cmd)
    assert resolves_to_a_command(argv)


def test_the_dockerfile_copies_every_package_the_distribution_installs():
    copied = " ".join(i["value"] for i in instructions() if i["instruction"] == "COPY")
    for package in ("loraloop", "generation", "bot", "training", "console"):
        assert package in copied


def test_compose_runs_the_service_on_a_gpu_and_the_bot_sharing_the_data_volume():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service, bot = compose["services"]["service"], compose["services"]["bot"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/data") for v in service["volumes"])
    assert service["volumes"] == bot["volumes"]
    assert set(compose["volumes"]) == {v.split(":")[0] for v in service["volumes"]}


def loraloop_services(compose: dict) -> dict:
    """The services that run loraloop itself (the ray profile's head and workers run `ray start`)."""
    return {name: service for name, service in compose["services"].items() if "ray" not in service.get("profiles", ())}


def test_every_compose_command_exists_in_the_project():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in loraloop_services(compose).items():
        argv = service["command"]
        argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        # Compose interpolates ${VAR:-default} before running; use the default here.
        argv = [a.split(":-", 1)[1].rstrip("}") if a.startswith("${") else a for a in argv]
        assert resolves_to_a_command(argv), name


def test_a_misspelt_command_or_option_would_be_caught():
    assert not resolves_to_a_command(["loraloop", "serv"])
    assert not resolves_to_a_command(["loraloop", "serve", "--hots", "0.0.0.0"])
    assert not resolves_to_a_command(["loraloop", "dataset"])


def test_the_image_is_safe_by_default_its_service_token_lives_in_the_data_volume():
    env = dockerfile().envs
    volume = json.loads(next(i["value"] for i in instructions() if i["instruction"] == "VOLUME"))[0]
    token_file = env["LORALOOP_SERVICE_TOKEN_FILE"]
    assert token_file.startswith(volume.rstrip("/") + "/"), "the token must survive restarts, in the volume"
    assert "LORALOOP_SERVICE_TOKEN" not in env, "never bake a token into the image"
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for service in loraloop_services(compose).values():
        # Either the operator's token or, left empty, the one the service writes into the shared volume.
        assert service["environment"]["LORALOOP_SERVICE_TOKEN"] == "${LORALOOP_SERVICE_TOKEN:-}"


def test_serve_refuses_a_public_address_without_a_token(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.delenv("LORALOOP_SERVICE_TOKEN", raising=False)
    monkeypatch.delenv("LORALOOP_SERVICE_TOKEN_FILE", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "gpu-box.lan"):
        result = CliRunner().invoke(cli, ["serve", "--host", host, "--model", "/nonexistent-model"])
        assert result.exit_code == 1 and "without LORALOOP_SERVICE_TOKEN" in result.output, host
        assert "--insecure-no-token" in result.output
    # Past the check (the model then fails to load, which shows serve went on to load it).
    insecure = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--insecure-no-token", "--model",
                                        "/nonexistent-model"])
    assert insecure.exit_code == 1 and "Cannot load model" in insecure.output
    loopback = CliRunner().invoke(cli, ["serve", "--host", "::1", "--model", "/nonexistent-model"])
    assert "Cannot load model" in loopback.output


def test_the_ray_profile_adds_a_head_and_gpu_workers_that_the_service_joins_with_ray_token_auth():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    head, worker, service = (compose["services"][name] for name in ("ray-head", "ray-worker", "service"))
    assert head["profiles"] == worker["profiles"] == ["ray"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--port=6379" in head["command"]
    assert worker["command"][:3] == ["ray", "start", "--address=ray-head:6379"]
    assert all("--block" in s["command"] for s in (head, worker))  # ray start returns at once without it
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Every Ray process, the service's driver included, shares the cluster's token.
    for s in (head, worker, service):
        assert s["environment"]["RAY_AUTH_MODE"] == "token"
        assert s["environment"]["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}"
    # The workers load adapters from the volume the service scans.
    assert worker["volumes"] == service["volumes"]
    assert "ray start --address=ray-head:6379" in " ".join(service["entrypoint"])
    assert service["command"][service["command"].index("--backend") + 1] == "${LORALOOP_BACKEND:-local}"
