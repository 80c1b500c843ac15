"""Load a Hugging Face model folder (``config.json`` + weights) as an eval-mode ``nn.Module``.

Only local folders are read: nothing is downloaded, and no custom model code is run
(``trust_remote_code`` is never set). Weights must be safetensors (``model.safetensors`` or a
sharded ``model.safetensors.index.json``); pickled ``pytorch_model.bin`` files are refused unless
the caller opts in with ``allow_pickle=True``, and are then read with ``torch.load(weights_only=True)``.

Models are configured for capture with ``use_cache=False``: otherwise decoders return a
``DynamicCache``, which is not a pytree type, and ``torch.export`` fails on the output. Outputs stay
``ModelOutput``s (transformers registers them as pytree nodes). ``config.return_dict=False`` is
deliberately not set: in transformers 5.23 it breaks task-head models (the base model then returns
a tuple to a head that reads ``.last_hidden_state``).

``transformers`` is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptool.errors import ModelLoadError, UsageError

__all__ = [
    "DEFAULT_SEQ_LEN",
    "example_inputs_for",
    "load_hf_folder",
    "load_hf_model",
    "load_tokenizer",
    "sample_sentences",
    "split_call",
]

DEFAULT_SEQ_LEN = 128

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE = "pytorch_model.bin"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
# Above this share of missing parameters the checkpoint does not belong to the architecture.
_MAX_MISSING_FRACTION = 0.5


def sample_sentences() -> list[str]:
    """Return the real English sentences shipped in ``ptool/data/sentences.txt`` (one per line)."""
    text = resources.files("ptool").joinpath("data", "sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_hf_folder(
    path: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 1,
    allow_pickle: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Load a local Hugging Face folder and make example inputs for it.

    Args:
        path: folder holding ``config.json`` and the weights.
        seq_len: token length of text inputs (padded to max length, truncated); default
            ``DEFAULT_SEQ_LEN`` (128), capped at the model's position count.
        batch_size: rows in the example batch.
        allow_pickle: accept ``pytorch_model.bin`` (loaded with ``torch.load(weights_only=True)``).
        seed: seed for synthesized inputs (only used when the folder has no tokenizer).

    Returns:
        ``(model, example_inputs, example_kwargs)``: the eval-mode model and inputs such that
        ``model(*example_inputs, **example_kwargs)`` runs and ``torch.export.export(model,
        example_inputs, example_kwargs, strict=False)`` accepts them.

    Raises:
        ModelLoadError: missing folder / ``config.json`` / weights, refused pickle, unknown architecture.
        UsageError: ``seq_len`` or ``batch_size`` out of range for the model.
    """
    folder = _check_folder(path)
    model = load_hf_model(folder, allow_pickle=allow_pickle)
    args, kwargs = example_inputs_for(model, folder, seq_len=seq_len, batch_size=batch_size, seed=seed)
    return model, args, kwargs


def load_hf_model(path: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """Build the model named by ``config.json`` from a local folder, in eval mode.

    The class is ``config.architectures[0]`` when transformers has it, else ``AutoModel``.

    Raises:
        ModelLoadError: see :func:`load_hf_folder`.
    """
    folder = _check_folder(path)
    use_safetensors = _check_weights(folder, allow_pickle=allow_pickle)
    transformers = _import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any parse/registry failure is a load error
        raise ModelLoadError(
            f"cannot read {folder / 'config.json'}: {_one_line(err)}; check it is a transformers config"
        ) from err
    if hasattr(config, "use_cache"):
        config.use_cache = False
    model_cls = _model_class(transformers, config, folder)
    with _quiet(transformers):
        try:
            model, info = model_cls.from_pretrained(
                folder,
                config=config,
                local_files_only=True,
                use_safetensors=use_safetensors,
                weights_only=True,
                output_loading_info=True,
            )
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot load weights from {folder} into {model_cls.__name__}: {_one_line(err)}"
            ) from err
    _check_loading_info(model, info, folder)
    model.eval()
    return model


def example_inputs_for(
    model: nn.Module,
    folder: str | Path | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    sentences: Sequence[str] | None = None,
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Make ``(args, kwargs)`` for a transformers model.

    Text inputs come from the folder's tokenizer on real sentences when there is one, otherwise
    random token ids from the config's vocabulary; vision inputs are seeded random pixels of
    ``config.image_size`` and ``config.num_channels``.

    Raises:
        UsageError: ``seq_len``/``batch_size`` below 1 or an explicit ``seq_len`` above the
            model's positions (the default, 128, is capped at them instead).
        ModelLoadError: the model takes neither ``input_ids`` nor ``pixel_values``.
    """
    if (seq_len is not None and seq_len < 1) or batch_size < 1:
        raise UsageError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len} batch_size={batch_size}")
    config = getattr(model, "config", None)
    params = _forward_params(model)
    named: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    if "input_ids" in params:
        max_pos = _max_positions(config)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, max_pos) if max_pos is not None else DEFAULT_SEQ_LEN
        elif max_pos is not None and seq_len > max_pos:
            raise UsageError(
                f"seq_len={seq_len} exceeds the model's {max_pos} positions; pass seq_len <= {max_pos}"
            )
        tokenizer = load_tokenizer(Path(folder)) if folder is not None else None
        if tokenizer is not None:
            texts = list(sentences) if sentences is not None else sample_sentences()
            texts = [texts[i % len(texts)] for i in range(batch_size)]
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
            )
            named["input_ids"] = enc["input_ids"].to(torch.long)
            mask = enc.get("attention_mask")
            named["attention_mask"] = (
                mask.to(torch.long) if mask is not None else torch.ones_like(named["input_ids"])
            )
        else:
            vocab = int(getattr(config, "vocab_size", 0) or 0)
            if vocab < 1:
                raise ModelLoadError("config has no vocab_size to synthesize input_ids; add a tokenizer to the folder")
            named["input_ids"] = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
            named["attention_mask"] = torch.ones(batch_size, seq_len, dtype=torch.long)
        if "attention_mask" not in params:
            del named["attention_mask"]
    if "pixel_values" in params:
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = int(getattr(config, "num_channels", 3))
        named["pixel_values"] = torch.randn(batch_size, channels, h, w, generator=gen)
    if not named:
        raise ModelLoadError(
            f"{type(model).__name__} takes neither input_ids nor pixel_values; "
            "ptool cannot synthesize inputs for it, pass example_inputs explicitly"
        )
    return split_call(model, named)


def split_call(
    model: nn.Module, named: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split named inputs into positional args (the longest leading run of ``forward``'s
    parameters that are all given) and keyword args (the rest).

    ``BertModel`` gets ``(input_ids, attention_mask), {}``; ``GPT2LMHeadModel``, whose second
    parameter is ``past_key_values``, gets ``(input_ids,), {"attention_mask": ...}``.
    """
    remaining = dict(named)
    args = []
    for name in _forward_params(model):
        if name not in remaining:
            break
        args.append(remaining.pop(name))
    return tuple(args), remaining


# ---------------------------------------------------------------------------------------------
# helpers


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ModelLoadError(
            "loading Hugging Face folders needs transformers; run `pip install 'ptool[hf]'`"
        ) from err
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """Silence transformers' progress bar, logger and warnings for one load, then restore them.

    Missing weights are reported by ptool itself (see ``_check_loading_info``), in one line.
    """
    logging = transformers.utils.logging
    bar_was_on = logging.is_progress_bar_enabled()
    level = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
        if bar_was_on:
            logging.enable_progress_bar()


def _check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; pass a local folder with config.json and weights")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; a Hugging Face model is a folder with config.json and weights")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no config.json; a Hugging Face model folder needs config.json next to its weights"
        )
    return folder.resolve()


def _check_weights(folder: Path, *, allow_pickle: bool) -> bool:
    """Return True for safetensors, False for an allowed pickle; raise otherwise."""
    if (folder / _SAFETENSORS).is_file():
        return True
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        _check_shards(folder, index)
        return True
    pickles = [name for name in (_PICKLE, _PICKLE_INDEX) if (folder / name).is_file()]
    if pickles:
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} has only pickled weights ({pickles[0]}), which can run code when loaded; "
                "convert them to model.safetensors or pass allow_pickle=True"
            )
        if (folder / _PICKLE_INDEX).is_file() and not (folder / _PICKLE).is_file():
            _check_shards(folder, folder / _PICKLE_INDEX)
        return False
    raise ModelLoadError(
        f"{folder} has no weights; expected {_SAFETENSORS} or {_SAFETENSORS_INDEX} (sharded)"
    )


def _check_shards(folder: Path, index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{index} is not a valid shard index (needs a 'weight_map'): {_one_line(err)}") from err
    missing = sorted({shard for shard in weight_map.values() if not (folder / shard).is_file()})
    if missing:
        raise ModelLoadError(
            f"{index.name} lists {len(missing)} missing shard file(s), first {missing[0]}; copy every shard into {folder}"
        )


def _model_class(transformers, config, folder: Path):
    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    if architectures and getattr(config, "auto_map", None):
        raise ModelLoadError(
            f"{folder} needs custom model code ({architectures[0]}), which ptool does not run; "
            "use an architecture that ships with transformers"
        )
    return transformers.AutoModel


def _check_loading_info(model: nn.Module, info: Mapping[str, Any], folder: Path) -> None:
    missing = list(info.get("missing_keys") or [])
    if not missing:
        return
    total = sum(1 for _ in model.state_dict())
    if total and len(missing) / total > _MAX_MISSING_FRACTION:
        raise ModelLoadError(
            f"weights in {folder} do not match {type(model).__name__}: {len(missing)} of {total} tensors "
            f"missing (e.g. {missing[0]}); check config.json 'architectures'"
        )
    warnings.warn(
        f"{len(missing)} tensors of {type(model).__name__} are not in the checkpoint and keep their "
        f"random init (e.g. {missing[0]})",
        stacklevel=3,
    )


def load_tokenizer(folder: str | Path):
    """Return the folder's tokenizer (``AutoTokenizer``, local files only), or None if it has none.

    Raises:
        ModelLoadError: tokenizer files are present but cannot be loaded.
    """
    folder = Path(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    transformers = _import_transformers()
    try:
        with _quiet(transformers):
            return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {_one_line(err)}") from err


def _forward_params(model: nn.Module) -> list[str]:
    sig = inspect.signature(model.forward)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
