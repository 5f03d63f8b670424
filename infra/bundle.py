"""Assemble the Lambda code directory (``build/lambda``) without Docker.

``python -m infra.bundle`` installs ``lambdas/requirements.lock`` for the Lambda platform (CPython 3.12,
manylinux2014 x86_64 wheels only, so nothing is compiled here) and copies the ``slidebridge`` and
``lambdas`` packages next to the dependencies. Both Lambda functions share this one directory as
their code asset.

The lock pins every package the Lambda ships, dependencies of dependencies too, each with its
wheel's SHA-256, and pip installs it with ``--require-hashes --no-deps``: two deploys of one commit
ship the same bytes, and a wheel that changed on the index is refused. ``python -m infra.bundle --lock``
writes it from ``lambdas/requirements.txt`` (pip's own resolver, ``--dry-run --report``); the lock
records the digest of the requirements it was made from, and a bundle is refused while they differ.

A stamp file records what the directory was built from (a digest of the lock plus the pip platform
arguments, and a digest of the sources). Running again is a no-op when both match, copies only the
sources when just they changed, and reinstalls everything when the lock changed. The stack refuses
to synthesise against a missing or stale bundle (``check_bundle``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = REPO_ROOT / "build" / "lambda"
SOURCE_PACKAGES = ("slidebridge", "lambdas")
REQUIREMENTS = Path("lambdas") / "requirements.txt"
LOCK = Path("lambdas") / "requirements.lock"
STAMP_NAME = ".bundle-stamp.json"

# Must agree with the functions' runtime and architecture in infra/functions.py.
PIP_PLATFORM_ARGS = (
    "--platform",
    "manylinux2014_x86_64",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--only-binary=:all:",
)

_IGNORED_NAMES = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
_IGNORED_SUFFIXES = (".pyc", ".pyo")

PipInstall = Callable[[Path, Path], None]
"""``(lock_file, target_dir)``: install the locked packages into ``target_dir``."""


class BundleError(RuntimeError):
    """The Lambda bundle is missing, stale or could not be built."""


class BundleStamp(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["full", "stub"]
    requirements_sha256: str
    sources_sha256: str


def requirements_digest(root: Path = REPO_ROOT) -> str:
    """Digest of the lock and the pip platform arguments it is installed with."""
    digest = hashlib.sha256()
    digest.update("\0".join(PIP_PLATFORM_ARGS).encode())
    digest.update(b"\0")
    digest.update((root / LOCK).read_bytes())
    return digest.hexdigest()


# --- the lock ------------------------------------------------------------------------------------

_LOCK_SOURCE = re.compile(rf"^# from {re.escape(REQUIREMENTS.as_posix())} sha256:([0-9a-f]{{64}})$", re.MULTILINE)
_LOCK_HINT = "run `.venv/bin/python -m infra.bundle --lock` (needs PyPI) and commit lambdas/requirements.lock"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_text(report: dict[str, Any], requirements_sha256: str) -> str:
    """The lock file for a ``pip install --dry-run --report`` result: one pinned, hashed line per wheel."""
    lines = [
        "# Every package of the Lambda bundle, for " + " ".join(PIP_PLATFORM_ARGS[:6]) + ", with its wheel's hash.",
        "# Written by `python -m infra.bundle --lock`; do not edit (change lambdas/requirements.txt and re-lock).",
        f"# from {REQUIREMENTS.as_posix()} sha256:{requirements_sha256}",
    ]
    pins = []
    for entry in report["install"]:
        name, version = entry["metadata"]["name"], entry["metadata"]["version"]
        sha256 = entry["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if not sha256:
            raise BundleError(f"the index gave no SHA-256 for {name} {version}; cannot lock it")
        # PEP 503's normalised name (the one rule of packaging.utils.canonicalize_name we need).
        pins.append((re.sub(r"[-_.]+", "-", name).lower(), version, sha256))
    lines.extend(f"{name}=={version} \\\n    --hash=sha256:{sha256}" for name, version, sha256 in sorted(pins))
    return "\n".join(lines) + "\n"


def _pip_install_for_lambda(*args: str, target: Path, requirements: Path, what: str) -> None:
    """``pip install`` of ``requirements`` into ``target`` for the Lambda platform; BundleError on failure."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        *args,
        *PIP_PLATFORM_ARGS,
        "--target",
        str(target),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise BundleError(f"{what} for the Lambda platform failed (pip exit {result.returncode})")


def resolve(requirements: Path) -> dict[str, Any]:
    """pip's resolution of ``requirements`` for the Lambda platform, as its installation report (needs PyPI)."""
    with TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        _pip_install_for_lambda(
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            target=Path(scratch) / "target",
            requirements=requirements,
            what=f"resolving {requirements.name}",
        )
        resolved: dict[str, Any] = json.loads(report.read_text())
        return resolved


def write_lock(root: Path = REPO_ROOT, *, resolver: Callable[[Path], dict[str, Any]] = resolve) -> Path:
    """Resolve ``lambdas/requirements.txt`` and write ``lambdas/requirements.lock``."""
    text = lock_text(resolver(root / REQUIREMENTS), _sha256(root / REQUIREMENTS))
    (root / LOCK).write_text(text)
    return root / LOCK


def check_lock(root: Path = REPO_ROOT) -> None:
    """Raise ``BundleError`` unless the lock exists and was made from the current requirements."""
    try:
        text = (root / LOCK).read_text()
    except FileNotFoundError:
        raise BundleError(f"{LOCK} is missing: {_LOCK_HINT}") from None
    source = _LOCK_SOURCE.search(text)
    if source is None or source.group(1) != _sha256(root / REQUIREMENTS):
        raise BundleError(f"{LOCK} was not made from the current {REQUIREMENTS}: {_LOCK_HINT}")


def _source_files(root: Path) -> Iterator[Path]:
    for package in SOURCE_PACKAGES:
        base = root / package
        if not base.is_dir():
            raise BundleError(f"source package {base} is missing")
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(root)
            if any(part in _IGNORED_NAMES for part in relative.parts) or path.suffix in _IGNORED_SUFFIXES:
                continue
            if path.is_file():
                yield path


def sources_digest(root: Path = REPO_ROOT) -> str:
    """Digest of every file of the source packages (names and contents), caches excluded."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def read_stamp(target: Path) -> BundleStamp | None:
    try:
        return BundleStamp.model_validate_json((target / STAMP_NAME).read_text())
    except (OSError, ValidationError):
        return None


def _write_stamp(target: Path, stamp: BundleStamp) -> None:
    (target / STAMP_NAME).write_text(stamp.model_dump_json(indent=2) + "\n")


def _copy_sources(root: Path, target: Path) -> None:
    ignore = shutil.ignore_patterns(*_IGNORED_NAMES, *(f"*{suffix}" for suffix in _IGNORED_SUFFIXES))
    for package in SOURCE_PACKAGES:
        destination = target / package
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(root / package, destination, ignore=ignore)


def pip_install(lock: Path, target: Path) -> None:
    """Install ``lock`` (every package pinned and hashed) as Lambda-platform wheels into ``target`` (needs PyPI)."""
    _pip_install_for_lambda(
        # The lock is the whole closure: pip resolves nothing more and checks each wheel's hash.
        "--require-hashes",
        "--no-deps",
        # The wheels are for 3.12 while this interpreter may be 3.11: byte-compiling here would only
        # add unusable __pycache__ files (and change the asset hash for nothing).
        "--no-compile",
        # pip compares the result with the *running* environment, which is irrelevant to --target.
        "--no-warn-conflicts",
        target=target,
        requirements=lock,
        what="pip install",
    )
    # Console scripts carry this machine's interpreter path in their shebang; Lambda never runs them.
    shutil.rmtree(target / "bin", ignore_errors=True)


def build_bundle(
    root: Path = REPO_ROOT,
    target: Path = DEFAULT_TARGET,
    *,
    stub: bool = False,
    install: PipInstall = pip_install,
) -> bool:
    """Bring ``target`` up to date; returns whether anything was (re)built.

    ``stub=True`` copies only the sources (no dependencies, no network): enough for template tests,
    refused by a real synth.
    """
    if not stub:
        check_lock(root)
    wanted = BundleStamp(
        kind="stub" if stub else "full",
        # A stub installs nothing, so no lock goes into it.
        requirements_sha256="" if stub else requirements_digest(root),
        sources_sha256=sources_digest(root),
    )
    current = read_stamp(target)
    if current == wanted:
        return False

    if (
        current is not None
        and current.kind == wanted.kind
        and (stub or current.requirements_sha256 == wanted.requirements_sha256)
    ):
        # Only the sources changed: keep the installed dependencies. The stamp goes first so that
        # an interrupted copy never looks up to date.
        (target / STAMP_NAME).unlink()
        _copy_sources(root, target)
        _write_stamp(target, wanted)
        return True

    # Fresh build next to the target, swapped in at the end: a failed pip run leaves the old bundle.
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if not stub:
        install(root / LOCK, staging)
    _copy_sources(root, staging)
    _write_stamp(staging, wanted)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return True


def check_bundle(target: Path, root: Path = REPO_ROOT, *, allow_stub: bool = False) -> BundleStamp:
    """Raise ``BundleError`` unless ``target`` is a bundle of the current sources and requirements."""
    hint = "run `make synth` (or `.venv/bin/python -m infra.bundle`) first"
    stamp = read_stamp(target)
    if stamp is None:
        raise BundleError(f"no Lambda bundle at {target}: {hint}")
    if stamp.kind == "stub" and not allow_stub:
        raise BundleError(f"{target} is a source-only test bundle without dependencies: {hint}")
    if stamp.kind == "full":
        check_lock(root)
        if stamp.requirements_sha256 != requirements_digest(root):
            raise BundleError(f"the Lambda bundle at {target} predates {LOCK}: {hint}")
    if stamp.sources_sha256 != sources_digest(root):
        raise BundleError(f"the Lambda bundle at {target} predates the current sources: {hint}")
    return stamp


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bundle", description="Assemble build/lambda.")
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET, help="output directory")
    parser.add_argument("--stub", action="store_true", help="sources only, no dependencies (tests)")
    parser.add_argument("--lock", action="store_true", help=f"write {LOCK} from {REQUIREMENTS} and stop")
    args = parser.parse_args(argv)
    try:
        if args.lock:
            sys.stderr.write(f"infra.bundle: wrote {write_lock(REPO_ROOT).relative_to(REPO_ROOT)}\n")
            return 0
        built = build_bundle(REPO_ROOT, args.target.resolve(), stub=args.stub)
    except BundleError as exc:
        sys.stderr.write(f"infra.bundle: {exc}\n")
        return 1
    sys.stderr.write(f"infra.bundle: {args.target} {'built' if built else 'up to date'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
