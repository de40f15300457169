#!/bin/sh
# The worker's entrypoint: set the TPU environment of this machine type, then start Beam's boot
# program (which Dataflow requires) with the arguments Dataflow passed.
#
# The machine type comes from DFLASH_TPU_MACHINE_TYPE when set, else from the GCE metadata
# server (instance/machine-type). The variables are derived by `python -m dflash_batch.jobs.tpu_env`
# (see that module for which values Google documents and which are derived). If neither source
# answers, libtpu is left to read the topology from the metadata server itself.
set -eu
BEAM_BOOT="${BEAM_BOOT:-/opt/apache/beam/boot}"
machine="${DFLASH_TPU_MACHINE_TYPE:-}"
if [ -z "$machine" ]; then
    machine=$(python3 - <<'PY' 2>/dev/null || true
import urllib.request
req = urllib.request.Request("http://metadata.google.internal/computeMetadata/v1/instance/machine-type",
                             headers={"Metadata-Flavor": "Google"})
print(urllib.request.urlopen(req, timeout=5).read().decode())
PY
)
fi
if [ -n "$machine" ] && exports=$(python3 -m dflash_batch.jobs.tpu_env "$machine"); then
    eval "$exports"
else
    echo "entrypoint: no TPU environment for machine type '${machine}'; libtpu will query the metadata server" >&2
fi
exec "$BEAM_BOOT" "$@"
