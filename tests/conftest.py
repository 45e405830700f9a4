"""Test configuration: fake CPU devices for data-parallel tests, float64 available on demand."""

import os

# Must be set before jax is imported anywhere: 4 fake CPU devices for mesh / pmap tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
