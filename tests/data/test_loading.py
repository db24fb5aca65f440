"""Dataset loading: local files of every kind, save_to_disk folders, splits, missing columns."""

import json

import pytest
from datasets import Dataset, DatasetDict

from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.loading import load_dataset_dict, load_splits, require_columns
from rlhf_cli.errors import UserError

ROWS = [{"text": "a good film", "label": 1}, {"text": "a bad film", "label": 0}, {"text": "fine", "label": 1}]


def write_rows(path, fmt):
    ds = Dataset.from_list(ROWS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        ds.to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_load_as_train_split(tmp_path, fmt):
    path = write_rows(tmp_path / f"data.{fmt}", fmt)
    splits = load_dataset_dict(str(path))
    assert list(splits) == ["train"] and splits["train"]["text"] == [r["text"] for r in ROWS]


def test_save_to_disk_folder_and_folder_of_files(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "saved"))
    assert set(load_dataset_dict(str(tmp_path / "saved"))) == {"train", "test"}
    files = tmp_path / "files"
    files.mkdir()
    write_rows(files / "train.jsonl", "jsonl")
    write_rows(files / "test.jsonl", "jsonl")
    assert set(load_dataset_dict(str(files))) == {"train", "test"}


def test_load_splits_trims_and_skips_missing_test_split(tmp_path, caplog):
    path = write_rows(tmp_path / "d.jsonl", "jsonl")
    train, test = load_splits(SFTDataConfig(dataset_name=str(path), max_train_samples=2))
    assert len(train) == 2 and test is None
    assert "no 'test' split" in caplog.text
    with pytest.raises(UserError, match="dataset_train_split: 'training' is not a split.*it has: train"):
        load_splits(SFTDataConfig(dataset_name=str(path), dataset_train_split="training"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "file 'MISSING' not found"),
        ("empty.jsonl", "", "is empty"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', "could not read"),
        ("data.txt", "hello\n", "unsupported file type '.txt'"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message.replace("MISSING", str(path)).replace("(", r"\(")):
        load_dataset_dict(str(path))


def test_unreachable_hub_name_is_a_user_error():
    with pytest.raises(UserError, match="could not be loaded from the Hugging Face Hub"):
        load_dataset_dict("someone/does-not-exist-anywhere")


def test_missing_column_names_it_and_lists_existing():
    ds = Dataset.from_list(ROWS)
    with pytest.raises(UserError) as info:
        require_columns(ds, {"data.text_column": "review"}, "my.jsonl")
    assert str(info.value) == (
        "data.text_column: column 'review' not found in my.jsonl; it has: text, label. Set data.text_column to the right column."
    )
