"""Regenerate asynccas/_proto from protos/ (``make protos``), or check it is current.

protoc names generated modules after the .proto paths (``build.bazel...``), which
would make them top-level packages. We generate into a scratch directory and move
every module path we own under ``asynccas._proto`` so the package is
self-contained. ``google.rpc`` and friends come from googleapis-common-protos.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.rpc import status_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "asynccas" / "_proto"
OWN_PACKAGES = ("build", "google.bytestream")
PACKAGE = "asynccas._proto"

# Only dotted names ending in a generated module (``..._pb2``/``..._pb2_grpc``) are
# module references; proto full names in comments never end that way.
_MODULE_REF = re.compile(
    r"(?<![\w.])((?:"
    + "|".join(re.escape(p) for p in OWN_PACKAGES)
    + r")(?:\.\w+)*?\.\w+_pb2(?:_grpc)?)\b"
)
_FROM_IMPORT = re.compile(
    r"^(\s*from )((?:" + "|".join(re.escape(p) for p in OWN_PACKAGES) + r")(?:\.\w+)*)( import )",
    re.MULTILINE,
)


def _rewrite(text: str) -> str:
    text = _FROM_IMPORT.sub(lambda m: f"{m.group(1)}{PACKAGE}.{m.group(2)}{m.group(3)}", text)
    return _MODULE_REF.sub(lambda m: f"{PACKAGE}.{m.group(1)}", text)


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(status_pb2.__file__).parent.parent.parent
    bin_dir = Path(sys.executable).parent  # where pip put mypy-protobuf's plugins
    with tempfile.TemporaryDirectory() as scratch:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"-I{PROTO_DIR}", f"-I{well_known}", f"-I{googleapis}",
            f"--python_out={scratch}", f"--grpc_python_out={scratch}",
            f"--mypy_out=quiet:{scratch}", f"--mypy_grpc_out=quiet:{scratch}",
            *protos,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=PROTO_DIR)
        scratch_path = Path(scratch)
        for path in sorted(scratch_path.rglob("*")):
            if path.is_dir():
                continue
            target = out_dir / path.relative_to(scratch_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_rewrite(path.read_text()))
    for directory in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")


def _differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    # dircmp compares shallowly by stat; compare contents for the common files.
    found += [f for f in cmp.same_files if (a / f).read_bytes() != (b / f).read_bytes()]
    for sub in cmp.common_dirs:
        found += [f"{sub}/{f}" for f in _differences(a / sub, b / sub)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as fresh:
            generate(Path(fresh))
            stale = _differences(Path(fresh), OUT_DIR)
        if stale:
            print("asynccas/_proto is stale; run `make protos`:", *stale, sep="\n  ")
            return 1
        print("asynccas/_proto matches protos/")
        return 0
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    generate(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
