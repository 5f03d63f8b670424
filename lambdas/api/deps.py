"""Process-wide collaborators for the routes, built lazily from settings on first use.

Each factory imports its domain modules itself: the handler module then loads quickly, and a request
loads only what its route needs (a Techcyte webhook never loads the Sectra client or the Platform
service, and neither loads boto3 before its first AWS call is near).
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slidebridge.platform import PlatformService
    from slidebridge.settings import Settings
    from slidebridge.store import RunStore
    from slidebridge.vendors.sectra_service import SectraService
    from slidebridge.vendors.techcyte_service import TechcyteService
    from slidebridge.webhook_keys import WebhookKeys


def settings() -> Settings:
    from slidebridge.settings import get_settings  # noqa: PLC0415 - pydantic-settings on first use

    return get_settings()


@lru_cache(maxsize=1)
def run_store() -> RunStore:
    from slidebridge.store import RunStore  # noqa: PLC0415 - boto3 on first use

    return RunStore(settings().table_name)


@lru_cache(maxsize=1)
def platform_service() -> PlatformService:
    from slidebridge.artifacts import ArtifactStore  # noqa: PLC0415
    from slidebridge.launcher import launcher_from_settings  # noqa: PLC0415
    from slidebridge.outbound import OutboundPolicy  # noqa: PLC0415
    from slidebridge.platform import PlatformService  # noqa: PLC0415

    config = settings()
    return PlatformService(
        run_store(),
        ArtifactStore(config.bucket_name, prefix=config.artifacts_prefix),
        launcher_from_settings(config),
        OutboundPolicy.from_settings(config),
        artifact_url_ttl_s=config.artifact_url_ttl_s,
        artifacts_retention=timedelta(days=config.artifacts_retention_days),
        settings=config,
    )


@lru_cache(maxsize=1)
def webhook_keys() -> WebhookKeys:
    from slidebridge.webhook_keys import WebhookKeys  # noqa: PLC0415

    return WebhookKeys(settings())


@lru_cache(maxsize=1)
def sectra_service() -> SectraService:
    from slidebridge.artifacts import ArtifactStore  # noqa: PLC0415
    from slidebridge.launcher import launcher_from_settings  # noqa: PLC0415
    from slidebridge.outbound import OutboundPolicy  # noqa: PLC0415
    from slidebridge.vendors.sectra_service import SectraService  # noqa: PLC0415

    config = settings()
    artifacts = ArtifactStore(config.bucket_name, prefix=config.feedback_prefix)

    def write_feedback(owner: str, name: str, data: bytes) -> None:
        artifacts.put_bytes(artifacts.key_for(owner, "sectra", name), data, "application/json")

    return SectraService(
        config,
        run_store(),
        launcher_from_settings(config),
        OutboundPolicy.from_settings(config),
        feedback_writer=write_feedback,
    )


@lru_cache(maxsize=1)
def techcyte_service() -> TechcyteService:
    from slidebridge.launcher import launcher_from_settings  # noqa: PLC0415
    from slidebridge.outbound import OutboundPolicy  # noqa: PLC0415
    from slidebridge.vendors.techcyte_service import TechcyteService  # noqa: PLC0415

    config = settings()
    return TechcyteService(config, run_store(), launcher_from_settings(config), OutboundPolicy.from_settings(config))


def reset() -> None:
    """Forget cached collaborators (tests change settings between cases)."""
    from slidebridge.settings import get_settings  # noqa: PLC0415

    get_settings.cache_clear()
    run_store.cache_clear()
    platform_service.cache_clear()
    webhook_keys.cache_clear()
    sectra_service.cache_clear()
    techcyte_service.cache_clear()
