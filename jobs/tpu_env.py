"""The TPU environment of a single-host Dataflow worker, from its machine type.

libtpu reads these variables when JAX starts. Google documents the set for v5e 1x1
(``ct5lp-hightpu-1t``; "Debug with a standalone VM" in Dataflow's TPU troubleshooting page):
TPU_SKIP_MDS_QUERY=1, TPU_HOST_BOUNDS=1,1,1, TPU_CHIPS_PER_HOST_BOUNDS=1,1,1,
TPU_WORKER_HOSTNAMES=localhost, TPU_WORKER_ID=0, TPU_ACCELERATOR_TYPE=v5litepod-1.
The other rows are derived, not documented there: the host bounds and worker id stay those of
one host; the chip bounds are the slice's topology (2x2 -> 2,2,1, 2x4 -> 2,4,1); the accelerator
type is the generation's name with its count (chips for v5e and v6e; TensorCores for v5p,
whose 4 chips hold 8).

``python -m dflash_batch.jobs.tpu_env MACHINE_TYPE`` prints them as shell ``export`` lines;
the container's entrypoint evaluates that before it starts Beam's boot program, and stops the
worker when it fails (``--list`` prints the accepted machine types for its message). The decode
step sets the same variables from the job's own machine type (``RunnerSpec.worker_env``), so the
metadata server is never the only source. Nothing here imports JAX (the variables must be set
before it starts) or the rest of the package (the entrypoint runs this on every worker start).
"""

from __future__ import annotations

import sys

DOCUMENTED = {  # verbatim from Google's Dataflow TPU troubleshooting page (v5e 1x1)
    "TPU_SKIP_MDS_QUERY": "1", "TPU_HOST_BOUNDS": "1,1,1", "TPU_CHIPS_PER_HOST_BOUNDS": "1,1,1",
    "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
}

# machine type -> (TPU_ACCELERATOR_TYPE, TPU_CHIPS_PER_HOST_BOUNDS); one row per slice `submit` accepts.
MACHINES = {
    "ct5lp-hightpu-1t": ("v5litepod-1", "1,1,1"),  # documented
    "ct5lp-hightpu-4t": ("v5litepod-4", "2,2,1"),
    "ct5lp-hightpu-8t": ("v5litepod-8", "2,4,1"),
    "ct6e-standard-1t": ("v6e-1", "1,1,1"),
    "ct6e-standard-4t": ("v6e-4", "2,2,1"),
    "ct6e-standard-8t": ("v6e-8", "2,4,1"),
    "ct5p-hightpu-4t": ("v5p-8", "2,2,1"),
}


def tpu_env(machine_type: str) -> dict[str, str]:
    """The TPU variables of a worker of ``machine_type`` (a bare name or a GCE machine-type path)."""
    name = machine_type.strip().rsplit("/", 1)[-1]
    if name not in MACHINES:
        raise ValueError(f"unknown TPU machine type {name!r}; known: {', '.join(MACHINES)}")
    accelerator, bounds = MACHINES[name]
    return {"TPU_SKIP_MDS_QUERY": "1", "TPU_HOST_BOUNDS": "1,1,1", "TPU_CHIPS_PER_HOST_BOUNDS": bounds,
            "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0", "TPU_ACCELERATOR_TYPE": accelerator}


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        print(", ".join(MACHINES))
        return 0
    if len(argv) != 1:
        print("usage: python -m dflash_batch.jobs.tpu_env MACHINE_TYPE | --list", file=sys.stderr)
        return 2
    try:
        env = tpu_env(argv[0])
    except ValueError as e:
        print(f"tpu_env: {e}", file=sys.stderr)
        return 1
    for key, value in env.items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
