#!/bin/sh
# The worker's entrypoint: set the TPU environment of this machine type, then start Beam's boot
# program (which Dataflow requires) with the arguments Dataflow passed.
#
# The machine type comes from DFLASH_TPU_MACHINE_TYPE when set, else from the GCE metadata
# server (instance/machine-type). The variables are derived by `python -m dflash_batch.jobs.tpu_env`
# (see that module for which values Google documents and which are derived). When neither source
# gives a machine type it knows, the worker stops here with a message: libtpu left to guess the
# topology is the start-up failure Google's TPU troubleshooting fixes with these very variables.
# (The decode step sets them again from the job's own machine type, before JAX starts.)
set -eu
BEAM_BOOT="${BEAM_BOOT:-/opt/apache/beam/boot}"
METADATA_URL="${DFLASH_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/machine-type}"
machine="${DFLASH_TPU_MACHINE_TYPE:-}"
origin="DFLASH_TPU_MACHINE_TYPE"
if [ -z "$machine" ]; then
    origin="the metadata server ($METADATA_URL)"
    machine=$(METADATA_URL="$METADATA_URL" python3 - <<'PY' 2>/dev/null || true
import os
import urllib.request
req = urllib.request.Request(os.environ["METADATA_URL"], headers={"Metadata-Flavor": "Google"})
print(urllib.request.urlopen(req, timeout=5).read().decode())
PY
)
fi
if ! exports=$(python3 -m dflash_batch.jobs.tpu_env "${machine:-<none>}"); then
    echo "entrypoint: cannot set the TPU environment: no known machine type from $origin" \
         "(got '${machine:-nothing}'). Set DFLASH_TPU_MACHINE_TYPE to the worker's machine type, one of:" \
         "$(python3 -m dflash_batch.jobs.tpu_env --list)" >&2
    exit 78
fi
eval "$exports"
exec "$BEAM_BOOT" "$@"
