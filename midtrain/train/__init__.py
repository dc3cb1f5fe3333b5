"""Training with Lightning: ``module`` (``CausalLM``, the LightningModule around the plain
model), ``optim`` (AdamW and the LR schedules), ``metrics`` (per-domain sums on the device),
``trainer`` (midtrain's ``Trainer``), ``host`` (CPU memory reuse), ``callbacks`` (one module
each), and ``_lightning``, the one module that touches Lightning internals. May import
``midtrain.errors``, ``data``, ``model`` and ``checkpoint``; nothing above.
"""
