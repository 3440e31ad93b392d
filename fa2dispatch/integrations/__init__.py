"""Integrations of fa2dispatch with other libraries; each module imports its library only when
used, so ``import fa2dispatch`` never needs them.

- ``fa2dispatch.integrations.hf``: HuggingFace transformers' attention interface
  (``register()``, then ``attn_implementation="fa2dispatch"``).
"""
