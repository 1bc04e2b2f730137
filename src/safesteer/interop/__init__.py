"""Interoperability with the field's tools.

* :mod:`~safesteer.interop.saelens` — SAEs to and from SAELens (``SAE.load_from_disk``).
* :mod:`~safesteer.interop.gguf_control` — llama.cpp control vectors (GGUF), read by repeng too.
* :mod:`~safesteer.interop.lm_eval` — the steering CSV of lm-evaluation-harness' ``steered`` model.

The OpenAI-compatible chat endpoints live in :mod:`safesteer.serve.openai_api`.
"""
