"""jiralake installed without the ``local`` extra (as in the production image): moto cannot be imported.

A ``sitecustomize`` on PYTHONPATH makes ``import moto`` fail in the command and in any child it starts
(``python -m moto.server`` too), as when moto is not installed, without a second virtualenv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.local_aws import INSTALL_LOCAL_EXTRA, require_moto_server
from shared.errors import CommandError

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("jiralake", "receiver", "consumer", "exporter", "shared", "ops", "backfill")
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"
NO_MOTO_LINE = (
    "jiralake: the local stack runs moto's server, which is not installed here (no module 'moto'); "
    f"install it with: {INSTALL_LOCAL_EXTRA}"
)


@pytest.fixture
def without_moto(tmp_path: Path) -> dict[str, str]:
    """The environment of a process (and its children) where moto is not importable."""
    shim = tmp_path / "no-moto"
    shim.mkdir()
    # None in sys.modules: `import moto` raises ModuleNotFoundError and find_spec() answers None.
    (shim / "sitecustomize.py").write_text("import sys\n\nsys.modules['moto'] = None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "JIRALAKE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    env["DATABASE_URL"] = UNREACHABLE
    return env


def _jiralake(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jiralake", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_the_shim_hides_moto(without_moto: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import moto.server"], capture_output=True, text=True, env=without_moto
    )
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr, result.stderr


@pytest.mark.parametrize("args", [["up"], ["up", "--demo"]], ids=["up", "demo"])
def test_up_without_moto_says_how_to_install_it_in_one_line(
    without_moto: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    # WHEN `jiralake up` (what `make up` / `make demo` run) starts where moto is not installed
    state = tmp_path / "state"
    result = _jiralake(without_moto, *args, "--port", "0", "--state-dir", str(state), cwd=tmp_path)
    # THEN one line says how to get it, exit 1, no traceback, and nothing was started or created
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip() == NO_MOTO_LINE
    assert result.stdout == ""
    assert not state.exists()


def test_every_command_s_help_works_without_moto(without_moto: dict[str, str], tmp_path: Path) -> None:
    result = _jiralake(without_moto, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert " up " in result.stdout and " consumer " in result.stdout
    # AND each command's own --help (its parser is built from its module, imported for real)
    script = (
        "import argparse, contextlib, io\n"
        "from jiralake.cli import build_parser\n"
        "parser = build_parser()\n"
        "(sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]\n"
        "for name in sub.choices:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        parser.parse_args([name, '--help'])\n"
        "    print(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=without_moto, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"setup", "receiver", "consumer", "export", "up"} <= set(result.stdout.split())


def test_every_product_module_imports_without_moto(without_moto: dict[str, str]) -> None:
    # The image has no moto: no module of the product may need it at import time.
    script = (
        "import importlib, pkgutil, sys\n"
        "count = 0\n"
        f"for package in {PRODUCT_PACKAGES!r}:\n"
        "    module = importlib.import_module(package)\n"
        "    for info in pkgutil.walk_packages(module.__path__, package + '.'):\n"
        "        if info.name.rpartition('.')[2] != '__main__':\n"
        "            importlib.import_module(info.name)\n"
        "            count += 1\n"
        "print(count)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=without_moto, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) > 50


@pytest.mark.parametrize("module", ["flask", "flask_cors"])
def test_moto_without_its_server_extra_is_refused_too(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN moto installed without `[server]`: `python -m moto.server` would fail on this import
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(CommandError) as refused:
        require_moto_server()
    assert str(refused.value) == (
        f"the local stack runs moto's server, which is not installed here (no module {module!r}); "
        f"install it with: {INSTALL_LOCAL_EXTRA}"
    )
