"""The REAPI Merkle tree of a local directory: one Directory message per directory, children
sorted by name (as UTF-8 bytes), files with their executable bit, symlinks as SymlinkNodes.

The same tree gives the same root digest as other REAPI clients. Files are hashed by
streaming them; nothing is held whole except the (small) Directory messages.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from asynccas._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from asynccas.digest import DEFAULT_FUNCTION, Digest, DigestFunction

_READ_CHUNK = 1024 * 1024


def digest_of_file(path: Path, function: DigestFunction = DEFAULT_FUNCTION) -> Digest:
    hasher = function.new_hasher()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return Digest(hasher.hexdigest(), size, function)


@dataclass
class MerkleTree:
    """A directory's tree: its root digest, every Directory blob, and where each file lives."""

    root: Digest
    directories: dict[Digest, bytes] = field(default_factory=dict)
    files: dict[Digest, Path] = field(default_factory=dict)

    @property
    def total_file_bytes(self) -> int:
        return sum(d.size_bytes for d in self.files)


def build_tree(root: Path, function: DigestFunction = DEFAULT_FUNCTION) -> MerkleTree:
    """Walk ``root`` (not following symlinks) and build its Merkle tree. Blocking: run in a thread."""
    tree = MerkleTree(root=Digest.empty(function))
    tree.root = _directory(root, tree, function)
    return tree


def _name_key(entry: os.DirEntry[str]) -> bytes:
    return entry.name.encode("utf-8", "surrogateescape")


def _directory(path: Path, tree: MerkleTree, function: DigestFunction) -> Digest:
    message = re_pb2.Directory()
    with os.scandir(path) as scan:
        entries = sorted(scan, key=_name_key)
    for entry in entries:
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            message.symlinks.add(name=entry.name, target=os.readlink(entry.path))
        elif stat.S_ISDIR(info.st_mode):
            child = _directory(Path(entry.path), tree, function)
            message.directories.add(name=entry.name, digest=child.to_proto())
        elif stat.S_ISREG(info.st_mode):
            digest = digest_of_file(Path(entry.path), function)
            tree.files.setdefault(digest, Path(entry.path))
            message.files.add(
                name=entry.name,
                digest=digest.to_proto(),
                is_executable=bool(info.st_mode & stat.S_IXUSR),
            )
        # Sockets, FIFOs and devices have no REAPI representation and are skipped.
    data = message.SerializeToString(deterministic=True)
    digest = Digest.of(data, function)
    tree.directories[digest] = data
    return digest
