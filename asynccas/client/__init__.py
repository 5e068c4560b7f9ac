"""An async client for any REAPI cache, for build tools that talk to remote caches."""

from asynccas.client.cas import CasClient, Progress, ProgressCallback
from asynccas.client.merkle import MerkleTree, build_tree

__all__ = ["CasClient", "MerkleTree", "Progress", "ProgressCallback", "build_tree"]
