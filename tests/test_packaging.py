"""What can be checked here of the containers without a Docker engine: compose.yaml against the Compose
specification, its commands against the real CLI, and the wheel the image installs."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from compose_spec import PyCompose
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from consumer.settings import ConsumerSettings
from exporter.settings import ExporterSettings
from jiralake.cli import build_parser
from receiver.settings import ReceiverSettings
from shared import migrate
from shared.admin_server import admin_app, start_admin_server

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    # PyYAML resolves the `<<` merge keys; the Compose validator does not.
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_file_follows_the_compose_specification() -> None:
    data = {k: v for k, v in _compose().items() if not k.startswith("x-")}
    compose = PyCompose.from_json(json.dumps(data))
    assert set(compose.service_names()) == {"postgres", "aws", "setup", "receiver", "consumer", "exporter"}


def test_compose_dependencies_name_defined_services() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on undefined {dependency}"


def test_compose_commands_parse_with_the_real_cli() -> None:
    parser = build_parser()
    commands = [
        s["command"] for s in _compose()["services"].values() if s.get("image", "").startswith("jiralake")
    ]
    assert len(commands) == 4
    for command in commands:
        parser.parse_args(command)  # SystemExit(2) on an unknown command or option


def test_image_copies_every_package_the_project_declares() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]$", pyproject, re.MULTILINE)
    assert include is not None
    declared = set(re.findall(r'"(\w+)\*"', include[1]))
    copied = set(re.findall(r"^COPY (\w+) \./", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert declared == copied


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel the image's first stage builds (`pip wheel .`), built once for this module."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=280,
    )
    (built,) = out.glob("jiralake-*.whl")
    return built


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [
        Requirement(line.partition(": ")[2])
        for line in text.splitlines()
        if line.startswith("Requires-Dist: ")
    ]


def _needed(requirements: list[Requirement], extras: set[str]) -> dict[str, Requirement]:
    """What installing jiralake with these extras asks for, following its own extras (`jiralake[local]`)."""
    needed: dict[str, Requirement] = {}
    seen: set[str] = set()
    todo = {""} | extras
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for req in requirements:
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra:
                continue
            if canonicalize_name(req.name) == "jiralake":
                todo |= set(req.extras) - seen
            else:
                needed[canonicalize_name(req.name)] = req
    return needed


@pytest.mark.timeout(300)
def test_the_image_s_install_carries_no_moto_which_the_local_extra_brings(wheel: Path) -> None:
    requirements = _requirements(wheel)
    # GIVEN what the image installs: the plain package, no extras
    installs = [args for instr, args in dockerfile_stages()[-1] if instr == "RUN" and "pip install" in args]
    assert len(installs) == 1 and installs[0].split()[-1] == "jiralake", installs
    # THEN moto's server (and its web stack) is no requirement of it
    base = _needed(requirements, set())
    assert not {"moto", "flask", "werkzeug"} & set(base), sorted(base)
    assert {"aiohttp", "aioboto3", "asyncpg"} <= set(base)
    # WHILE the `local` extra brings moto's server, for `jiralake up`
    motos = [r for r in requirements if canonicalize_name(r.name) == "moto"]
    (moto,) = [r for r in motos if r.marker is not None and r.marker.evaluate({"extra": "local"})]
    assert moto.extras == {"server"}
    assert "moto" in _needed(requirements, {"local"})
    # AND the tools the test suite needs include it too (the tests run moto's server)
    assert "moto" in _needed(requirements, {"dev"})


@pytest.mark.timeout(300)
def test_time_zones_work_where_the_system_has_none(wheel: Path) -> None:
    # GIVEN the image's install, which requires tzdata (python:3.11-slim may ship no zoneinfo files)
    assert "tzdata" in _needed(_requirements(wheel), set())
    # WHEN zoneinfo finds no system time zones at all, THEN the exporter's schedule zone still resolves
    code = (
        "import zoneinfo; zoneinfo.reset_tzpath(to=[]); "
        "from exporter.settings import zone; zone('America/Sao_Paulo'); "
        "print(zoneinfo.ZoneInfo('Europe/Berlin'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "Europe/Berlin"), done.stderr[-1000:]


@pytest.mark.timeout(300)
def test_make_installs_the_extras_the_readme_s_commands_need(wheel: Path) -> None:
    # `make demo` runs `jiralake up` (moto's server) and `make test` the test tools: both install
    # through the one stamp rule, so its extras must bring moto and pytest.
    makefile = (ROOT / "Makefile").read_text()
    (extras,) = re.findall(r"pip install .*-e '\.\[([\w,]+)\]'", makefile)
    needed = _needed(_requirements(wheel), set(extras.split(",")))
    assert {"moto", "pytest", "mypy", "ruff"} <= set(needed), sorted(needed)


def test_compose_runs_moto_from_its_own_image_not_from_jiralake_s() -> None:
    # The jiralake image has no moto: compose's AWS endpoint is moto's own image, and no jiralake
    # service runs `up` (the only command that starts moto's server).
    services = _compose()["services"]
    assert services["aws"]["image"].startswith("motoserver/moto:")
    # At least 5.2, the first moto that takes the 1 MiB messages `jiralake setup` configures (5.1
    # refused the queues, and every service waited on setup), as the `local` extra asks.
    tag = services["aws"]["image"].removeprefix("motoserver/moto:")
    assert tuple(int(n) for n in tag.split(".")[:2]) >= (5, 2), tag
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["local"] == ["moto[server]>=5.2"]
    jiralake_services = {n: s for n, s in services.items() if s.get("image", "").startswith("jiralake")}
    assert jiralake_services
    for name, service in jiralake_services.items():
        assert service["command"][0] != "up", name
        assert urlsplit(service["environment"]["AWS_ENDPOINT_URL"]).hostname == "aws", name


@pytest.mark.timeout(300)
def test_wheel_carries_the_sql_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in migrate.available():
        assert f"shared/migrations/{migration.version:04d}_{migration.name}.sql" in names
    assert "jiralake/cli.py" in names
    sql_in_tree = {
        str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.sql") if p.parts[-2] not in {"tests", "bench"}
    }
    assert sql_in_tree <= names


@pytest.mark.timeout(300)
def test_wheel_carries_the_license_its_metadata_names(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (license_file,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert archive.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in archive.read(license_file)[:100]
    # AND the image's build stage has it (setuptools reads it to build the wheel)
    copies = [args for instr, args in dockerfile_stages()[0] if instr == "COPY"]
    assert any("LICENSE" in args.split() for args in copies), copies


# -- the image's final stage --

BUILD_TOOLS = frozenset(
    {
        "gcc",
        "g++",
        "cc",
        "clang",
        "make",
        "cmake",
        "build-essential",
        "python3-dev",
        "libpq-dev",
        "git",
        "cargo",
        "rustc",
        "musl-dev",
        "linux-headers",
    }
)


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined, by stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_final_stage_is_slim_runs_as_non_root_and_has_a_healthcheck() -> None:
    final = dockerfile_stages()[-1]
    (base,) = [args for instr, args in final if instr == "FROM"]
    assert base.split()[0].endswith("-slim")
    users = [args for instr, args in final if instr == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    healthchecks = [args for instr, args in final if instr == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "NONE" not in healthchecks[0].split()
    assert "JIRALAKE_HEALTH_URL" in healthchecks[0]
    # USER comes after every RUN: nothing the services run is installed or owned by root at run time.
    instructions = [instr for instr, _ in final]
    assert instructions.index("USER") > max(i for i, instr in enumerate(instructions) if instr == "RUN")


def test_final_stage_installs_no_build_tools() -> None:
    final = dockerfile_stages()[-1]
    commands = " ".join(args for instr, args in final if instr == "RUN")
    words = set(re.findall(r"[\w.+-]+", commands))
    assert not words & BUILD_TOOLS, f"build tools in the final stage: {words & BUILD_TOOLS}"
    assert not re.search(r"\b(apt-get|apt|apk|yum|dnf)\b", commands), (
        "a package manager runs in the final stage"
    )
    # Only the wheels built in the first stage are installed, without an index.
    assert "--no-index" in commands


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = [args for instr, args in dockerfile_stages()[-1] if instr == "HEALTHCHECK"]
    argv: list[str] = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in dockerfile_stages()[-1]:
        if instr == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


async def _run_probe(url: str) -> int:
    process = await asyncio.create_subprocess_exec(
        *_healthcheck_argv(),
        env={**os.environ, "JIRALAKE_HEALTH_URL": url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=30)


async def test_the_healthcheck_probe_passes_on_a_live_admin_port_and_fails_otherwise() -> None:
    async def not_ready() -> str | None:
        return "postgres unreachable"

    port = _free_port()
    runner = await start_admin_server(admin_app(not_ready), "127.0.0.1", port)
    try:
        # GIVEN a running service's admin port: /healthz answers 200 even while it is not ready
        assert await _run_probe(f"http://127.0.0.1:{port}/healthz") == 0
        # A non-2xx answer fails the probe
        assert await _run_probe(f"http://127.0.0.1:{port}/readyz") != 0
    finally:
        await runner.cleanup()
    # WHEN nothing listens THEN the probe fails (and does not hang)
    assert await _run_probe(f"http://127.0.0.1:{port}/healthz") != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_health_urls_point_at_each_service_s_admin_port() -> None:
    # The image's default fits the receiver; compose sets the URL for every long-running service.
    assert urlsplit(_image_env()["JIRALAKE_HEALTH_URL"]).port == ReceiverSettings.admin_port
    expected_port = {
        "receiver": ReceiverSettings.admin_port,
        "consumer": ConsumerSettings.admin_port,
        "exporter": ExporterSettings.admin_port,
    }
    services = _compose()["services"]
    for name, port in expected_port.items():
        url = urlsplit(services[name]["environment"]["JIRALAKE_HEALTH_URL"])
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/healthz"), name
        # The image's test is kept (no `test:` override), only its timings are tuned.
        assert "test" not in services[name]["healthcheck"], name
    assert services["setup"]["healthcheck"] == {"disable": True}


def test_compose_publishes_only_the_webhook_port_beyond_this_host() -> None:
    # moto takes any credentials (events queued past the signature check, exports readable), and the
    # admin ports are for this host's Prometheus: loopback only. Jira must reach the receiver.
    published = {
        port: name for name, service in _compose()["services"].items() for port in service.get("ports", [])
    }
    assert {port for port in published if not port.startswith("127.0.0.1:")} == {"8080:8080"}
    assert published["8080:8080"] == "receiver"


def test_compose_gives_the_services_time_to_drain_before_sigkill() -> None:
    # Docker's default is 10 s; the receiver needs its grace plus one SQS call, the consumer its grace
    def default(settings: type[Any], name: str) -> float:
        value: float = settings.__dataclass_fields__[name].default
        return value

    grace = _compose()["x-jiralake"]["stop_grace_period"]
    assert re.fullmatch(r"[0-9]+s", grace), grace
    needed = max(
        default(ReceiverSettings, "shutdown_grace_s") + default(ReceiverSettings, "sqs_timeout_s"),
        default(ConsumerSettings, "shutdown_grace_s"),
    )
    assert int(grace[:-1]) > needed, (grace, needed)


def test_compose_waits_for_healthy_dependencies_and_restarts_services() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dependency == "setup" else "service_healthy"
            assert condition == {"condition": wanted}, f"{name} -> {dependency}"
            if wanted == "service_healthy":
                assert "test" in services[dependency]["healthcheck"], dependency
        if name != "setup":
            assert service["restart"] == "unless-stopped", name
    assert services["setup"]["restart"] == "no"
    assert "--schedule" in services["exporter"]["command"]


def _old_pythons() -> list[str]:
    """Interpreters older than 3.11 on this machine, if any (pyenv's, or python3.x on PATH)."""
    found = [shutil.which(f"python3.{minor}") for minor in range(8, 11)]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3")))
    return [path for path in found if path]


def test_make_refuses_a_python_older_than_3_11_before_creating_the_venv(tmp_path: Path) -> None:
    # GIVEN a newcomer whose python3 is missing or too old (Ubuntu 22.04 ships 3.10)
    for python in ["python3.99-not-installed", *_old_pythons()[:1]]:
        venv = tmp_path / "venv"
        # WHEN they run the README's first command
        result = subprocess.run(
            ["make", "demo", f"PYTHON={python}", f"VENV={venv}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        # THEN make stops at once, says what it needs and how to pass it, and leaves no venv behind
        assert result.returncode != 0
        line = result.stderr.splitlines()[0]
        assert line.startswith(f"make: jiralake needs Python 3.11 or newer; {python} is "), line
        assert line.endswith("Pass one, e.g. make demo PYTHON=python3.11"), line
        assert not venv.exists()
