"""infra.bundle: rebuilds exactly when needed, and the stack refuses a missing, stale or stub bundle.

A fake pip stands in for the real one (no network): it records its calls and installs a marker package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.bundle import STAMP_NAME, BundleError, build_bundle, check_bundle


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


def test_requirements_change_reinstalls(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "lambda"
    build_bundle(repo, target, install=pip)
    (repo / "lambdas" / "requirements.txt").write_text("pydantic==2.14.3\nhttpx==0.28.1\n")
    with pytest.raises(BundleError, match="requirements"):
        check_bundle(target, repo)

    assert build_bundle(repo, target, install=pip) is True
    assert pip.calls[-1] == "pydantic==2.14.3\nhttpx==0.28.1\n"
    assert "httpx" in (target / "somedep" / "__init__.py").read_text()
    check_bundle(target, repo)


def test_failed_install_keeps_the_previous_bundle(repo: Path, tmp_path: Path) -> None:
    pip, target = FakePip(), tmp_path / "lambda"
    build_bundle(repo, target, install=pip)
    (repo / "lambdas" / "requirements.txt").write_text("nonexistent==0\n")
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
