"""S3 staging for EC2 machines: a private bucket, presigned GET URLs for the files, a presigned POST as sink.

The bucket blocks every form of public access and expires objects after a few days (lifecycle rule), so
staging leaves nothing that costs money for long. Machines need no AWS credentials: every URL is presigned,
with SigV4 against the bucket's regional endpoint (``s3_config``).

The sink is one presigned POST per machine, handed to it over the agent API once it serves (never in the
user-data, which every machine of a cluster shares and which outlives it in the launch template): its key
condition is ``starts-with clusters/<cluster>/sink/<machine id>/`` (S3 fills in ``${filename}``, the flush's own
name), so a machine, or whoever reads its form, can write that machine's flushes and nobody else's, and it expires
when the machine's backstop has powered it off. ``fetch_sink`` brings the objects back, unpacked and checked
(``sink_fetch``), for ``rawvm logs``.

The default bucket name is predictable (account ids are not secret), so another account could create it first
("bucket sniping"). Every S3 call the laptop makes therefore carries ``ExpectedBucketOwner`` (``expect_owner``
adds it on the client), and S3 answers 403 for a bucket of another account instead of storing the code there.
Presigned GETs cannot carry it (it would become a signed header the agent does not send); what they fetch is
checked against the sha256 in the user-data or the bundle's manifest instead. The bucket refuses plain HTTP
(a bucket policy) and encrypts at rest (SSE-S3, asserted rather than assumed).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

from rawvm.errors import RawvmError, UsageError
from rawvm.files import sha256_file
from rawvm.providers.sink_fetch import FlushCache, named_flush_pattern

EXPIRE_DAYS = 3
# Presigned GETs expire when no machine can need them any more. The agent wheel (bootstrap.sh, which cloud-init
# runs once per instance) is fetched during the first boot only: an hour covers a slow one. The bundle is fetched
# by the agent at its first boot and again at any later boot whose install had not finished (a reboot), which
# can happen until the backstop powers the machine off: the launch asks for max_lifetime + grace.
BOOT_URL_SECONDS = 3600
MAX_URL_SECONDS = 7 * 24 * 3600  # SigV4's limit
SINK_URL_SECONDS = 7 * 24 * 3600  # SigV4's maximum: the sink is written when the machine stops
_MACHINE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # an instance id, as one key segment
SINK_MAX_BYTES = 5 * 1024**3  # S3's limit for one POST upload
LIFECYCLE_RULE_ID = "rawvm-expire-staged-files"
OWNER_PARAM = "ExpectedBucketOwner"
_MISSING = ("404", "NoSuchBucket", "NotFound")
_FORBIDDEN = ("403", "AccessDenied", "Forbidden")


def default_bucket_name(account_id: str, region: str) -> str:
    return f"rawvm-staging-{account_id}-{region}"


def s3_config(*, path_style: bool = False) -> Config:
    """How the S3 client must sign what machines fetch and upload: SigV4 (S3 refuses SigV2 in newer regions
    and for KMS objects) at the regional endpoint (``bucket.s3.<region>.amazonaws.com``; the global one
    answers a new bucket outside us-east-1 with a redirect a presigned request cannot follow). Path style
    for a custom endpoint (a test server) or a bucket name with dots (its TLS certificate would not match)."""
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "virtual", "us_east_1_regional_endpoint": "regional"},
    )


def expect_owner(s3: Any, account: Callable[[], str]) -> None:
    """Make every S3 call of ``s3`` that accepts ``ExpectedBucketOwner`` carry ``account()``: paginators and
    the transfer manager's own calls included, which a keyword at each call site would miss. ``account`` is
    asked on the first such call only, so presigning (which needs no AWS) stays offline."""
    owner: list[str] = []

    def add_owner(params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        shape = model.input_shape
        if context.get("is_presign_request") or shape is None or OWNER_PARAM not in shape.members:
            return
        if not owner:
            owner.append(account())
        params.setdefault(OWNER_PARAM, owner[0])

    s3.meta.events.register("provide-client-params.s3", add_owner, unique_id="rawvm-expected-bucket-owner")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _not_ours(bucket: str) -> RawvmError:
    """S3 answers a HEAD with ExpectedBucketOwner of another account with a bare 403 (no body to tell it from
    missing permissions): the likely cause is the name's being taken."""
    return RawvmError(
        f"the staging bucket {bucket} belongs to another AWS account: choose another with rawvm setup aws --bucket"
    )


def tls_only_policy(bucket: str, partition: str = "aws") -> str:
    """A bucket policy that refuses any request over plain HTTP or TLS older than 1.2. A presigned URL's
    signature does not cover the scheme, so without it the same URL would also work over http://."""
    arn = f"arn:{partition}:s3:::{bucket}"
    resources = [arn, f"{arn}/*"]
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": resources}
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "rawvm-deny-plain-http", **deny, "Condition": {"Bool": {"aws:SecureTransport": "false"}}},
                {"Sid": "rawvm-deny-old-tls", **deny, "Condition": {"NumericLessThan": {"s3:TlsVersion": "1.2"}}},
            ],
        }
    )


def ensure_bucket(s3: Any, bucket: str, region: str) -> bool:
    """Create the staging bucket when missing and (re)apply its settings; True when it was created."""
    created = False
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) in _FORBIDDEN:
            raise _not_ours(bucket) from None
        if _code(exc) not in _MISSING:
            raise RawvmError(
                f"S3 bucket {bucket} exists but is not usable ({_code(exc)}); pick another --bucket"
            ) from None
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        s3.create_bucket(**kwargs)
        created = True
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    sse_s3 = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [sse_s3]})
    s3.put_bucket_policy(Bucket=bucket, Policy=tls_only_policy(bucket, s3.meta.partition))
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": LIFECYCLE_RULE_ID,
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "Expiration": {"Days": EXPIRE_DAYS},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            ]
        },
    )
    return created


class S3Stager:
    """Uploads a cluster's files under ``clusters/<cluster>/`` and hands out presigned URLs."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    def _key(self, cluster: str, name: str) -> str:
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise UsageError(f"staged file name {name!r} must be a relative path inside the bundle")
        return f"clusters/{cluster}/files/{name}"

    def check_bucket(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise RawvmError(f"staging bucket {self.bucket} does not exist: run 'rawvm setup aws' first") from None
            if _code(exc) in _FORBIDDEN:
                raise _not_ours(self.bucket) from None
            raise RawvmError(f"staging bucket {self.bucket} is not usable: {_code(exc)}") from None

    def stage(self, cluster: str, files: Sequence[tuple[str, Path]], *, valid_s: float = 0.0) -> dict[str, str]:
        """Upload each file unless the same bytes are there already; name -> presigned GET URL, valid ``valid_s``
        (0: ``BOOT_URL_SECONDS``)."""
        expires = int(min(max(valid_s, BOOT_URL_SECONDS), MAX_URL_SECONDS))
        self.check_bucket()
        urls: dict[str, str] = {}
        for name, path in files:
            key = self._key(cluster, name)  # under files_prefix(cluster)
            sha = sha256_file(path)
            if self._storedsha256_file(key) != sha:
                self.s3.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha}})
            urls[name] = self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
            )
        return urls

    def _storedsha256_file(self, key: str) -> str:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return ""
        return str(head.get("Metadata", {}).get("sha256", ""))

    @staticmethod
    def files_prefix(cluster: str) -> str:
        return f"clusters/{cluster}/files/"

    def delete_files(self, cluster: str) -> int:
        """Delete the cluster's staged files (not its flushed logs); how many. A missing bucket has none."""
        deleted = 0
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.files_prefix(cluster)
            )
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:  # a page holds at most 1000 keys, DeleteObjects' limit
                    answer = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    if errors := answer.get("Errors"):
                        raise RawvmError(f"cannot delete staged file {errors[0].get('Key')}: {errors[0].get('Code')}")
                    deleted += len(keys)
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise
        return deleted

    @staticmethod
    def sink_prefix(cluster: str) -> str:
        return f"clusters/{cluster}/sink/"

    def sink_url(self, cluster: str, label: str = "sink") -> str:
        """A presigned PUT URL for ``clusters/<cluster>/sink/<label>.tar.gz``: one object, so one machine.

        No ContentType: SigV4 would sign the header, and the agent's PUT sends none (S3 would answer
        SignatureDoesNotMatch)."""
        key = f"{self.sink_prefix(cluster)}{label}.tar.gz"
        url: str = self.s3.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=SINK_URL_SECONDS
        )
        return url

    def fetch_sink(self, cluster: str, dest: Path) -> int:
        """Download and unpack every flush under the cluster's sink prefix into ``dest`` (the local sink's
        layout), skipping those already there (same key and ETag). Returns how many it unpacked.

        A flush is ``<prefix><machine id>/<cluster>-<label>-<UTC>.tar.gz`` (or, from before per-machine forms,
        without the machine segment), and may unpack only into the directory its file name names."""
        cache = FlushCache(cluster, dest)
        fetched = 0
        prefix = self.sink_prefix(cluster)
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                key, etag = str(item["Key"]), str(item.get("ETag", "")).strip('"')
                pattern = named_flush_pattern(cluster, key.rpartition("/")[2])
                if pattern is None or key[len(prefix) :].count("/") > 1 or cache.has(key, etag):
                    continue  # not a flush (or not where one goes), or already here
                if cache.too_big(key, int(item.get("Size", 0))):
                    continue
                dest.mkdir(parents=True, exist_ok=True, mode=0o700)
                with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as scratch:
                    archive = Path(scratch) / "flush.tar.gz"
                    self.s3.download_file(self.bucket, key, str(archive))
                    fetched += cache.unpack(key, etag, archive, pattern)
        cache.raise_errors()
        return fetched

    def sink_post(self, cluster: str, machine: str, expires_in: int) -> tuple[str, dict[str, str]]:
        """A presigned POST (URL, form fields) for ONE machine's flushes: keys starting
        ``clusters/<cluster>/sink/<machine>/`` (S3 fills in the file name the agent sends), nothing else, at most
        ``SINK_MAX_BYTES``, valid ``expires_in`` seconds (the machine's life and its backstop's grace)."""
        if not _MACHINE_KEY.fullmatch(machine):
            raise UsageError(f"machine id {machine!r} cannot name a sink key")
        prefix = f"{self.sink_prefix(cluster)}{machine}/"
        post = self.s3.generate_presigned_post(
            self.bucket,
            prefix + "${filename}",  # botocore adds the condition ["starts-with", "$key", prefix] itself
            Conditions=[["starts-with", "$key", prefix], ["content-length-range", 0, SINK_MAX_BYTES]],
            ExpiresIn=max(1, min(expires_in, SINK_URL_SECONDS)),
        )
        return str(post["url"]), {str(k): str(v) for k, v in post["fields"].items()}
