from job_helpers import chat_model_dir  # noqa: F401 - a session fixture shared with tests/jobs
