"""Dockerfile, docker-compose.yml and .dockerignore, checked without a Docker engine.

The structure docs/contract.md's Deployment describes (Redis with its append-only file, a scalable worker,
the HTTP producer, the fake iVvy only under the demo profile, health checks, non-root), and that
each service's command is one the ``leadstage`` command really has.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import TEST_API_SECRET
from worker.core.errors import ConfigError
from worker.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("redis", "worker", "webhook", "fake-ivvy")
OUR_SERVICES = ("worker", "webhook", "fake-ivvy")  # the ones that run the leadstage image
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - in a container, a server must listen beyond its own loopback


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services = load_compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    result = services[name]
    assert isinstance(result, dict)
    return result


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):  # the "KEY=value" form
        env = dict(item.partition("=")[::2] for item in env)
    assert isinstance(env, dict)
    return {str(k): str(v) for k, v in env.items()}


def healthcheck_text(name: str) -> str:
    test = service(name)["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_has_the_four_services() -> None:
    assert set(load_compose()["services"]) == set(SERVICES)


def test_redis_keeps_an_append_only_file_on_a_named_volume() -> None:
    redis = service("redis")
    assert str(redis["image"]).split(":")[0] == "redis"
    assert str(redis["image"]).split(":")[1].startswith("7")
    command = redis["command"]
    words = command if isinstance(command, list) else str(command).split()
    assert "--appendonly" in words
    assert words[words.index("--appendonly") + 1] == "yes"
    assert words[words.index("--appendfsync") + 1] == "always"  # the soak's setting: nothing acknowledged is lost
    mounts = [str(volume).split(":") for volume in redis["volumes"]]
    named = [source for source, target, *_ in mounts if target == "/data"]
    assert named, "Redis's /data must be a volume"
    assert named[0] in (load_compose().get("volumes") or {}), "a named volume, declared at the top level"
    assert "redis-cli" in healthcheck_text("redis")
    assert "ping" in healthcheck_text("redis")


def test_worker_scales_out() -> None:
    worker = service("worker")
    # A fixed name or host port would make `docker compose up --scale worker=N` fail.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["build"] in (".", {"context": "."})
    assert worker["command"] == ["worker"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_environment() -> None:
    env = environment("worker")
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["LEADSTAGE_METRICS_PORT"] == "9464"
    for name in ("IVVY_BASE_URL", "IVVY_API_KEY", "IVVY_API_SECRET"):
        assert env[name].startswith("${" + name), f"{name} comes from the environment"
    # Without settings, the worker talks to the demo profile's fake iVvy with its demo credentials.
    fake_port = service("fake-ivvy")["command"][-1]
    assert env["IVVY_BASE_URL"] == "${IVVY_BASE_URL:-http://fake-ivvy:" + fake_port + "}"
    assert env["IVVY_API_KEY"] == "${IVVY_API_KEY:-demo-key}"
    assert env["IVVY_API_SECRET"] == "${IVVY_API_SECRET:-demo-secret-of-the-fake-ivvy}"
    fake_env = environment("fake-ivvy")
    assert fake_env["IVVY_API_KEY"] == env["IVVY_API_KEY"]
    assert fake_env["IVVY_API_SECRET"] == env["IVVY_API_SECRET"]


def test_the_workers_compose_defaults_are_valid_settings() -> None:
    """With nothing set, the worker boots against the demo's fake over plain http, which
    LEADSTAGE_PLAIN_HTTP_HOSTS allows for that host only."""
    defaults = compose_defaults("worker")
    settings = Settings.from_env(defaults)
    assert settings.accounts["default"].base_url.startswith("http://fake-ivvy:")
    with pytest.raises(ConfigError, match="LEADSTAGE_PLAIN_HTTP_HOSTS"):
        Settings.from_env({**defaults, "LEADSTAGE_PLAIN_HTTP_HOSTS": ""})


def test_worker_gets_time_to_finish_in_flight_requests() -> None:
    grace = str(service("worker")["stop_grace_period"])
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, grace
    assert int(match.group(1)) > 25, "longer than LEADSTAGE_SHUTDOWN_GRACE's default"


def test_worker_healthcheck_asks_the_metrics_port() -> None:
    text = healthcheck_text("worker")
    assert "/metrics" in text
    assert "LEADSTAGE_METRICS_PORT" in text or "9464" in text


def test_webhook_service() -> None:
    webhook = service("webhook")
    assert webhook["command"] == ["webhook", "--host", ALL_INTERFACES, "--port", "8080"]
    assert [str(p) for p in webhook["ports"]] == ["8080:8080"]
    assert environment("webhook")["WEBHOOK_SECRET"].startswith("${WEBHOOK_SECRET")
    assert environment("webhook")["WEBHOOK_SECRET"] in ("${WEBHOOK_SECRET}", "${WEBHOOK_SECRET:-}"), (
        "no default secret baked into the compose file"
    )
    assert environment("webhook")["REDIS_URL"] == "redis://redis:6379/0"
    assert webhook["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "127.0.0.1:8080/readyz" in healthcheck_text("webhook")


#: What the webhook and the worker must agree on: where the changes go, how long Redis may take
#: and how many replicas confirm a write (the producers wait for them too), and the account list.
SHARED = (
    "REDIS_URL",
    "LEADSTAGE_QUEUE",
    "LEADSTAGE_RESULTS_STREAM",
    "LEADSTAGE_DLQ_STREAM",
    "LEADSTAGE_LEDGER_RETENTION",
    "LEADSTAGE_REDIS_TIMEOUT",
    "LEADSTAGE_REDIS_CONNECT_TIMEOUT",
    "LEADSTAGE_REDIS_MIN_REPLICAS",
    "LEADSTAGE_REDIS_REPLICA_TIMEOUT",
    "LEADSTAGE_ACCOUNT_NAMES",
)


def compose_defaults(name: str) -> dict[str, str]:
    """The service's environment with nothing set on the host: each ${VAR:-default} as its default."""
    return {var: re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", value) for var, value in environment(name).items()}


def test_producer_and_worker_agree_on_queue_streams_redis_and_accounts() -> None:
    worker, webhook = environment("worker"), environment("webhook")
    for name in SHARED:
        assert name in worker, f"the worker's environment does not pass {name} through"
        assert worker[name] == webhook.get(name), name
        if name != "REDIS_URL":
            assert worker[name].startswith("${" + name), f"{name} comes from the environment"


def test_the_webhook_knows_the_workers_accounts_without_their_credentials(tmp_path: Path) -> None:
    """As deployed, the webhook refuses an account the worker has no credentials for, as the CLI
    does, instead of accepting it for the worker to dead-letter (any account, without a list)."""
    webhook = Settings.from_env(compose_defaults("webhook"))
    worker = Settings.from_env(compose_defaults("worker"))
    assert webhook.known_accounts, "the webhook has an account list"
    assert webhook.known_accounts == worker.known_accounts == set(worker.accounts)
    assert not webhook.accounts, "the producer gets no iVvy credentials"
    assert not {"IVVY_API_KEY", "IVVY_API_SECRET"} & set(environment("webhook"))
    # An accounts file given to the worker alone: the worker refuses to start until the shared
    # account list names its accounts too.
    accounts = tmp_path / "accounts.json"
    accounts.write_bytes(
        json.dumps(
            {"acme": {"base_url": "https://ivvy.example", "api_key": "k", "api_secret": TEST_API_SECRET}}
        ).encode()
    )
    with pytest.raises(ConfigError, match=r"LEADSTAGE_ACCOUNT_NAMES \(default\) must name the accounts"):
        Settings.from_env({**compose_defaults("worker"), "LEADSTAGE_ACCOUNTS_FILE": str(accounts)})
    both = {"LEADSTAGE_ACCOUNTS_FILE": str(accounts), "LEADSTAGE_ACCOUNT_NAMES": "default acme"}
    assert set(Settings.from_env({**compose_defaults("worker"), **both}).accounts) == {"default", "acme"}


def test_fake_ivvy_only_under_the_demo_profile() -> None:
    fake = service("fake-ivvy")
    assert fake["profiles"] == ["demo"]
    assert fake["command"] == ["fake-ivvy", "--host", ALL_INTERFACES, "--port", "8765"]
    assert "8765" in healthcheck_text("fake-ivvy")
    for name in ("redis", "worker", "webhook"):
        assert "profiles" not in service(name), f"{name} runs without any profile"


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_a_healthcheck(name: str) -> None:
    healthcheck = service(name)["healthcheck"]
    assert healthcheck["test"][0] in ("CMD", "CMD-SHELL")
    assert "disable" not in healthcheck


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_services_run_the_image_as_its_non_root_user(name: str) -> None:
    svc = service(name)
    assert svc["build"] in (".", {"context": "."})
    assert str(svc.get("user", "")).split(":")[0] not in ("0", "root"), "the Dockerfile's USER applies"
    assert "privileged" not in svc


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_service_command_is_a_real_leadstage_subcommand(name: str) -> None:
    # worker/cli.py is the console script's module ([project.scripts] leadstage); this test is
    # meant to fail, not skip, while a compose command names something the CLI does not have.
    from worker.cli import parse_command

    command = service(name)["command"]
    assert isinstance(command, list)
    try:
        args = parse_command(command)
    except SystemExit as exc:
        pytest.fail(f"`leadstage {' '.join(command)}` is not a valid command (exit status {exc.code})")
    # The options were taken as given, whatever the CLI names their destinations.
    parsed = {str(value) for value in [*vars(args).values(), *vars(getattr(args, "fake_options", args)).values()]}
    for option in ("--host", "--port"):
        if option in command:
            assert command[command.index(option) + 1] in parsed, f"{option} of `leadstage {command[0]}`"


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_is_python_311_slim() -> None:
    images = [arguments.split()[0] for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    assert images
    assert all(image == "python:3.11-slim" for image in images)


def test_dockerfile_installs_the_project_with_pip() -> None:
    text = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip (install|wheel)\b[^&]* \.(\s|$)", text), "the project itself is built by pip"
    runtime_runs = " ".join(arguments for keyword, arguments in final_stage() if keyword == "RUN")
    assert "pip install" in runtime_runs


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users, "the runtime stage must set USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("", "0", "root")
    assert group not in ("0", "root")


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    entrypoints = [arguments for keyword, arguments in final_stage() if keyword == "ENTRYPOINT"]
    assert entrypoints
    assert json.loads(entrypoints[-1]) == ["leadstage"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "leadstage" in scripts
    assert scripts["leadstage"].startswith("worker.cli:")


def test_dockerfile_bakes_in_no_secret() -> None:
    env_lines = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword in ("ENV", "ARG"))
    assert not re.search(r"SECRET|PASSWORD|TOKEN|API_KEY", env_lines, re.IGNORECASE)


def test_dockerfile_copies_only_what_exists_and_is_in_the_build_context() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore lets in only what it names"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, arguments in dockerfile_instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {source}: no such file in the repository"
            assert path in allowed, f"COPY {source}: excluded by .dockerignore"
    # The package data setuptools needs is in the context with its package.
    assert "worker" in allowed
    assert "producers" in allowed
    assert "pyproject.toml" in allowed


# --- the lock files --------------------------------------------------------------------------------

LOCKS = {"dev": ROOT / "requirements/dev.txt", "runtime": ROOT / "requirements/runtime.txt"}


def locked_versions(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a lock file (names normalised)."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", path.read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


@pytest.mark.parametrize(("lock", "extras"), [("dev", ("test", "otel")), ("runtime", ("otel",))])
def test_the_lock_files_satisfy_pyproject(lock: str, extras: tuple[str, ...]) -> None:
    """A dependency added to pyproject without ``bash scripts/lock.sh`` fails here, naming it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]
    pins = locked_versions(LOCKS[lock])
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCKS[lock].name}: run bash scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCKS[lock].name} pins {name}=={pins[name]}, outside pyproject's {requirement}: run bash scripts/lock.sh"
        )
    assert "--hash=sha256:" in LOCKS[lock].read_text()


def test_setup_and_the_image_install_from_the_lock_files_with_hashes() -> None:
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert "--require-hashes --no-deps -r requirements/dev.txt" in setup
    runs = " ".join(arguments for keyword, arguments in final_stage() if keyword == "RUN")
    assert "--require-hashes --no-deps -r /tmp/requirements/runtime.txt" in runs
