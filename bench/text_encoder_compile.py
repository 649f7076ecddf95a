"""How long compiling the 36-layer text encoder takes: whole against layer by layer.

Tracing cost depends on the number of layers, not their width, so a Qwen3 model with the
real layer count and small matrices shows it on any machine. Each measurement is a fresh
process (as a restarted server is): the first two calls (batch 1, then batch 2) with an
empty compile cache, then again with the cache the first run left.

    python bench/text_encoder_compile.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

CHILD = """
import os, sys, time
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[2]
import torch
from transformers import Qwen3Config, Qwen3Model

torch.manual_seed(0)
config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=36,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
model = Qwen3Model(config).eval()
if sys.argv[1] == "whole":
    model.compile()
else:
    for layer in model.layers:
        layer.compile()
started = time.perf_counter()
with torch.no_grad():
    for batch in (1, 2):
        ids = torch.randint(0, 300, (batch, 512))
        model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), output_hidden_states=True)
print(time.perf_counter() - started)
"""


def main() -> None:
    print("| compile | empty cache s | warm cache s |\n|---|---|---|")
    for mode in ("whole", "layer by layer"):
        with tempfile.TemporaryDirectory() as cache:
            times = []
            for _ in range(2):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, mode.split()[0], cache],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times.append(float(out.stdout.strip().splitlines()[-1]))
            print(f"| {mode} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
