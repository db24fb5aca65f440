"""Load a dataset by name through `datasets`: built-ins, local files, `save_to_disk` folders, the Hub."""

import contextlib
import logging
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from rlhf_cli.config.sections import DataConfig
from rlhf_cli.errors import UserError
from rlhf_cli.hub import before_lookup

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_dict(name: str, config_name: str | None = None, world_seed: int = 0) -> DatasetDict:
    """Every split of a dataset. A single local file is one `train` split."""
    if name.startswith("builtin:"):
        from rlhf_cli.builtin.datasets import load_builtin_dataset

        return load_builtin_dataset(name.removeprefix("builtin:"), seed=world_seed)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_folder(path)
    if path.suffix in FILE_BUILDERS or name.startswith((".", "/", "~")):
        raise UserError(f"data.dataset_name: file {name!r} not found; check the path.")
    return _load_hub(name, config_name)


def _load_file(path: Path) -> DatasetDict:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(
            f"data.dataset_name: {path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_BUILDERS)}."
        )
    if path.stat().st_size == 0:
        raise UserError(f"data.dataset_name: {path} is empty; it needs at least one row.")
    try:
        with _quiet_datasets_logger():  # datasets logs the parser's traceback before raising
            return datasets.load_dataset(builder, data_files={"train": str(path)})
    except Exception as err:  # datasets wraps parser errors in several exception types
        cause = err.__cause__ or err
        raise UserError(f"data.dataset_name: could not read {path} as {builder}: {cause}".rstrip(".") + ".") from None


@contextlib.contextmanager
def _quiet_datasets_logger():
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_folder(path: Path) -> DatasetDict:
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS)
    if not files:
        raise UserError(
            f"data.dataset_name: folder {path} holds neither a `save_to_disk` dataset nor data files "
            f"({', '.join(FILE_BUILDERS)})."
        )
    builder = FILE_BUILDERS[files[0].suffix.lower()]
    splits = {p.stem: str(p) for p in files if FILE_BUILDERS[p.suffix.lower()] == builder}
    return datasets.load_dataset(builder, data_files=splits)


def _load_hub(name: str, config_name: str | None) -> DatasetDict:
    before_lookup(name)
    try:
        return datasets.load_dataset(name, config_name)
    except Exception as err:
        raise UserError(
            f"data.dataset_name: {name!r} is not a `builtin:` name, a local file or folder, and could not be "
            f"loaded from the Hugging Face Hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Check the name, or your network / HF_HUB_OFFLINE."
        ) from None


def load_splits(data: DataConfig) -> tuple[Dataset, Dataset | None]:
    """The train split and the held-out split (None when there is none), trimmed to max_*_samples."""
    splits = load_dataset_dict(data.dataset_name, data.dataset_config, data.world_seed)
    if data.dataset_train_split not in splits:
        raise UserError(
            f"data.dataset_train_split: {data.dataset_train_split!r} is not a split of {data.dataset_name}; "
            f"it has: {', '.join(splits)}."
        )
    train = _trim(splits[data.dataset_train_split], data.max_train_samples)
    if len(train) == 0:
        raise UserError(f"data.dataset_name: the {data.dataset_train_split!r} split of {data.dataset_name} is empty.")
    test = None
    if data.dataset_test_split is not None:
        if data.dataset_test_split in splits:
            test = _trim(splits[data.dataset_test_split], data.max_eval_samples)
        else:
            log.warning(
                "%s has no %r split (it has: %s): held-out evaluation is skipped. "
                "Set data.dataset_test_split to one of those, or to null to silence this.",
                data.dataset_name, data.dataset_test_split, ", ".join(splits),
            )
    return train, test


def _trim(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def require_columns(dataset: Dataset, columns: dict[str, str], source: str) -> None:
    """Exit with a clear message when a configured column is missing; `columns` maps key -> column."""
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise UserError(
                f"{key}: column {column!r} not found in {source}; it has: {', '.join(dataset.column_names)}. "
                f"Set {key} to the right column."
            )


def column_values(dataset: Dataset, name: str) -> list:
    """Every value of column `name`, read in one piece. (`dataset[name]` is a lazy column: iterating it,
    as `np.asarray` or `list` do, reads row by row, ~0.3 s per 20,000 rows.)"""
    return dataset[name][:]
