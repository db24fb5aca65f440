"""Prompts for recipes/detoxify from allenai/real-toxicity-prompts (needs the Hugging Face Hub):

    python recipes/detoxify/prepare_data.py [OUT]      # default OUT: outputs/data/real-toxicity-prompts

The dataset keeps each prompt in a nested record ({"text", "toxicity", ...}); PPO reads a plain
`prompt` column. Only the more toxic prompts (toxicity > 0.3) are kept, as in TRL's toxicity
example, and 5% are held out as a test split, so evaluation uses prompts PPO never trained on.
"""

import sys

MIN_TOXICITY = 0.3
TEST_FRACTION = 0.05


def keep(row: dict) -> bool:
    toxicity = row["prompt"].get("toxicity")
    return toxicity is not None and toxicity > MIN_TOXICITY


def flatten(row: dict) -> dict:
    return {"prompt": row["prompt"]["text"], "prompt_toxicity": row["prompt"]["toxicity"]}


def main(out: str = "outputs/data/real-toxicity-prompts") -> None:
    from datasets import load_dataset

    rows = load_dataset("allenai/real-toxicity-prompts", split="train").filter(keep)
    rows = rows.map(flatten, remove_columns=rows.column_names)
    rows.train_test_split(test_size=TEST_FRACTION, seed=0).save_to_disk(out)
    print(f"{len(rows)} prompts with toxicity > {MIN_TOXICITY} -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
