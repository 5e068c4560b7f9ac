"""REAPI's message types, public: what library users pass to and get from asynccas (for example
``CasClient.get_action_result`` returns an ``ActionResult``), without reaching into
``asynccas._proto``. The REAPI ``Digest`` message is ``DigestMessage`` here, beside asynccas's
own validated ``asynccas.Digest`` (``Digest.from_proto`` and ``to_proto`` convert)."""

from asynccas._proto.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Action,
    ActionResult,
    Command,
    Directory,
    DirectoryNode,
    ExecutedActionMetadata,
    FileNode,
    OutputDirectory,
    OutputFile,
    OutputSymlink,
    ServerCapabilities,
    SymlinkNode,
    Tree,
)
from asynccas._proto.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Digest as DigestMessage,
)

__all__ = [
    "Action",
    "ActionResult",
    "Command",
    "DigestMessage",
    "Directory",
    "DirectoryNode",
    "ExecutedActionMetadata",
    "FileNode",
    "OutputDirectory",
    "OutputFile",
    "OutputSymlink",
    "ServerCapabilities",
    "SymlinkNode",
    "Tree",
]
