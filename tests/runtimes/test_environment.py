"""runtimes/environment.py: the CPU facts every backend's defaults read."""

from __future__ import annotations

import os

import pytest

from vlmexport.runtimes.environment import cpu_flags, meminfo_bytes, physical_cores


def _sysfs(root, topology: dict[int, tuple[int, int]]):
    for cpu, (package, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


@pytest.mark.parametrize("topology,cpus,cores", [
    ({0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, [0, 1, 2, 3], 2),  # two cores with two threads each
    ({0: (0, 0), 1: (0, 1)}, [0, 1], 2),  # a VM's vCPUs without SMT siblings: a core each (not 2 // 2)
    ({0: (0, 0), 1: (1, 0)}, [0, 1], 2),  # the same core id on two packages
    ({0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, [0, 2], 2),  # an affinity of one thread per core
    ({0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1)}, [2, 3], 1),  # both threads of one core
])
def test_physical_cores_from_the_topology(tmp_path, topology, cpus, cores):
    assert physical_cores(cpus, _sysfs(tmp_path, topology)) == cores


def test_physical_cores_without_a_readable_topology_counts_every_cpu(tmp_path):
    assert physical_cores([0, 1, 2], tmp_path) == 3


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
