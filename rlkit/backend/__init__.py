"""The machine half: loading models and tokenizers, LoRA/DoRA adapters, batching, the learner
(forward/backward, optimizer, checkpoints), and the rollout engines with their weight sync.

Never imports `rlkit.rl`, `rlkit.run` or `rlkit.client`: callers reach it through the client.
"""

import logging

# peft and transformers import bitsandbytes whenever it is installed. Its CPU backend then warns
# that a hub kernel for its bfloat16 inference path is missing: rlkit turns that path off
# (rlkit.backend.models.load_model), and nothing is downloaded at run time.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
