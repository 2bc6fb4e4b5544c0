"""What this machine can run: TensorRT, CUDA, onnxruntime providers, llama.cpp GPU offload.

``vlmexport doctor`` (without a bundle) prints :func:`probe`. Every probe imports its
package lazily and reports "not installed" rather than failing; nothing here needs a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's feature flags in a /proc/cpuinfo text (x86 "flags", Arm "Features"); this
    machine's when ``cpuinfo`` is None (empty where it cannot be read, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def physical_cores(cpus: Iterable[int] | None = None, sysfs: str | os.PathLike = "/sys/devices/system/cpu",
                   quota: int | None = -1) -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on), hyper-threads
    counted once, at most ``quota`` (default: this process's cgroup CPU quota, e.g. ``docker run
    --cpus``; None: no cap): the onnxruntime and llama.cpp backends' default thread count. A core is one distinct
    ``thread_siblings_list`` in sysfs (the package and core ids where that is missing: core ids
    repeat across an Arm chip's clusters), so a VM's vCPUs without SMT siblings are a core each.
    Where the topology cannot be read every CPU counts; off Linux, half of them (two threads per
    core assumed)."""
    if quota == -1:
        quota = cgroup_cpu_quota()
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            return max(1, (os.cpu_count() or 2) // 2)
    cpus = sorted(cpus)
    cores: set = set()
    for c in cpus:
        topo = Path(sysfs) / f"cpu{c}" / "topology"
        try:
            cores.add((topo / "thread_siblings_list").read_text().strip())
        except OSError:
            try:
                cores.add(((topo / "physical_package_id").read_text().strip(),
                           (topo / "core_id").read_text().strip()))
            except OSError:
                cores = set(cpus)
                break
    n = max(1, len(cores))
    return min(n, quota) if quota else n


def cgroup_cpu_quota(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                     root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """CPUs this process's cgroup may use, rounded up (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None without a quota or where it cannot be read."""
    import math

    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.lstrip("/")
        try:
            if hierarchy == "0" and not controllers:  # v2: one hierarchy
                quota, period = (Path(root) / rel / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    return max(1, math.ceil(int(quota) / int(period)))
            elif "cpu" in controllers.split(","):
                for d in (Path(root) / controllers / rel, Path(root) / "cpu" / rel):
                    if (d / "cpu.cfs_quota_us").is_file():
                        quota = int((d / "cpu.cfs_quota_us").read_text())
                        period = int((d / "cpu.cfs_period_us").read_text())
                        if quota > 0 and period > 0:
                            return max(1, math.ceil(quota / period))
                        break
        except (OSError, ValueError):
            continue
    return None


def meminfo_bytes(key: str, meminfo: str | None = None) -> int | None:
    """A /proc/meminfo entry (``MemTotal``, ``MemAvailable``, ...) in bytes; None where it cannot be read."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name == key and value.split():
            return int(value.split()[0]) * 1024
    return None


@dataclass
class Environment:
    tensorrt: str | None = None
    cuda: str | None = None  # torch's CUDA runtime version, when torch has CUDA
    gpus: list[str] = field(default_factory=list)  # "name (sm_NN)"
    onnxruntime: str | None = None
    ort_providers: list[str] = field(default_factory=list)
    llamacpp: str | None = None
    llamacpp_gpu_offload: bool | None = None
    notes: list[str] = field(default_factory=list)

    def backends(self) -> dict[str, str]:
        """Backend -> what it can use here."""
        gpu = bool(self.gpus)
        out = {"torch": "cuda + cpu" if gpu else "cpu"}
        if self.onnxruntime:
            eps = [p.replace("ExecutionProvider", "") for p in self.ort_providers]
            out["onnxruntime"] = ", ".join(eps)
        else:
            out["onnxruntime"] = "not installed (pip install 'vlmexport[onnx]')"
        if self.tensorrt and gpu:
            out["tensorrt"] = f"engines (TensorRT {self.tensorrt})"
        else:
            why = "no TensorRT" if not self.tensorrt else "no CUDA GPU"
            out["tensorrt"] = f"profile on onnxruntime CPU only ({why}; engines need TensorRT and a GPU)"
        if self.llamacpp:
            out["llamacpp"] = "gpu offload" if self.llamacpp_gpu_offload else "cpu (this build has no GPU offload)"
        else:
            out["llamacpp"] = "not installed (pip install 'vlmexport[llamacpp]')"
        return out

    def to_dict(self) -> dict:
        return {"tensorrt": self.tensorrt, "cuda": self.cuda, "gpus": self.gpus, "onnxruntime": self.onnxruntime,
                "onnxruntime_providers": self.ort_providers, "llama_cpp": self.llamacpp,
                "llama_cpp_gpu_offload": self.llamacpp_gpu_offload, "backends": self.backends(), "notes": self.notes}


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as exc:  # noqa: BLE001 - a broken install is a finding, not a crash
        return f"broken ({type(exc).__name__}: {exc})"


def probe() -> Environment:
    env = Environment()
    env.tensorrt = _version("tensorrt")
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            env.cuda = torch.version.cuda
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                env.gpus.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        elif torch.version.cuda is None:
            env.notes.append("torch is a CPU build")
    env.onnxruntime = _version("onnxruntime")
    if env.onnxruntime and not env.onnxruntime.startswith("broken"):
        import onnxruntime as ort

        env.ort_providers = list(ort.get_available_providers())
    env.llamacpp = _version("llama_cpp")
    if env.llamacpp and not env.llamacpp.startswith("broken"):
        import llama_cpp

        fn = getattr(llama_cpp, "llama_supports_gpu_offload", None)
        env.llamacpp_gpu_offload = bool(fn()) if fn is not None else None
    return env
