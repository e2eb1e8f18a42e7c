"""bench's advice from what the hardware does: bf16 on a CPU only where it has the instructions and measured faster."""

import time

import pytest
import torch

from flowers_dist import config
from flowers_dist.bench.advice import advice, cpu_bf16_flags, measure_bf16_speedup

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# The first processor of a /proc/cpuinfo; flags trimmed, the ones that matter kept in place.
XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
AMD_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7R32
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""


def test_cpu_bf16_flags_reads_the_flags_line():
    assert cpu_bf16_flags(XEON_AMX) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags(AMD_AVX2) == ()
    assert cpu_bf16_flags("model name\t: avx512_bf16 in a name is not a flag\n") == ()
    assert isinstance(cpu_bf16_flags(), tuple)  # this machine's, whatever it has


def _cfg(*overrides):
    return config.load(None, ["model.channels_last=true", *overrides])


@pytest.mark.parametrize(
    "flags, speedup, bf16",
    [
        (("amx_bf16", "avx512_bf16"), 1.64, True),  # a Xeon with AMX, measured faster: advise it
        (("amx_bf16",), 1.02, False),  # faster within noise
        (("avx512_bf16",), 0.8, False),  # the instructions, yet slower here
        ((), 1.64, False),  # no bf16 instructions: never, whatever one measurement says
        (("amx_bf16",), None, False),  # not measured
    ],
)
def test_cpu_bf16_is_advised_only_with_the_flags_and_a_faster_measurement(flags, speedup, bf16):
    said = advice(_cfg(), CPU, "compute", bf16_speedup=speedup, cpu_flags=flags)
    assert ("bf16" in said) is bf16, said
    if bf16:
        assert said.startswith("train.mixed_precision=bf16") and "1.64x" in said and "amx_bf16" in said


def test_a_measured_bf16_step_outranks_the_general_advice():
    said = advice(config.load(None), CPU, "compute", bf16_speedup=1.64, cpu_flags=("amx_bf16",))
    assert said.startswith("train.mixed_precision=bf16")  # though channels_last is off too


def test_bf16_that_measured_slower_is_advised_off_and_other_bottlenecks_say_nothing_of_it():
    said = advice(_cfg("train.mixed_precision=bf16"), CPU, "compute", bf16_speedup=0.5, cpu_flags=())
    assert said == "train.mixed_precision=no (a bf16 step measured 2.00x as slow as fp32 here)"
    for bottleneck in ("data wait", "communication"):
        assert "bf16" not in advice(_cfg(), CPU, bottleneck, bf16_speedup=1.64, cpu_flags=("amx_bf16",))
    assert advice(_cfg(), CUDA, "compute") == "train.mixed_precision=bf16"  # on CUDA, as before


def test_measure_bf16_speedup_times_the_step_under_each_precision():
    def step():  # a step that takes 20 ms in fp32 and 10 ms under bf16 autocast
        time.sleep(0.010 if torch.is_autocast_enabled("cpu") else 0.020)

    assert measure_bf16_speedup(step, repeats=3) == pytest.approx(2.0, rel=0.25)
