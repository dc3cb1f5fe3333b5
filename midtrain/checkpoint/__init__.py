"""Checkpoints, in one home: ``files`` (reading both forms Lightning writes, checking one is
complete, consolidating a sharded one), ``atomic`` (writes that are whole or absent),
``layout`` (a run directory's names), ``resume`` (which checkpoint a resume starts from, the
run record it must agree with, the fork rewrite of optimizer state), ``load`` (a trained model
and its tokenizer from a checkpoint), ``export`` (a checkpoint as a Hugging Face model) and
``average`` (a uniform soup of checkpoints).
May import ``midtrain.errors``, ``midtrain.data`` and ``midtrain.model``; nothing above.
"""
