"""Hosts for multi-node tests: Linux network namespaces joined by veth links to one bridge.

``Hosts.make(["head", "n1", "n2"])`` gives each name a namespace with its own address on
198.18.N.0/24 (``hosts.address("n1")``; RFC 2544 sets that range aside for benchmarks, so no
real network on the host is shadowed), and the test's own (root) namespace one more on the
same bridge, so the test process talks to them over real TCP between network stacks. Needs
root and iproute2; ``Hosts.unavailable()`` says why not, so a test can skip with the reason
or fall back to loopback. Everything is removed on ``close`` (namespaces die with their
links; processes left inside are killed first).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid


def kill_all(pids: list[int]) -> list[int]:
    """SIGKILL all of ``pids`` at once (those already gone are skipped); returns them."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    def __init__(self, tag: str, subnet: int) -> None:
        self.tag = tag  # short and unique: interface names are capped at 15 chars
        self.subnet = subnet
        self.names: list[str] = []
        self._bridge = f"thbr{tag}"

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "iproute2 (`ip`) is not installed"
        probe = f"thprobe{uuid.uuid4().hex[:6]}"
        try:
            _ip("netns", "add", probe)
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"cannot create a network namespace: {exc}"
        _ip("netns", "del", probe)
        return None

    @classmethod
    def make(cls, names: list[str]) -> Hosts:
        tag = uuid.uuid4().hex[:5]
        hosts = cls(tag, subnet=int(tag[:2], 16) % 200 + 20)
        try:
            _ip("link", "add", hosts._bridge, "type", "bridge")
            _ip("addr", "add", f"{hosts._root_address()}/24", "dev", hosts._bridge)
            _ip("link", "set", hosts._bridge, "up")
            for i, name in enumerate(names, start=1):
                hosts._add(name, i)
        except BaseException:
            hosts.close()
            raise
        return hosts

    def _root_address(self) -> str:
        return f"198.18.{self.subnet}.254"

    def namespace(self, name: str) -> str:
        return f"th{self.tag}{name}"

    def address(self, name: str) -> str:
        return f"198.18.{self.subnet}.{self.names.index(name) + 1}"

    def _add(self, name: str, index: int) -> None:
        ns = self.namespace(name)
        inner, outer = f"th{self.tag}i{index}", f"th{self.tag}o{index}"
        _ip("netns", "add", ns)
        self.names.append(name)
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self._bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"198.18.{self.subnet}.{index}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def run_in(self, name: str) -> list[str]:
        """The argv prefix that runs a command inside ``name``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(name)]

    def pids(self, name: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.namespace(name)],
                              capture_output=True, text=True, timeout=10)
        return [int(p) for p in done.stdout.split()]

    def kill_all(self, name: str) -> list[int]:
        """SIGKILL every process in ``name``'s namespace at once: the host is gone."""
        return kill_all(self.pids(name))

    def close(self) -> None:
        for name in self.names:
            self.kill_all(name)
            subprocess.run(["ip", "netns", "del", self.namespace(name)],
                           capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self._bridge], capture_output=True, timeout=10)
