"""S3 settings from the usual AWS environment variables, for backends that do not read them all themselves.

fsspec/s3fs (Zarr) goes through botocore, which reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` on its own. TileDB (SOMA) reads the credentials but not a custom
endpoint, so an S3-compatible server (MinIO, Ceph, a local test server) would be unreachable without this.
Nothing here is ever logged: the values go straight into the backend's configuration.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse


def tiledb_s3_config_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """TileDB ``vfs.s3.*`` settings for ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) and the region.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        A dict for a TileDB / SOMA context config; empty when no endpoint or region is set.
    """
    env = os.environ if environ is None else environ
    config: dict[str, str] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        config["vfs.s3.endpoint_override"] = parsed.netloc
        config["vfs.s3.scheme"] = parsed.scheme or "https"
        # Custom servers rarely resolve bucket sub-domains: address buckets by path instead.
        config["vfs.s3.use_virtual_addressing"] = "false"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        config["vfs.s3.region"] = region
    return config
