"""runtimes/environment.py: the CPU facts every backend's defaults read."""

from __future__ import annotations

import os

import pytest

from vlmexport.runtimes.environment import cgroup_cpu_quota, cpu_flags, meminfo_bytes, physical_cores


def _sysfs(root, topology: dict[int, tuple[int, int]], siblings: bool = True):
    """CPU -> (package id, core id); ``siblings``: also each CPU's thread_siblings_list, as Linux writes it."""
    for cpu, (package, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
        if siblings:
            same = [c for c, pc in topology.items() if pc == (package, core)]
            (d / "thread_siblings_list").write_text(",".join(map(str, same)) + "\n")
    return root


@pytest.mark.parametrize("topology,cpus,cores", [
    ({0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, [0, 1, 2, 3], 2),  # two cores with two threads each
    ({0: (0, 0), 1: (0, 1)}, [0, 1], 2),  # a VM's vCPUs without SMT siblings: a core each (not 2 // 2)
    ({0: (0, 0), 1: (1, 0)}, [0, 1], 2),  # the same core id on two packages
    ({0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, [0, 2], 2),  # an affinity of one thread per core
    ({0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, [2, 3], 1),  # both threads of one core
])
def test_physical_cores_from_the_topology(tmp_path, topology, cpus, cores):
    assert physical_cores(cpus, _sysfs(tmp_path / "s", topology), quota=None) == cores
    assert physical_cores(cpus, _sysfs(tmp_path / "p", topology, siblings=False), quota=None) == cores


def test_an_arm_chip_whose_core_ids_repeat_per_cluster(tmp_path):
    """Two clusters of four cores, one package id, core ids 0-3 in each (newer arm64 kernels): the
    sibling lists tell the eight cores apart; a CPU quota caps them."""
    root = tmp_path / "sys"
    for cpu in range(8):
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text("0\n")
        (d / "core_id").write_text(f"{cpu % 4}\n")
        (d / "thread_siblings_list").write_text(f"{cpu}\n")
    assert physical_cores(range(8), root, quota=None) == 8
    assert physical_cores(range(8), root, quota=3) == 3


def test_physical_cores_without_a_readable_topology_counts_every_cpu(tmp_path):
    assert physical_cores([0, 1, 2], tmp_path, quota=None) == 3


@pytest.mark.parametrize("cgroup,files,quota", [
    ("0::/docker/abc\n", {"docker/abc/cpu.max": "250000 100000\n"}, 3),  # v2, --cpus 2.5
    ("0::/user.slice\n", {"user.slice/cpu.max": "max 100000\n"}, None),  # v2, no quota
    ("0::/\n", {}, None),  # v2 root: no cpu.max
    ("4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
     2),  # v1, --cpus 2
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     None),  # v1, no quota
])
def test_cgroup_cpu_quota(tmp_path, cgroup, files, quota):
    (tmp_path / "cgroup").write_text(cgroup)
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    assert cgroup_cpu_quota(tmp_path / "cgroup", tmp_path / "fs") == quota


def test_physical_cores_of_this_process():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_cpu_flags_read_x86_and_arm_lines():
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 fma\n") == {"fpu", "avx2", "fma"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}
    assert cpu_flags("nothing here\n") == set()


def test_meminfo_bytes_reads_kib_entries():
    text = "MemTotal:       24576000 kB\nMemAvailable:    1000 kB\nHugePages_Total:       0\n"
    assert meminfo_bytes("MemTotal", text) == 24576000 * 1024
    assert meminfo_bytes("MemAvailable", text) == 1024000
    assert meminfo_bytes("SwapTotal", text) is None
    assert meminfo_bytes("MemTotal") is None or meminfo_bytes("MemTotal") > 0  # this machine's
