"""dflash-batch: offline batch LLM generation with DFlash speculative decoding.

The package's subfolders are the repository's top-level folders:

- ``dflash_batch.schemas``  Arrow/Parquet contracts and row validation
- ``dflash_batch.decoder``  JAX target models, drafters, AR and speculative decoding
- ``dflash_batch.kernels``  attention kernels and their plain-jnp references
- ``dflash_batch.pipeline`` the Beam pipeline
- ``dflash_batch.jobs``     job specs and the ``dflash-batch`` command line
"""

__version__ = "0.1.0"
