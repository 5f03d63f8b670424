"""Application versions: SemVer 2.0 precedence for "latest", and only SemVer numbers can be registered."""

from __future__ import annotations

import pydantic
import pytest

from slidebridge.applications import APPLICATIONS, is_semver, semver_key


def test_latest_is_the_highest_semver_with_pre_releases_before_their_release() -> None:
    base = APPLICATIONS["he-tissue"]
    template = base.versions[0]
    numbers = ["1.9.0", "1.10.0-rc.1", "1.10.0-beta.11", "1.10.0-beta.2", "0.99.0"]
    app = base.model_copy(update={"versions": [template.model_copy(update={"version_number": n}) for n in numbers]})
    assert app.version(None).version_number == "1.10.0-rc.1"
    assert sorted(numbers, key=semver_key) == ["0.99.0", "1.9.0", "1.10.0-beta.2", "1.10.0-beta.11", "1.10.0-rc.1"]
    with_release = [*numbers, "1.10.0"]
    assert max(with_release, key=semver_key) == "1.10.0"


@pytest.mark.parametrize(
    ("number", "valid"), [("1.0.0", True), ("1.0.0-beta.1", True), ("v1.0.0", False), ("1.0", False)]
)
def test_semver_check_matches_the_clients(number: str, valid: bool) -> None:
    assert is_semver(number) is valid


def test_a_version_the_client_would_reject_cannot_be_registered() -> None:
    template = APPLICATIONS["he-tissue"].versions[0]
    with pytest.raises(pydantic.ValidationError):
        type(template).model_validate({**template.model_dump(), "version_number": "v2"})
