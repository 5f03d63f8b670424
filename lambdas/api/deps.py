"""Process-wide collaborators for the routes, built lazily from settings on first use."""

from __future__ import annotations

from functools import lru_cache

from slidebridge.artifacts import ArtifactStore
from slidebridge.launcher import launcher_from_settings
from slidebridge.outbound import OutboundPolicy
from slidebridge.platform import PlatformService
from slidebridge.settings import get_settings
from slidebridge.store import RunStore
from slidebridge.vendors.sectra_service import SectraService
from slidebridge.vendors.techcyte_service import TechcyteService
from slidebridge.webhook_keys import WebhookKeys


@lru_cache(maxsize=1)
def run_store() -> RunStore:
    return RunStore(get_settings().table_name)


@lru_cache(maxsize=1)
def platform_service() -> PlatformService:
    settings = get_settings()
    return PlatformService(
        run_store(),
        ArtifactStore(settings.bucket_name, prefix=settings.artifacts_prefix),
        launcher_from_settings(settings),
        OutboundPolicy.from_settings(settings),
        artifact_url_ttl_s=settings.artifact_url_ttl_s,
        settings=settings,
    )


@lru_cache(maxsize=1)
def webhook_keys() -> WebhookKeys:
    return WebhookKeys(get_settings())


@lru_cache(maxsize=1)
def sectra_service() -> SectraService:
    settings = get_settings()
    artifacts = ArtifactStore(settings.bucket_name, prefix=settings.feedback_prefix)

    def write_feedback(owner: str, name: str, data: bytes) -> None:
        artifacts.put_bytes(artifacts.key_for(owner, "sectra", name), data, "application/json")

    return SectraService(
        settings,
        run_store(),
        launcher_from_settings(settings),
        OutboundPolicy.from_settings(settings),
        feedback_writer=write_feedback,
    )


@lru_cache(maxsize=1)
def techcyte_service() -> TechcyteService:
    settings = get_settings()
    return TechcyteService(
        settings, run_store(), launcher_from_settings(settings), OutboundPolicy.from_settings(settings)
    )


def reset() -> None:
    """Forget cached collaborators (tests change settings between cases)."""
    get_settings.cache_clear()
    run_store.cache_clear()
    platform_service.cache_clear()
    webhook_keys.cache_clear()
    sectra_service.cache_clear()
    techcyte_service.cache_clear()
