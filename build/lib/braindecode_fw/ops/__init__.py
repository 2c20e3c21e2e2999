"""Experiment operations: loggers, image logging, resume, multi-GPU helpers, sweeps, dashboards."""
