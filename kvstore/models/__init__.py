"""What kvstore knows about transformer models, in one place (imports nothing heavy).

- ``llama``: the supported architectures (Llama-style decoders), their geometry,
  the per-layer projections, prefill capture and one decode step.
- ``rope``: reading a model's RoPE and moving cached keys between positions.
- ``cache``: HF transformers caches to and from ``[layers, 2, heads, tokens, dim]``.
- ``dtypes``: dtype names of ``KVLayout`` to and from torch dtypes.
- ``smollm2``: the test model (SmolLM2-135M) and sample prompts, with no hub access.

``rag``, ``sparse``, the codec's calibration and ``integrations`` ask these modules;
none of them imports the client, the daemon or an engine.
"""
