"""asynccas's domain errors: every layer raises these, and only server/errors.py maps them to gRPC.

CasError
├── InvalidArgument              INVALID_ARGUMENT
│   ├── InvalidDigest            a hash/size/function that is not a valid digest
│   ├── InvalidResourceName      a ByteStream resource name of no known form
│   ├── DigestMismatch           data that does not hash to (or is not the size of) its digest
│   ├── BatchTooLarge            a batch RPC over max_batch_total_size_bytes
│   └── UnsupportedFeature       a compressor or digest function this server does not offer
├── NotFound                     NOT_FOUND
│   ├── BlobNotFound             a blob absent from the CAS
│   └── ActionResultNotFound     no (complete) cached result for an action
├── OutOfRange                   OUT_OF_RANGE: read offsets outside the blob
├── UploadConflict               ABORTED: a write offset that does not continue the upload
├── StorageFull                  RESOURCE_EXHAUSTED: no room to store
├── Overloaded                   RESOURCE_EXHAUSTED: too much in progress (e.g. uploads); retry
├── DeadlineExceeded             DEADLINE_EXCEEDED: a backend (e.g. a remote CAS) did not answer in time
│   └── UploadStalled            an upload stream that stopped sending data
├── BackendUnavailable           UNAVAILABLE: a backend (disk, database, remote) failed; retry
├── Unauthenticated              UNAUTHENTICATED: no credentials, or ones that do not verify
└── PermissionDenied             PERMISSION_DENIED: a known caller without the right to do this

ConfigurationError (a ValueError, not a CasError): a storage graph or option that cannot work,
raised while a server is set up, before any request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asynccas.digest import Digest


class CasError(Exception):
    """Base of every error asynccas raises on purpose; the message is shown to clients."""


class InvalidArgument(CasError):
    pass


class InvalidDigest(InvalidArgument):
    pass


class InvalidResourceName(InvalidArgument):
    pass


class DigestMismatch(InvalidArgument):
    pass


class BatchTooLarge(InvalidArgument):
    pass


class UnsupportedFeature(InvalidArgument):
    pass


class NotFound(CasError):
    pass


class BlobNotFound(NotFound):
    def __init__(self, digest: Digest) -> None:
        super().__init__(f"blob {digest} is not in the CAS")
        self.digest = digest


class ActionResultNotFound(NotFound):
    pass


class OutOfRange(CasError):
    pass


class UploadConflict(CasError):
    pass


class StorageFull(CasError):
    pass


class Overloaded(CasError):
    pass


class DeadlineExceeded(CasError):
    pass


class UploadStalled(DeadlineExceeded):
    pass


class BackendUnavailable(CasError):
    pass


class Unauthenticated(CasError):
    pass


class PermissionDenied(CasError):
    pass


class ConfigurationError(ValueError):
    """A storage graph or option that cannot work, found when the server is set up (not a
    gRPC error: no request is involved)."""
