"""Test session setup: 8 CPU devices, so the sharding tests can build meshes of up to 8.

XLA reads XLA_FLAGS once, when jax first starts its CPU backend, so the flag is
added here, before any test module imports jax. Everything else runs on the
default device (the first) as before.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()

# Tests compile their own tiny programs; they leave JAX's persistent compilation
# cache off (tests/test_compilation.py turns it on in a directory of its own).
os.environ.setdefault("GROK_MOE_COMPILATION_CACHE", "off")
