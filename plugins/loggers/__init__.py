"""Built-in plugins that observe runs through the lifecycle hooks (``metabench_on_progress``, ...)."""
