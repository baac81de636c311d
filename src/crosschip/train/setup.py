"""Everything a run needs before its first step: output dir, tokenizer, token dataset, model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from crosschip import checkpoint
from crosschip.data.dataset import TOKENIZER_DIR, TokenDataset, is_dataset, open_dataset
from crosschip.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from crosschip.errors import CrosschipError
from crosschip.fsio import scratch_dir
from crosschip.models import build_model, get_preset
from crosschip.train import parallel
from crosschip.train.config import TrainConfig
from crosschip.train.state import LATEST_POINTER, complete_steps, step_dir_name

METRICS_FILE = "metrics.jsonl"
PROBE_DIR = "probe"  # crosschip.probe.store.PROBE_DIR (not imported: it pulls in pyarrow)


def default_cache_dir() -> Path:
    """Raw text is tokenized into datasets cached by content hash, so one cache serves every run on the machine."""
    env = os.environ.get("CROSSCHIP_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crosschip"
    return base / "datasets"


def check_inputs(cfg: TrainConfig) -> None:
    """Cheap checks of --data, --model and --tokenizer, before the run directory is touched."""
    from crosschip.data.corpus import list_data_files
    from crosschip.data.tokenize import locate_input

    if is_dataset(Path(cfg.data)):
        open_dataset(Path(cfg.data))  # manifest, paths and sizes; the sha256s when the run opens it
    else:
        list_data_files(locate_input(Path(cfg.data)).data)
    if cfg.model not in _preset_names():
        if not Path(cfg.model).exists():
            get_preset(cfg.model)  # raises: neither a preset nor a path
        checkpoint.open_checkpoint(Path(cfg.model), verify=False)
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise CrosschipError(f"--tokenizer {cfg.tokenizer} is not a directory", "pass a tokenizer directory")


def resume_step_of(cfg: TrainConfig) -> int | None:
    """Check the output directory against --resume/--overwrite (writes nothing); the step to resume from."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise CrosschipError(f"--out {out} exists and is not a directory", "choose another --out")
    steps = complete_steps(out)
    if cfg.resume:
        if not steps:
            raise CrosschipError(f"--resume: {out} holds no complete checkpoint", "start without --resume")
        return steps[-1]
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise CrosschipError(
            f"output directory {out} already exists and is not empty",
            "pass --overwrite to replace it, --resume to continue it, or choose another --out",
        )
    return None


def open_out_dir(cfg: TrainConfig, resume_step: int | None) -> None:
    """Called once the inputs are known good: only then is an old run cleared (--overwrite)."""
    out = Path(cfg.out)
    if resume_step is None and out.exists():
        clear_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)


def clear_run_dir(out: Path) -> None:
    """--overwrite removes what a crosschip run writes, and nothing else a user may keep there."""
    for step in complete_steps(out):
        shutil.rmtree(out / step_dir_name(step))
    for name in (LATEST_POINTER, METRICS_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PROBE_DIR, ignore_errors=True)  # a --probe recording of the old run


@dataclass
class RunInputs:
    tokenizer: Any
    dataset: TokenDataset
    model: PreTrainedModel
    model_source: dict[str, Any]


def prepare_tokenizer(cfg: TrainConfig, resume_step: int | None) -> Any:
    out = Path(cfg.out)
    if resume_step is not None:
        return load_tokenizer(out / step_dir_name(resume_step) / "model")
    if cfg.tokenizer is not None:
        return load_tokenizer(Path(cfg.tokenizer))
    tokenized = is_dataset(Path(cfg.data))
    if cfg.model not in _preset_names():
        tok = checkpoint.load_tokenizer_if_present(Path(cfg.model))
        if tok is None and not tokenized:
            raise CrosschipError(
                f"checkpoint {cfg.model} has no tokenizer files",
                "pass --tokenizer DIR with the tokenizer it was trained with",
            )
        if tok is not None:
            return tok
    if tokenized:  # a tokenized dataset carries the tokenizer its ids belong to
        return load_tokenizer(Path(cfg.data) / TOKENIZER_DIR)
    from crosschip.data.tokenize import training_documents

    # Trained in a scratch dir: the tokenizer lives in memory and ships inside every checkpoint,
    # and nothing is written under --out before all inputs are known to be good.
    with scratch_dir("crosschip-tokenizer") as scratch:
        return train_tokenizer(training_documents(Path(cfg.data)), cfg.vocab_size, Path(scratch))


def _preset_names() -> set[str]:
    from crosschip.models import PRESETS

    return set(PRESETS)


def prepare_model(cfg: TrainConfig, tokenizer: Any, resume_step: int | None) -> tuple[PreTrainedModel, dict]:
    """A fresh preset model, a checkpoint to continue from, or the checkpoint of a resumed step."""
    if resume_step is not None:
        path = Path(cfg.out) / step_dir_name(resume_step) / "model"
        model, ckpt = checkpoint.load_model(path)
        source = (ckpt.manifest or {}).get("provenance", {}).get("model_source", {})
        if cfg.model in _preset_names() and source.get("preset") not in (None, cfg.model):
            raise CrosschipError(f"--resume: {cfg.out} trained the {source['preset']} preset, not {cfg.model}",
                                 f"pass --model {source['preset']} to continue it, or choose another --out")
        return model.train(), source
    if cfg.model in _preset_names():
        preset = get_preset(cfg.model)
        special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        config = preset.build_config(len(tokenizer), *special)
        return build_model(config, cfg.seed).train(), {"preset": preset.name, "arch": preset.arch}
    model, ckpt = checkpoint.load_model(Path(cfg.model))
    if model.config.vocab_size < len(tokenizer):
        raise CrosschipError(
            f"checkpoint vocab ({model.config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)})",
            "use the tokenizer the checkpoint was trained with",
        )
    files = (ckpt.manifest or {}).get("files", {})
    source = {"checkpoint": str(ckpt.path), "sha256": {k: v["sha256"] for k, v in files.items()}}
    return model.train(), source


def open_training_data(cfg: TrainConfig, tokenizer: Any, main: bool, log: Callable[[str], None]) -> TokenDataset:
    """--data as a tokenized dataset (sha256s checked by rank 0), or raw text tokenized into the cache."""
    data = Path(cfg.data)
    if is_dataset(data):
        dataset = open_dataset(data, verify=main)
    else:
        from crosschip.data.tokenize import cached_dataset

        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        dataset = cached_dataset(data, tokenizer, cache, cfg.val_fraction, cfg.seed, log=log if main else None)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != dataset.meta["tokenizer_fingerprint"]:
        raise CrosschipError(
            f"{data} was tokenized with another tokenizer than this run's (fingerprint "
            f"{dataset.meta['tokenizer_fingerprint'][:12]}, the run's {fingerprint[:12]})",
            "drop --tokenizer to use the dataset's own, or re-tokenize it: crosschip data tokenize IN OUT "
            "--tokenizer DIR")
    return dataset


def prepare_inputs(cfg: TrainConfig, resume_step: int | None, log: Callable[[str], None]) -> RunInputs:
    """Under torchrun rank 0 trains the tokenizer and fills the dataset cache; the others then share them."""
    main = parallel.rank() == 0
    tokenizer = parallel.broadcast_object(prepare_tokenizer(cfg, resume_step) if main else None)
    if not main:
        parallel.barrier()  # rank 0 has built (or found) the dataset: these ranks read its cache entry
    dataset = open_training_data(cfg, tokenizer, main, log)
    if main:
        parallel.barrier()
        log(f"data: {len(dataset.train):,} train / {len(dataset.val):,} val tokens ({dataset.root})")
    model, source = prepare_model(cfg, tokenizer, resume_step)  # the same seed: identical on every rank
    return RunInputs(tokenizer, dataset, model, source)
