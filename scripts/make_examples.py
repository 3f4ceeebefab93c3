"""Rebuild examples/mt_bench_prompts.parquet from ../shared/data/mt_bench_questions.jsonl: all 80 questions,
`prompt` (the first turn, what a plain `orchestrator run` sends), `turns` (both user turns, for
`data.turns_column=turns`) and `category` (for `data.keep_columns=[category]`)."""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

root = Path(__file__).resolve().parent.parent
source = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "data" / "mt_bench_questions.jsonl"
rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
table = pa.table({
    "id": [f"mt_bench_{r['question_id']}" for r in rows],
    "question_id": [r["question_id"] for r in rows],
    "category": [r["category"] for r in rows],
    "prompt": [r["turns"][0] for r in rows],
    "turns": pa.array([list(r["turns"]) for r in rows], pa.list_(pa.string())),
})
out = root / "examples" / "mt_bench_prompts.parquet"
pq.write_table(table, out)
print(f"{out}: {table.num_rows} questions, {sum(len(t) for t in table['turns'].to_pylist())} turns")
