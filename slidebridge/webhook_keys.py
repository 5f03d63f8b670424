"""The per-deployment secret path keys of the vendor webhooks (DESIGN §6).

Vendor webhooks carry no signature, so the URL's key segment is the credential. In AWS the keys
live in one Secrets Manager secret (JSON ``{"sectra": …, "techcyte": …}``), re-read every few
minutes so a rotation takes effect without a deploy; locally they come from the settings.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import TYPE_CHECKING, Literal

import boto3

from slidebridge.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

Vendor = Literal["sectra", "techcyte"]
_CACHE_S = 300.0


class WebhookKeys:
    def __init__(self, settings: Settings, client: SecretsManagerClient | None = None) -> None:
        self.settings = settings
        self._client = client
        self._cached: dict[str, str] = {}
        self._read_at = 0.0

    @property
    def client(self) -> SecretsManagerClient:
        if self._client is None:
            self._client = boto3.client("secretsmanager")
        return self._client

    def _keys(self) -> dict[str, str]:
        if self.settings.webhook_keys_secret_arn is None:
            keys: dict[str, str] = {}
            if self.settings.sectra_webhook_key is not None:
                keys["sectra"] = self.settings.sectra_webhook_key.get_secret_value()
            if self.settings.techcyte_webhook_key is not None:
                keys["techcyte"] = self.settings.techcyte_webhook_key.get_secret_value()
            return keys
        if time.monotonic() - self._read_at > _CACHE_S or not self._cached:
            secret = self.client.get_secret_value(SecretId=self.settings.webhook_keys_secret_arn)
            loaded = json.loads(secret["SecretString"])
            self._cached = {k: str(v) for k, v in loaded.items() if isinstance(v, str) and v}
            self._read_at = time.monotonic()
        return self._cached

    def matches(self, vendor: Vendor, presented: str) -> bool:
        """Constant-time comparison; False when no key is configured for the vendor."""
        expected = self._keys().get(vendor)
        if not expected:
            return False
        return hmac.compare_digest(expected.encode(), presented.encode())
