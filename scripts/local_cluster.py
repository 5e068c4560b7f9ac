"""A local asynccas cluster on loopback: Redis (index, action cache, blob-info), SeaweedFS
(S3 object storage for the blobs) and stateless asynccas frontends over them.

    python scripts/local_cluster.py up [--dir DIR] [--frontends 2] [--max-size 10G]
                                       [--isolation shared|per-instance]
    python scripts/local_cluster.py down [--dir DIR]

``up`` starts everything in the background on free ports and prints one line per frontend,
``frontend grpc://127.0.0.1:PORT``, on stdout (the rest goes to stderr); the processes run on
after it exits, their logs and data in DIR (default ``.cluster``). ``down`` stops them all and
removes DIR. ``make cluster`` and ``make cluster-down`` run these.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.redis_servers import RedisServer, free_port
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

STATE = "cluster.json"


def frontend_config(redis_url: str, s3_endpoint: str, max_size: str, isolation: str) -> str:
    """The configuration every frontend shares: they hold no state of their own."""
    text = f"""\
# Written by scripts/local_cluster.py: a stateless frontend over shared engines.
cas = "index"
max_size = "{max_size}"          # one budget for the cluster: the shared index's byte count
isolation = "{isolation}"

[storage.index]
type = "redis-index"
url = "{redis_url}"
storage = "objects"

[storage.objects]
type = "s3"
bucket = "asynccas"
endpoint = "{s3_endpoint}"
region = "us-east-1"
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
create_bucket = true

[action_cache]
type = "redis"
url = "{redis_url}"
"""
    if isolation == "per-instance":
        text += f'\n[blob_info]\ntype = "redis"\nurl = "{redis_url}"\n'
    return text


def up(directory: Path, frontends: int, max_size: str, isolation: str) -> int:
    state_file = directory / STATE
    if state_file.exists():
        print(f"a cluster is already up in {directory}: make cluster-down first", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.setsid()  # the processes outlive this command and the terminal's job control
    started: list[int] = []
    try:
        redis_server = RedisServer(directory / "redis", persistent=True)
        redis_server.start()
        assert redis_server.process is not None
        started.append(redis_server.process.pid)
        print(f"redis {redis_server.url}", file=sys.stderr)
        seaweedfs = SeaweedFS(directory / "seaweedfs")
        seaweedfs.start()
        assert seaweedfs.process is not None
        started.append(seaweedfs.process.pid)
        print(f"s3 {seaweedfs.endpoint} (SeaweedFS)", file=sys.stderr)
        config = directory / "frontend.toml"
        config.write_text(
            frontend_config(redis_server.url, seaweedfs.endpoint, max_size, isolation)
        )
        targets = []
        for number in range(frontends):
            process, target = start_frontend(directory, config, number)
            started.append(process.pid)
            targets.append(target)
    except BaseException:
        stop(*started)
        raise
    state_file.write_text(json.dumps({"pids": started, "frontends": targets}))
    for target in targets:
        print(f"frontend grpc://{target}", flush=True)
    return 0


def start_frontend(
    directory: Path, config: Path, number: int
) -> tuple[subprocess.Popen[bytes], str]:
    address = f"127.0.0.1:{free_port()}"
    log_path = directory / f"frontend-{number}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "asynccas.cli", "serve", "--config", str(config),
             "--address", address],
            stdout=log, stderr=subprocess.STDOUT, cwd=directory,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        text = log_path.read_text(errors="replace")
        if re.search(r"listening on ", text):
            return process, address
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process.pid)
            raise RuntimeError(f"frontend {number} did not start; its log:\n{text}")
        time.sleep(0.1)


def stop(*pids: int, timeout: float = 5) -> None:
    """SIGTERM to all, then SIGKILL to those still running after ``timeout`` seconds (a
    SeaweedFS takes ~25 s to stop gracefully; its data goes with the directory anyway)."""
    running = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            running.append(pid)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        running = [pid for pid in running if _alive(pid)]
        time.sleep(0.05)
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our child
        return finished == 0
    except ChildProcessError:  # not ours: ask whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def down(directory: Path) -> int:
    state_file = directory / STATE
    if not state_file.exists():
        print(f"no cluster is up in {directory}", file=sys.stderr)
        return 0
    state = json.loads(state_file.read_text())
    engines, frontends = state["pids"][:2], state["pids"][2:]
    stop(*frontends)  # first, so that nothing is acknowledged that the engines then lose
    stop(*engines)
    shutil.rmtree(directory)
    print(f"stopped {len(state['frontends'])} frontends, SeaweedFS and Redis", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, default=Path(".cluster"))
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--max-size", default="10G")
    parser.add_argument("--isolation", choices=("shared", "per-instance"), default="shared")
    args = parser.parse_args()
    directory = args.dir.resolve()
    if args.command == "up":
        return up(directory, args.frontends, args.max_size, args.isolation)
    return down(directory)


if __name__ == "__main__":
    sys.exit(main())
