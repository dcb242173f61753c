"""genai-lab finetune package: LoRA and QLoRA on Hugging Face causal LMs with your own data."""

import logging

# On CPUs with AVX512-BF16, bitsandbytes 0.50 tries, when imported, to fetch an optional faster
# 4-bit matmul from the Hub through the `kernels` package, and logs a warning when that package
# is absent. It then uses its own bundled C++ kernel, so the warning is noise (and offline the
# fetch could never work anyway). Set before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
