"""The CPU as ``vlmexport bench`` records and names it: model name plus the SIMD extensions that pick
onnxruntime's and llama.cpp's kernels (two VMs that both say "AMD EPYC" ran them differently)."""

from vlmexport.pipeline.bench import cpu_features, machine_info, machine_title

# first lines of real /proc/cpuinfo texts, flags shortened to the ones that matter plus neighbours
EPYC_AVX512 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni
processor\t: 1
flags\t\t: fpu sse sse2
"""
EPYC_AVX2 = """model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 sha_ni vaes
"""
XEON_AMX = """model name\t: Intel(R) Xeon(R) Platinum
flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp sve i8mm
"""


def test_cpu_features_names_the_kernel_choosing_extensions_of_the_first_cpu():
    assert cpu_features(EPYC_AVX512) == ["AVX-512", "VNNI", "BF16"]
    assert cpu_features(EPYC_AVX2) == ["AVX2"]
    assert cpu_features(XEON_AMX) == ["AMX-INT8", "AVX-512", "VNNI", "BF16", "AVX-VNNI"]
    assert cpu_features(ARM) == ["NEON", "dotprod", "I8MM", "SVE"]
    assert cpu_features("model name\t: something\n") == []
    assert cpu_features("") == []


def test_machine_title_tells_two_cpus_of_one_name_apart():
    a = {"cpu": "AMD EPYC", "cpu_features": cpu_features(EPYC_AVX512)}
    b = {"cpu": "AMD EPYC", "cpu_features": cpu_features(EPYC_AVX2)}
    assert machine_title(a) == "AMD EPYC (AVX-512, VNNI, BF16)"
    assert machine_title(b) == "AMD EPYC (AVX2)"
    assert machine_title({"cpu": "AMD EPYC"}) == "AMD EPYC"  # a report written before the field existed


def test_machine_info_records_this_machines_features():
    info = machine_info()
    assert isinstance(info["cpu_features"], list)
    assert machine_title(info).startswith(info["cpu"])
