"""Test-wide setup: 8 simulated CPU devices, so sharded code paths run on any machine."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
