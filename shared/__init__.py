"""Code shared by the CLI and the worker: job spec, settings, metrics, artefact store."""
