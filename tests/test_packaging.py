"""What can be checked here of the containers without a Docker engine: compose.yaml against the Compose
specification, its commands against the real CLI, and the wheel the image installs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from jiralake.cli import build_parser
from shared import migrate

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


@pytest.mark.timeout(300)
def test_wheel_carries_the_sql_files(tmp_path: Path) -> None:
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
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("jiralake-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in migrate.available():
        assert f"shared/migrations/{migration.version:04d}_{migration.name}.sql" in names
    assert "jiralake/cli.py" in names
    sql_in_tree = {
        str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.sql") if p.parts[-2] not in {"tests", "bench"}
    }
    assert sql_in_tree <= names
