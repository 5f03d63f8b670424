"""infra.bundle: rebuilds exactly when needed, and the stack refuses a missing, stale or stub bundle.

A fake pip stands in for the real one (no network): it records its calls and installs a marker package.
The lock is made from a recorded ``pip install --dry-run --report`` (tests/fixtures/pip_install_report.json).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from infra.bundle import (
    LOCK,
    REPO_ROOT,
    REQUIREMENTS,
    STAMP_NAME,
    BundleError,
    build_bundle,
    check_bundle,
    check_lock,
    lock_text,
    write_lock,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def pip_report() -> dict[str, Any]:
    report: dict[str, Any] = json.loads((FIXTURES / "pip_install_report.json").read_text())
    return report


def relock(root: Path, report: dict[str, Any] | None = None) -> None:
    write_lock(root, resolver=lambda requirements: report or pip_report())


class FakePip:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail = False

    def __call__(self, requirements: Path, target: Path) -> None:
        self.calls.append(requirements.read_text())
        if self.fail:
            raise BundleError("pip failed")
        (target / "somedep").mkdir()
        (target / "somedep" / "__init__.py").write_text(f"# built from {requirements.read_text()!r}\n")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "slidebridge").mkdir(parents=True)
    (root / "slidebridge" / "__init__.py").write_text("")
    (root / "slidebridge" / "runs.py").write_text("STATE = 1\n")
    (root / "slidebridge" / "__pycache__").mkdir()
    (root / "slidebridge" / "__pycache__" / "runs.cpython-311.pyc").write_bytes(b"\0")
    (root / "lambdas" / "api").mkdir(parents=True)
    (root / "lambdas" / "api" / "handler.py").write_text("def handler(event, context): ...\n")
    (root / "lambdas" / "requirements.txt").write_text("pydantic==2.14.3\n")
    relock(root)
    return root


def test_first_build_installs_dependencies_and_copies_sources(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "out" / "lambda"
    assert build_bundle(repo, target, install=pip) is True
    assert len(pip.calls) == 1
    assert (target / "somedep" / "__init__.py").is_file()
    assert (target / "slidebridge" / "runs.py").read_text() == "STATE = 1\n"
    assert (target / "lambdas" / "api" / "handler.py").is_file()
    assert not (target / "slidebridge" / "__pycache__").exists()
    check_bundle(target, repo)


def test_second_build_is_a_no_op(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "lambda"
    build_bundle(repo, target, install=pip)
    assert build_bundle(repo, target, install=pip) is False
    assert len(pip.calls) == 1


def test_source_change_recopies_sources_without_pip(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "lambda"
    build_bundle(repo, target, install=pip)
    (repo / "slidebridge" / "runs.py").write_text("STATE = 2\n")
    (repo / "lambdas" / "api" / "handler.py").unlink()
    with pytest.raises(BundleError, match="predates the current sources"):
        check_bundle(target, repo)

    assert build_bundle(repo, target, install=pip) is True
    assert len(pip.calls) == 1
    assert (target / "slidebridge" / "runs.py").read_text() == "STATE = 2\n"
    assert not (target / "lambdas" / "api" / "handler.py").exists()
    assert (target / "somedep").is_dir()
    check_bundle(target, repo)


def test_installs_the_lock_not_the_loose_requirements(repo: Path, tmp_path: Path) -> None:
    pip = FakePip()
    build_bundle(repo, tmp_path / "lambda", install=pip)
    [installed] = pip.calls
    # Dependencies of dependencies are pinned too, each with its wheel's hash.
    assert "pydantic-core==2.50.4 \\\n    --hash=sha256:c81d98e27d9d" in installed
    assert "typing-extensions==4.16.0 \\\n    --hash=sha256:" in installed


def test_requirements_change_without_relock_is_refused_and_relocking_reinstalls(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "lambda"
    build_bundle(repo, target, install=pip)
    (repo / "lambdas" / "requirements.txt").write_text("pydantic==2.14.3\nhttpx==0.28.1\n")
    with pytest.raises(BundleError, match=r"not made from the current lambdas/requirements\.txt.*infra\.bundle --lock"):
        check_bundle(target, repo)
    with pytest.raises(BundleError, match="--lock"):
        build_bundle(repo, target, install=pip)
    assert len(pip.calls) == 1

    report = pip_report()
    httpx = copy.deepcopy(report["install"][0])
    httpx["metadata"] = {"name": "httpx", "version": "0.28.1"}
    httpx["download_info"]["archive_info"]["hashes"] = {"sha256": "d909fcccc110f8c7"}
    report["install"].append(httpx)
    relock(repo, report)
    with pytest.raises(BundleError, match=r"predates lambdas/requirements\.lock"):
        check_bundle(target, repo)
    assert build_bundle(repo, target, install=pip) is True
    assert "httpx==0.28.1" in pip.calls[-1]
    assert "httpx" in (target / "somedep" / "__init__.py").read_text()
    check_bundle(target, repo)


def test_failed_install_keeps_the_previous_bundle(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "lambda"
    build_bundle(repo, target, install=pip)
    (repo / "lambdas" / "requirements.txt").write_text("nonexistent==0\n")
    relock(repo)
    pip.fail = True
    with pytest.raises(BundleError):
        build_bundle(repo, target, install=pip)
    assert (target / "somedep").is_dir()
    assert (target / STAMP_NAME).is_file()


def test_missing_bundle_is_refused(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no Lambda bundle"):
        check_bundle(tmp_path / "nothing", repo)


def test_stub_bundle_has_no_dependencies_and_is_refused_unless_allowed(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "stub"
    build_bundle(repo, target, stub=True, install=pip)
    assert pip.calls == []
    assert (target / "slidebridge" / "runs.py").is_file()
    with pytest.raises(BundleError, match="source-only"):
        check_bundle(target, repo)
    check_bundle(target, repo, allow_stub=True)

    # Turning the stub into a real bundle installs the dependencies.
    build_bundle(repo, target, install=pip)
    assert len(pip.calls) == 1
    check_bundle(target, repo)


# --- the lock ------------------------------------------------------------------------------------


def test_lock_lists_every_wheel_once_sorted_by_normalised_name_with_its_hash() -> None:
    text = lock_text(pip_report(), "ab" * 32)
    pins = re.findall(r"^([a-z0-9-]+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, re.MULTILINE)
    assert [(name, version) for name, version, _ in pins] == [
        ("pydantic", "2.14.3"),
        ("pydantic-core", "2.50.4"),
        ("python-dateutil", "2.9.0.post0"),
        ("typing-extensions", "4.16.0"),
    ]
    assert ("pydantic", "2.14.3", "3f7b347782ab7e4cf4c798496ae3a82787d9f21ec12676a9c564355eeef8daa8") in pins
    assert f"# from lambdas/requirements.txt sha256:{'ab' * 32}" in text


def test_a_wheel_without_a_hash_cannot_be_locked() -> None:
    report = pip_report()
    report["install"][1]["download_info"].pop("archive_info")
    with pytest.raises(BundleError, match=r"no SHA-256 for pydantic_core 2\.50\.4"):
        lock_text(report, "ab" * 32)


def test_missing_lock_is_refused_saying_how_to_make_it(repo: Path, tmp_path: Path) -> None:
    (repo / "lambdas" / "requirements.lock").unlink()
    with pytest.raises(BundleError, match=r"requirements\.lock is missing.*infra\.bundle --lock"):
        build_bundle(repo, tmp_path / "lambda", install=FakePip())
    # A stub (template tests) installs nothing and needs no lock.
    build_bundle(repo, tmp_path / "stub", stub=True, install=FakePip())


def test_the_repository_lock_is_current_and_pins_every_requirement_as_given() -> None:
    check_lock(REPO_ROOT)
    lock = (REPO_ROOT / LOCK).read_text()
    assert hashlib.sha256((REPO_ROOT / REQUIREMENTS).read_bytes()).hexdigest() in lock
    for line in (REPO_ROOT / REQUIREMENTS).read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert f"\n{re.sub(r'[-_.]+', '-', name).lower()}=={version} \\\n    --hash=sha256:" in lock, line
