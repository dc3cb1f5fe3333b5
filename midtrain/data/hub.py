"""Where a Hugging Face model lives: ``hf:<local dir or hub id>[@revision]`` resolved to a local
directory (the directory itself, or the hub snapshot at that revision). Used by the tokenizer
loader (a store tokenized for a released model) and by ``midtrain.model.hf`` (import and export)."""

from __future__ import annotations

from pathlib import Path

from midtrain.errors import MidtrainError

HF_PREFIX = "hf:"
TOKENIZER_FILE = "tokenizer.json"  # a fast tokenizer, in a store and in an HF model directory
# what a model directory's weights are stored as (transformers' file names)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_hf(spec: object) -> bool:
    """Whether a model or tokenizer source names a Hugging Face model (``hf:...``)."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``hf:<dir or hub id>[@revision]`` -> (dir or id, revision)."""
    body = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    name, _, revision = body.partition("@")
    if not name:
        raise MidtrainError(f"{spec!r}: give hf:<local dir or hub id>[@revision]")
    return name, revision or None


def resolve(
    spec: str,
    what: str = "init_from",
    patterns: tuple[str, ...] = (
        "config.json",
        "generation_config.json",
        "tokenizer*",
        "special_tokens_map.json",
        *WEIGHT_FILES,
        "model-*.safetensors",
        "pytorch_model-*.bin",
    ),
) -> Path:
    """A local directory holding the model: the directory itself, or the hub snapshot of the id
    at the revision (downloaded once into the HF cache; HF_HUB_OFFLINE uses the cache only)."""
    name, revision = parse_spec(spec)
    if Path(name).is_dir():
        if revision is not None:
            raise MidtrainError(
                f"{what}: {name} is a local directory; @{revision} applies only to hub ids"
            )
        return Path(name)
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise MidtrainError(f"{what}: directory not found: {name}")
    import huggingface_hub as hub  # installed with `datasets`
    from huggingface_hub import errors

    try:
        return Path(hub.snapshot_download(name, revision=revision, allow_patterns=list(patterns)))
    except errors.RevisionNotFoundError:
        raise MidtrainError(
            f"{what}: revision {revision!r} does not exist for {name}; see the "
            "repository's branches (Pythia: step0 ... step143000)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise MidtrainError(f"{what}: no hub repository {name!r} (or it is private)") from None
    except Exception as e:  # offline, network, auth: one line either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MidtrainError(
            f"{what}: could not fetch {name}"
            f"{'@' + revision if revision else ''} from the hub ({first})"
        ) from None


def tokenizer_file(spec: str, where: str = "tokenizer") -> Path:
    """The ``tokenizer.json`` of an HF model ``hf:<dir or id>[@rev]`` (or a plain dir/id)."""
    directory = resolve(
        spec,
        where,
        patterns=(
            "tokenizer*",
            "special_tokens_map.json",
            "config.json",
            "generation_config.json",
            "chat_template.jinja",
        ),
    )
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise MidtrainError(f"{where}: {directory} has no tokenizer.json (a fast tokenizer)")
    return path
