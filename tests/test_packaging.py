"""`pip install .` gives an `ondemand` command that works from any directory, without the checkout.

The wheel is built from a copy of the checkout (so stale build/ leftovers cannot leak into it and no
test writes into the tree), without build isolation or an index: nothing is downloaded. It is then
installed with --no-deps into a target directory and run with this venv's interpreter, which supplies
the runtime dependencies; the cwd is outside the repo and ondemand.__file__ must be inside the target.
The wheel's one top-level package is `ondemand` (app/ mapped to it, plugins/ to `ondemand.plugins`), so a
user project with its own `app`, `app.py` and `plugins` runs it, `--workers 2` included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ondemand.host.net import free_port
from tests.support import ROOT

# What a fresh clone would not have, or the build would only pick up by accident.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".ruff_cache", ".hypothesis", ".ondemand", "results", "*.pyc")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([*PIP, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packaging")
    src, wheels, target, work = base / "src", base / "wheels", base / "target", base / "work"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    work.mkdir()
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src), cwd=work)
    (wheel,) = wheels.glob("ondemand-0.2.0-*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=work)
    return {"src": src, "wheel": wheel, "target": target, "work": work}


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "DOCKER_ENV", "REDIS_URL", "DATABASE_URL"} and not k.startswith("ONDEMAND_")}
    env["PYTHONPATH"] = str(target)
    return env


def _ondemand(built: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(built["target"] / "bin" / "ondemand"), *args], cwd=built["work"],
                          env=_env(built["target"]), capture_output=True, text=True, timeout=60)


def test_the_wheel_holds_the_packages_and_the_status_page_and_nothing_else(built: dict[str, Path]) -> None:
    src = built["src"]
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        dist_info = "ondemand-0.2.0.dist-info"
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
        metadata = whl.read(f"{dist_info}/METADATA").decode()
    # One import name: nothing named app or plugins lands in site-packages beside it.
    assert {name.split("/")[0] for name in names} == {"ondemand", dist_info}, sorted(names)
    # Every file of app/ (as ondemand/) and plugins/ (as ondemand/plugins/), a subpackage added later
    # included, and the status page's files.
    shipped = {("ondemand/" if d == "app" else "ondemand/plugins/") + p.relative_to(src / d).as_posix()
               for d in ("app", "plugins") for p in (src / d).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert {"ondemand/web/static/index.html", "ondemand/web/static/status.css",
            "ondemand/web/static/status.js", "ondemand/plugins/storage_redis.py"} <= shipped
    assert shipped <= names, sorted(shipped - names)

    assert "[console_scripts]\nondemand = ondemand.cli:main" in entry_points
    assert "Requires-Python: >=3.11" in metadata
    # The dependencies are pyproject.toml's, the embedded servers only with the `embedded` extra.
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    wanted = {str(Requirement(line)) for line in project["dependencies"]}
    embedded = project["optional-dependencies"]["embedded"]
    wanted |= {str(Requirement(f'{line}; extra == "embedded"')) for line in embedded}
    declared = {str(Requirement(line.removeprefix("Requires-Dist: ")))
                for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    assert wanted and declared == wanted
    assert not any("pgserver" in line or "valkey" in line for line in project["dependencies"])


def test_the_installed_command_runs_from_anywhere_without_the_checkout(built: dict[str, Path]) -> None:
    target, work = built["target"], built["work"]
    assert not work.resolve().is_relative_to(ROOT)
    where = subprocess.run(
        [sys.executable, "-c", "import ondemand, ondemand.web.page as p, ondemand.plugins as b; "
                               "print(ondemand.__file__); print(b.__file__); print(p.STATIC_DIR)"],
        cwd=work, env=_env(target), capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    assert all(Path(path).is_relative_to(target) for path in where), where

    helped = _ondemand(built, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: ondemand ")
    assert "{serve,check-config,status}" in helped.stdout

    config = ROOT / "config" / "default.toml"
    checked = _ondemand(built, "check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert f"{config}: valid" in checked.stderr.splitlines()
    assert json.loads(checked.stdout)["server"]["port"] == 8080

    missing = _ondemand(built, "check-config", "--config", str(work / "nope.toml"))
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_the_installed_server_serves_the_status_page_from_the_package(built: dict[str, Path]) -> None:
    # Mark the installed copy: the page must come from the package directory, not from a checkout.
    script = built["target"] / "ondemand/web/static/status.js"
    script.write_bytes(script.read_bytes() + b"\n// served from the installed package\n")
    port = free_port()
    log_path = built["work"] / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(built["target"] / "bin" / "ondemand"), "serve", "--port", str(port)],
                                cwd=built["work"], env=_env(built["target"]), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/status.js", timeout=5) as resp:
                    served = resp.read()
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the installed server did not come up"
                time.sleep(0.1)
        assert served == script.read_bytes()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.read() == (built["target"] / "ondemand/web/static/index.html").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_project_with_its_own_app_and_plugins_runs_ondemand_with_two_workers(
        built: dict[str, Path], tmp_path: Path) -> None:
    """The names aiohttp projects use most (`app`, `app.py`, `plugins`) are the user's: ondemand never
    imports them, in the server or in its workers, even with the project on sys.path."""
    psutil = pytest.importorskip("psutil")
    project = tmp_path / "project"
    for package in ("app", "plugins"):
        (project / package).mkdir(parents=True)
        poison = f"raise ImportError('the project\\'s own {package} was imported')\n"
        (project / package / "__init__.py").write_text(poison)
    (project / "app.py").write_text("raise ImportError('the project\\'s own app.py was imported')\n")
    port = free_port()
    env = {**_env(built["target"]), "ONDEMAND_STORAGE__DURABLE": '""',
           "PYTHONPATH": os.pathsep.join([str(built["target"]), str(project)])}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(built["target"] / "bin" / "ondemand"), "serve", "--workers", "2",
                                 "--port", str(port)], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/users/u/profile?ttl=60",
                                                 data=b'{"name": "a"}', method="PUT",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the server did not come up: " + log_path.read_text()
                time.sleep(0.1)
        workers = [c for c in psutil.Process(proc.pid).children() if "ondemand.host.workers" in c.cmdline()]
        assert len(workers) == 2, log_path.read_text()
        for _ in range(20):  # any worker answers, and reads what another wrote (one shared Redis)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/users/u/profile", timeout=5) as resp:
                assert json.loads(resp.read())["profile"] == {"name": "a"}
        time.sleep(1.0)
        again = [c for c in psutil.Process(proc.pid).children() if "ondemand.host.workers" in c.cmdline()]
        assert {w.pid for w in again} == {w.pid for w in workers}, "a worker was restarted: " + log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        assert "was imported" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
