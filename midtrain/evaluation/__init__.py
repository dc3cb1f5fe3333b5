"""Downstream evaluation: an lm-evaluation-harness model (``harness``), a light local
multiple-choice / exact-match runner for JSONL tasks (``local``), and the in-loop
``DownstreamEval`` callback (``callback``). Shared scoring lives in ``scoring``."""
