"""Which GPUs this machine has, and how busy they are.

Tried in order, each failure explained in one plain log line (never a traceback):

1. NVML (``nvidia-ml-py``, module ``pynvml``): name, UUID, and per report memory used/total
   and utilisation.
2. ``nvidia-smi -L``: index, name and UUID of each GPU (no live figures).
3. ``CUDA_VISIBLE_DEVICES`` alone: one GPU per listed device, known only by that token.
4. None: a CPU host.

A set ``CUDA_VISIBLE_DEVICES`` is also a restriction on what 1. and 2. found, read the way
CUDA reads it: indexes or ``GPU-`` UUID prefixes, the list ending at the first token it
cannot use, and an empty value meaning no GPU. Workers are pinned by UUID where one is known
(``Gpu.device``), so the pinning does not depend on CUDA's device order.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Any

import msgspec

from tokenhive.schemas.messages import GpuInfo

log = logging.getLogger("tokenhive.node")

NVIDIA_SMI_TIMEOUT_S = 10.0
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
_SMI_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: ([^)\s]+)\)\s*$")
_MIB = 1024 * 1024


class Gpu(msgspec.Struct, frozen=True):
    index: int  # as the host numbers it (NVML / nvidia-smi), else the listed index
    device: str  # what CUDA_VISIBLE_DEVICES takes for it: the UUID when known
    name: str = ""
    uuid: str = ""


class Discovery:
    """The GPUs found and where from; ``sample`` reads live figures when NVML is there."""

    def __init__(self, gpus: list[Gpu], source: str, nvml: Any = None) -> None:
        self.gpus = gpus
        self.source = source  # "nvml" | "nvidia-smi" | "CUDA_VISIBLE_DEVICES" | "none"
        self._nvml = nvml  # the pynvml module, initialised, when source == "nvml"
        self._sample_failed = False
        self._handles: dict[str, Any] = {}  # uuid -> NVML device handle

    def sample(self, pinned: dict[int, list[str]]) -> list[GpuInfo]:
        """One GpuInfo per GPU with the worker ids pinned to it; memory and utilisation
        from NVML when it is the source (blocking calls of a few ms: run it off the loop)."""
        out = []
        for gpu in self.gpus:
            info = GpuInfo(index=gpu.index, name=gpu.name, uuid=gpu.uuid,
                           workers=list(pinned.get(gpu.index, [])))
            if self._nvml is not None:
                self._read_nvml(gpu, info)
            out.append(info)
        return out

    def _read_nvml(self, gpu: Gpu, info: GpuInfo) -> None:
        nvml = self._nvml
        try:
            handle = self._handles.get(gpu.uuid)
            if handle is None:
                handle = self._handles[gpu.uuid] = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            info.memory_used_mb = round(memory.used / _MIB, 1)
            info.memory_total_mb = round(memory.total / _MIB, 1)
        except nvml.NVMLError as exc:
            self._failed_once(f"NVML could not read GPU {gpu.index}'s memory ({exc})")
            return
        try:
            info.utilization_pct = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            pass  # not every GPU reports utilisation (NotSupported): left unknown

    def _failed_once(self, message: str) -> None:
        if not self._sample_failed:
            self._sample_failed = True
            log.warning("%s; its reports carry no memory figures from now on", message)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None


def discover(env: dict[str, str] | None = None) -> Discovery:
    """This machine's GPUs (see the module docstring for the order); never raises."""
    env = dict(os.environ if env is None else env)
    visible = env.get(VISIBLE_ENV)
    found = _from_nvml()
    smi = _from_nvidia_smi(env) if found is None else None
    if found is not None:
        discovery = _restricted(Discovery(found[0], "nvml", found[1]), visible)
    elif smi is not None:
        discovery = _restricted(Discovery(smi, "nvidia-smi"), visible)
    elif visible is not None:
        discovery = Discovery(from_visible_list(visible), VISIBLE_ENV)
        log.info("using %s=%r as this host's GPUs (no NVML, no nvidia-smi: no names or "
                 "memory figures)", VISIBLE_ENV, visible)
    else:
        discovery = Discovery([], "none")
    if not discovery.gpus:
        log.info("no GPU found: workers run on the CPU")
    return discovery


def _restricted(discovery: Discovery, visible: str | None) -> Discovery:
    if visible is None:
        return discovery
    kept = restrict(discovery.gpus, visible)
    if len(kept) < len(discovery.gpus):
        log.info("%s=%r: using %d of the %d GPUs %s found", VISIBLE_ENV, visible, len(kept),
                 len(discovery.gpus), discovery.source)
    discovery.gpus = kept
    return discovery


def _from_nvml() -> tuple[list[Gpu], Any] | None:
    try:
        import pynvml
    except ImportError:
        log.info("NVML unavailable (nvidia-ml-py is not installed); trying nvidia-smi -L")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable (%s); trying nvidia-smi -L", exc)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            gpus.append(Gpu(index=i, device=uuid, name=_text(pynvml.nvmlDeviceGetName(handle)),
                            uuid=uuid))
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs (%s); trying nvidia-smi -L", exc)
        pynvml.nvmlShutdown()
        return None
    return gpus, pynvml


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _from_nvidia_smi(env: dict[str, str]) -> list[Gpu] | None:
    binary = shutil.which("nvidia-smi", path=env.get("PATH"))
    if binary is None:
        log.info("nvidia-smi is not on PATH")
        return None
    try:
        done = subprocess.run([binary, "-L"], capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi -L did not run (%s)", exc)
        return None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        log.warning("nvidia-smi -L failed (exit code %d: %s)", done.returncode,
                    why[0] if why else "no output")
        return None
    return parse_nvidia_smi_list(done.stdout)


def parse_nvidia_smi_list(text: str) -> list[Gpu]:
    """``GPU 0: NVIDIA H200 (UUID: GPU-...)`` lines; MIG lines under a GPU are skipped."""
    gpus = []
    for line in text.splitlines():
        match = _SMI_LINE.match(line.strip())
        if match:
            uuid = match.group(3)
            gpus.append(Gpu(index=int(match.group(1)), device=uuid, name=match.group(2),
                            uuid=uuid))
    return gpus


def visible_tokens(visible: str) -> list[str]:
    """The devices a CUDA_VISIBLE_DEVICES value lists, as CUDA reads it: up to the first
    token that is neither an index nor a UUID (``-1`` hides everything after it)."""
    tokens: list[str] = []
    for raw in visible.split(","):
        token = raw.strip()
        if not (token.isdigit() or token.startswith(("GPU-", "MIG-"))):
            break
        if token not in tokens:
            tokens.append(token)
    return tokens


def from_visible_list(visible: str) -> list[Gpu]:
    """One Gpu per listed device, pinned by the token itself."""
    gpus = []
    for position, token in enumerate(visible_tokens(visible)):
        gpus.append(Gpu(index=int(token) if token.isdigit() else position, device=token))
    return gpus


def restrict(gpus: list[Gpu], visible: str) -> list[Gpu]:
    """The GPUs among ``gpus`` that CUDA_VISIBLE_DEVICES lets through, in its order.

    An index means the host's numbering (NVML's, which follows the PCI bus: the same as
    CUDA's unless GPUs of different speeds make CUDA put the fastest first)."""
    kept: list[Gpu] = []
    for token in visible_tokens(visible):
        if token.startswith("MIG-"):
            log.warning("%s lists MIG device %s: the node agent pins whole GPUs only; "
                        "ignored", VISIBLE_ENV, token)
            continue
        match = next((g for g in gpus if (token.isdigit() and g.index == int(token))
                      or (not token.isdigit() and g.uuid.startswith(token))), None)
        if match is None:
            log.warning("%s lists %s, which this host does not have; the devices after it "
                        "are ignored too, as CUDA does", VISIBLE_ENV, token)
            break
        if match not in kept:
            kept.append(match)
    return kept
