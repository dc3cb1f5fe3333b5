"""The ``midtrain`` model of lm-evaluation-harness.

lm-eval 0.4.13 finds models only in its own registry (its built-in table plus classes that
``@register_model`` when imported): it has no entry-point discovery for external packages. So the
``midtrain lm-eval`` command (same arguments as ``lm_eval``) imports this module first, and
Python users ``import midtrain.evaluation.harness`` before ``lm_eval.simple_evaluate``::

    midtrain lm-eval run --model midtrain --model_args checkpoint=<ckpt>,batch_size=8 --tasks ...

``checkpoint`` is a checkpoint file, a distributed checkpoint directory or
``hf:<dir or hub id>[@revision]``; ``weights=ema`` scores a checkpoint's averaged weights
(``midtrain.callbacks.EMA``). Texts get the BOS exactly where lm-eval's ``hf`` model gives them
one on the export (``add_bos_token`` and ``prefix_token_id`` as there). Needs the ``eval`` extra
(``pip install midtrain[eval]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: it imports it only when empty)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from midtrain.evaluation.scoring import continuation_logprobs
from midtrain.model.generation import Sampling, generate_ids
from midtrain.model.gpt import GPT

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from midtrain.checkpoint.load import LoadedModel


@register_model("midtrain")
class MidtrainLM(TemplateLM):
    """lm-eval model over a ``GPT``: loglikelihood, loglikelihood_rolling, generate_until.

    Context/continuation boundaries follow lm-eval's ``TemplateLM`` (the pair is encoded whole
    and split at the context's length, trailing context spaces moved to the continuation), as
    its ``hf`` model does, so both score an exported model identically.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        batch_size: int | str = 8,
        device: str = "cpu",
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        model: GPT | None = None,
        tokenizer_object: Tokenizer | None = None,
        eos_id: int | None = None,
        weights: str = "live",
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from midtrain.data.tokenizer import Bos

        bos = None
        if model is None:
            loaded = _open(checkpoint, tokenizer, device, dtype, weights)
            model, tokenizer_object, eos_id = loaded.model, loaded.tokenizer, loaded.eos_id
            bos = loaded.bos
        if tokenizer_object is None:
            from midtrain.errors import MidtrainError

            raise MidtrainError("MidtrainLM: a model given directly needs its tokenizer_object")
        self.model = model
        self.tok = tokenizer_object
        self._eos_id = eos_id if eos_id is not None else 0
        # the BOS where the tokenizer adds one (recorded by prepare; a model given directly:
        # what its post-processor does), unless add_bos_token says otherwise, as lm-eval's hf
        bos = bos or Bos.of(self.tok)
        self._bos_id = bos.id
        added = bos.added if add_bos_token is None else bool(add_bos_token)
        self._adds_bos = added and bos.id is not None
        self._prefix_token_id = prefix_token_id
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = int(max_length) if max_length else model.config.block_size
        self.max_gen_toks = int(max_gen_toks)
        self.vocab_size = min(
            model.config.padded_vocab_size, self.tok.get_vocab_size(with_added_tokens=True)
        )

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> MidtrainLM:
        # --model_args wins over lm-eval's own --batch_size/--device (always passed along)
        return cls.create_from_arg_obj(
            lm_utils.simple_parse_args_string(arg_string), additional_config
        )

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> MidtrainLM:
        extra = {
            k: v
            for k, v in (additional_config or {}).items()
            if v is not None and k not in arg_dict
        }
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self._eos_id

    @property
    def prefix_token_id(self) -> int:
        """The one-token context of an empty one (and of rolling windows), as lm-eval's hf
        model: ``prefix_token_id`` if given, else the BOS token, else the EOS."""
        if self._prefix_token_id is not None:
            return int(self._prefix_token_id)
        return self._bos_id if self._bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "midtrain"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """As lm-eval's hf model: the BOS in front where the tokenizer adds one, unless
        ``add_special_tokens`` is False or (when it is not given) the text already starts with
        the prefix token's text."""
        ids = self.tok.encode(string, add_special_tokens=False).ids
        special = add_special_tokens
        if special is None:
            special = not string.startswith(self.tok_decode([self.prefix_token_id]))
        if special and self._adds_bos and self._bos_id is not None:
            return [self._bos_id, *ids]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = []
        step = max(self.batch_size * 16, 1)  # progress in chunks; batching inside
        for start in tqdm(
            range(0, len(pairs), step),
            disable=disable_tqdm or len(pairs) <= step,
            desc="loglikelihood",
        ):
            results += continuation_logprobs(
                self.model, pairs[start : start + step], self.batch_size
            )
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, scores, strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id])
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same settings decode as a batch
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            sampling = Sampling(
                max_new_tokens=max_new,
                temperature=float(kwargs.get("temperature") or 0.0)
                if kwargs.get("do_sample")
                else 0.0,
                top_p=kwargs.get("top_p"),
                top_k=kwargs.get("top_k"),
                seed=kwargs.get("seed"),
                stop=until,
            )
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                contexts = [
                    self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :]
                    for i in chunk
                ]
                rows = generate_ids(
                    self.model, contexts, sampling, self.vocab_size, decode=self.tok_decode
                )
                for i, ids in zip(chunk, rows, strict=True):
                    # as lm-eval's hf model: special tokens (a BOS, the EOS) are not text
                    text = self.tok.decode(ids, skip_special_tokens=True)
                    for term in until:  # as lm-eval's hf model: cut at every stop sequence
                        text = text.split(term)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return cast("list[str]", out)  # every slot is filled above

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(next(self.model.parameters()).dtype),
        }


def _open(
    checkpoint: str | None, tokenizer: str | None, device: str, dtype: str | None, weights: str
) -> LoadedModel:
    from midtrain.checkpoint.load import open_model
    from midtrain.errors import MidtrainError

    if checkpoint is None:
        raise MidtrainError("--model_args: give checkpoint=<checkpoint or hf:model>")
    if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        device = "cpu"  # lm-eval's CLI passes --device cuda by default
    return open_model(str(checkpoint), tokenizer, device, dtype, "model_args checkpoint", weights)


def run_cli(args: list[str]) -> None:
    """lm-eval's own command line, with the ``midtrain`` model registered."""
    import os
    import sys

    from lm_eval.__main__ import cli_evaluate

    from midtrain.errors import MidtrainError

    argv = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except (ValueError, KeyError, FileNotFoundError) as e:  # unknown task or model, bad args
        if os.environ.get("MIDTRAIN_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        raise MidtrainError(f"lm-eval: {message}") from None
    finally:
        sys.argv = argv
