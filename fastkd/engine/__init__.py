"""Training engine: DeepSpeed trainer, checkpoints, schedules, metrics, eval, export, plots."""
