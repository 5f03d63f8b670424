"""S3 for slides in transit and output artifacts: uploads with checksums, presigned URLs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import boto3

from slidebridge.checksums import crc32c_b64_of_file
from slidebridge.runs import ArtifactMetadata

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class ArtifactStore:
    """Output artifacts under ``<prefix><run_id>/<item_id>/<file>`` in the data bucket."""

    def __init__(self, bucket: str, *, prefix: str = "artifacts/", client: S3Client | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self._client = client

    @property
    def client(self) -> S3Client:
        # Lazily: a handler's import must not build AWS clients.
        if self._client is None:
            self._client = boto3.client("s3")
        return self._client

    def key_for(self, run_id: str, item_id: str, filename: str) -> str:
        return f"{self.prefix}{run_id}/{item_id}/{filename}"

    def upload(self, path: Path, key: str, media_type: str) -> ArtifactMetadata:
        """Stream a file to S3 and describe it as the SDK expects (media type, size, CRC32C)."""
        checksum = crc32c_b64_of_file(path)
        # upload_file streams in parts; the object carries our checksum so S3 can be audited against it.
        self.client.upload_file(
            str(path),
            self.bucket,
            key,
            ExtraArgs={"ContentType": media_type, "Metadata": {"crc32c": checksum}},
        )
        return ArtifactMetadata(media_type=media_type, size_bytes=path.stat().st_size, checksum_base64_crc32c=checksum)

    def put_bytes(self, key: str, data: bytes, media_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=media_type)

    def presigned_get(self, key: str, expires_in_s: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in_s
        )
        return url

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            if chunk:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )

    def get_bytes(self, key: str) -> bytes:
        """A small object's content (e.g. a stored vendor result), read whole."""
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body
