"""The XLA flags of every test process, the ones the tests start included.

``--xla_backend_optimization_level=0``: the suite compiles hundreds of small programs and runs
each for a moment, so LLVM's optimization passes cost far more than they save (the 8-device suite
took 20% less time). The level changes how fast code runs, not what it computes: XLA's CPU
backend compiles without fast-math, so LLVM may not reorder or fuse float arithmetic, and the
bit-exact tests (speculative against AR, bf16 verify rows against AR steps) pass at both levels.
Jobs, benchmarks and users' runs keep XLA's default level.
"""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with ``devices`` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
