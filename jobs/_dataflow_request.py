"""The Dataflow ``CreateJobRequest`` that ``submit`` would send, made offline (``submit --dry-run``).

Beam's own ``--dry_run`` stops after ``apiclient.Job`` is built, whose request holds only a name
and a type; the environment (worker pool, machine type, service options, image, experiments) is
added later by ``DataflowApplicationClient.create_job_description``, after it uploads the
pipeline proto. So the dry run does not use ``--dry_run``: it runs the job's pipeline through the
DataflowRunner under exactly the options a real submit uses, with Beam's client replaced by
``_RecordingClient``, which differs from Beam's in three places only (and Beam's option
validation skips its one GCS call, a cost warning about the buckets' soft-delete policy):

1. it is built without credentials (Beam's ``no_auth`` path), on a copy of the options, so the
   job's own options (what the request carries) keep the real values;
2. its one upload method records each staged file (location and size) instead of uploading;
3. its jobs client raises ``_Captured`` with the request at the point of sending.

Everything between (translation, the environment, ``submit_job_description`` filling the
request) is Beam's own code, the same that runs in a real submit. What cannot be equal: the
staging folder carries a timestamp (Beam's ``JOB_NAME.TIME``), and the staged pipeline proto
lists the input files found at submission (the dry run lists none: it does not touch gs://).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any
from unittest import mock

from apache_beam.utils.retry import PermanentException


class _Captured(PermanentException):
    """Carries the request out of Beam's submit path (permanent: Beam's retry must not retry it)."""

    def __init__(self, request):
        super().__init__("captured the CreateJobRequest")
        self.request = request


class _Recorder:
    """Beam's jobs client, as far as ``submit_job_description`` uses it."""

    def create_job(self, request):
        raise _Captured(request)


def _recording_client_class():
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.runners.dataflow.internal.apiclient import DataflowApplicationClient

    class _RecordingClient(DataflowApplicationClient):
        """Beam's client, with no credentials, uploads recorded and the request captured."""

        staged: list[dict[str, Any]] = []

        def __init__(self, options, root_staging_location=None):
            offline = copy.deepcopy(options)  # the job's own options (sent in the request) stay as given
            offline.view_as(GoogleCloudOptions).no_auth = True
            super().__init__(offline, root_staging_location)
            self._jobs_client = _Recorder()
            _RecordingClient.staged = []

        def stage_file_with_retry(self, gcs_or_local_path, file_name, stream_or_path, mime_type=None,
                                  total_size=None):
            size = os.path.getsize(stream_or_path) if isinstance(stream_or_path, str) else \
                len(stream_or_path.getvalue())
            _RecordingClient.staged.append({"location": gcs_or_local_path.rstrip("/") + "/" + file_name,
                                            "bytes": size})

    return _RecordingClient


def _offline_preflight(config):
    """Stands in for ``build``'s preflight, which lists the gs:// input and reads the model's config."""
    from dflash_batch.decoder import DRAFTER_MODES
    from dflash_batch.pipeline import Preflight, result_manifest
    from dflash_batch.schemas import COMPLETIONS_SCHEMA, PROMPTS_SCHEMA

    spec = config.spec
    drafter = spec.model.drafter if spec.decode.mode in DRAFTER_MODES else None
    return Preflight(files=(config.input,), input_schema=PROMPTS_SCHEMA, rows_in=0,
                     completions_schema=COMPLETIONS_SCHEMA, previous_completions=(),
                     drafter=drafter, manifest=result_manifest(config))


@contextlib.contextmanager
def _no_bucket_policy_check():
    """Beam's option validation asks GCS whether the temp and staging buckets keep deleted files
    (a cost warning, nothing in the request); offline there is no bucket to ask."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    with mock.patch.object(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled", lambda self, arg_name: None):
        yield


@contextlib.contextmanager
def _beam_client_replaced():
    from apache_beam.runners.dataflow.internal import apiclient

    client = _recording_client_class()
    with mock.patch.object(apiclient, "DataflowApplicationClient", client):
        yield client


def job_request(spec) -> tuple[Any, dict[str, Any]]:
    """(the ``dataflow_v1beta3.CreateJobRequest`` a real ``submit`` of ``spec`` sends, extras).

    Steps: 1. build the job's pipeline under the real submit's options, with the offline
    preflight; 2. run it on the DataflowRunner with Beam's client replaced (module docstring);
    3. catch the request where Beam sends it. Extras: the pipeline's step names and the files
    that would be staged (what is not in the request itself).
    """
    from dflash_batch.pipeline import build

    with _no_bucket_policy_check():
        job = build(spec, check=_offline_preflight)
    with _no_bucket_policy_check(), _beam_client_replaced() as client:
        try:
            job.pipeline.run()
        except _Captured as captured:
            request = captured.request
        else:
            raise RuntimeError("Beam's DataflowRunner returned without sending a CreateJobRequest")
    runner = job.pipeline.runner
    return request, {"pipeline_step_names": _step_names(runner.proto_pipeline), "staged_files": client.staged}


def request_json(request) -> str:
    """The request as the REST API's JSON (camelCase names, enums by name)."""
    from google.cloud import dataflow_v1beta3

    return dataflow_v1beta3.CreateJobRequest.to_json(request, use_integers_for_enums=False, indent=2,
                                                     sort_keys=True)


def _step_names(proto_pipeline) -> list[str]:
    """The user-facing labels of the pipeline's top-level transforms (ReadPrompts, Decode, ...)."""
    comps = proto_pipeline.components.transforms
    names = []
    for root in proto_pipeline.root_transform_ids:
        for sub in comps[root].subtransforms or [root]:
            names.append(comps[sub].unique_name)
    return names
