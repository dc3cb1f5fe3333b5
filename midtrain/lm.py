"""Moved: ``CausalLM`` lives in ``midtrain.train.module`` (``midtrain.CausalLM`` is the public
name). This alias keeps ``from midtrain.lm import CausalLM`` and ``class_path: midtrain.lm.CausalLM``
working."""

from midtrain.train.module import CausalLM

__all__ = ["CausalLM"]
