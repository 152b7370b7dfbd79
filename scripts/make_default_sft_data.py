"""Regenerate src/posttrain/data/default_sft.jsonl, the embedded default SFT data set.

Short question -> answer chats from reasoning-gym generators (Apache-2.0, offline): a task style the default
model (SmolLM2-135M-Instruct) does not follow out of the box, so SFT has something real to learn, and held-out
rows come from the same generators with other seeds.
"""

import json
import random
import sys
from pathlib import Path

import reasoning_gym

TASKS = {
    "basic_arithmetic": 90,
    "chain_sum": 90,
    "letter_counting": 80,
    "leg_counting": 70,
    "spell_backward": 70,
}
SEED = 20261123


def main(out: Path) -> None:
    rows = []
    for i, (task, n) in enumerate(TASKS.items()):
        for entry in reasoning_gym.create_dataset(task, size=n, seed=SEED + i):
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": entry["question"].strip()},
                        {"role": "assistant", "content": f"The answer is {entry['answer']}."},
                    ]
                }
            )
    random.Random(SEED).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} conversations to {out}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent.parent / "src/posttrain/data/default_sft.jsonl"
    )
