"""Data for recipes/stack-llama from lvwerra/stack-exchange-paired (needs the Hugging Face Hub):

    python recipes/stack-llama/prepare_data.py [OUT] [ROWS]
        -> OUT/finetune (prompt, completion), OUT/reward (prompt, chosen, rejected), OUT/rl (prompt)
           default OUT: outputs/data/stack-exchange-paired, ROWS: 100000 per part

The dataset's folders data/finetune, data/reward and data/rl are disjoint, one per stage, as in
StackLLaMA. Rows are streamed (the whole set is tens of GB), questions become
"Question: <q>\\n\\nAnswer: " prompts, `response_j` (more upvotes) is the answer to imitate and the
`chosen` side of a pair, `response_k` the `rejected` side. SFT and RL keep one row per question.
Each part keeps 2% as a test split.
"""

import sys

TEST_FRACTION = 0.02


def prompt(question: str) -> str:
    return f"Question: {question}\n\nAnswer: "


def finetune_row(row: dict) -> dict:
    return {"prompt": prompt(row["question"]), "completion": row["response_j"]}


def reward_row(row: dict) -> dict:
    return {"prompt": prompt(row["question"]), "chosen": row["response_j"], "rejected": row["response_k"]}


def rl_row(row: dict) -> dict:
    return {"prompt": prompt(row["question"])}


PARTS = {"finetune": (finetune_row, True), "reward": (reward_row, False), "rl": (rl_row, True)}


def take(rows, make, one_per_question: bool, limit: int) -> list[dict]:
    """The first `limit` rows made by `make`, skipping repeated questions when asked."""
    kept, seen = [], set()
    for row in rows:
        if one_per_question:
            if row["question"] in seen:
                continue
            seen.add(row["question"])
        kept.append(make(row))
        if len(kept) == limit:
            break
    return kept


def main(out: str = "outputs/data/stack-exchange-paired", limit: str = "100000") -> None:
    from datasets import Dataset, load_dataset

    for part, (make, one_per_question) in PARTS.items():
        stream = load_dataset("lvwerra/stack-exchange-paired", data_dir=f"data/{part}", split="train", streaming=True)
        rows = Dataset.from_list(take(stream, make, one_per_question, int(limit)))
        rows.train_test_split(test_size=TEST_FRACTION, seed=0).save_to_disk(f"{out}/{part}")
        print(f"{part}: {len(rows)} rows -> {out}/{part}")


if __name__ == "__main__":
    main(*sys.argv[1:])
