"""The model on the device: where the weights come from (``model_source``, ``weight_prefetch``,
``tiny_model``), the runner that turns a batch into images, LoRA ``adapters`` swapped per
batch, and what makes it fast
(``acceleration``, ``block_compile``, ``rotary``, ``cuda_graphs``, ``compile_artifacts``),
partial images while it denoises, sequence parallel across GPUs, and ``workers`` (one runner
per GPU, or one over them all).

May import: ``core``.
"""
