"""output.format=openai_batch: the OpenAI Batch API's output lines, one JSON Lines file per unit, and the
run's output and error files once it completes.

`results/part-<unit:08d>.batch.jsonl` holds one Batch API output line per result row, in row order:

    {"id": "batch_req_...", "custom_id": <the row's id>, "response": {"status_code": 200, "request_id": ...,
     "body": <a chat.completion or text_completion object>}, "error": null}

for an answered row, and `{"id", "custom_id", "response": null, "error": {"code", "message"}}` for a failed
one. The object is a chat.completion when the rows were conversations (a /v1/chat/completions batch file,
data.messages_column or data.turns_column) or went to a chat API, else a text_completion. Its id and
request_id are digests of the custom_id (and rollout), so a unit written twice says the same.

The unit's file is published like a JSONL unit (its stats in a digest-named sidecar, the link the commit
point: exactly once), and beside its sidecar the unit's full result table, as Parquet, published before
the link too: status, report and resume read the table back (`read`), as for the other sinks. When the run
completes (`finish`, after summary.json), `output.jsonl` (the answered rows' lines) and `errors.jsonl`
(the failed rows') are assembled in the run directory from the committed units, a unit at a time, each
file replaced whole, so they are what OpenAI's output_file and error_file hold.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import fsops
from .jsonl_dir import JsonlDirSink, _digest, _jsonable


def _hex(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=12).hexdigest()


class OpenAIBatchSink(JsonlDirSink):
    """results/ as OpenAI Batch API output lines, one file per unit (see the module)."""

    format = "openai_batch"
    suffix = ".batch.jsonl"

    def __init__(self, root: Path):
        super().__init__(root)
        self._kind: tuple[str, bool] | None = None

    def table_sidecar(self, unit: int, digest: str) -> Path:
        return self.sidecar(unit, digest).with_suffix(".parquet")

    def _settings(self) -> tuple[str, bool]:
        """(model name, chat?) of the run: its engine.json, config.yaml and plan.json, read once."""
        if self._kind is None:
            import yaml

            try:
                cfg = yaml.safe_load((self.root / "config.yaml").read_text()) or {}
            except (OSError, yaml.YAMLError):
                cfg = {}
            try:
                plan = json.loads((self.root / "plan.json").read_text())
            except (OSError, ValueError):
                plan = {}
            engine, model = cfg.get("engine") or {}, cfg.get("model") or {}
            try:  # the name the running engine answered to (preflight.check_engine_identity), else the config's
                served = json.loads((self.root / "engine.json").read_text()).get("served model")
            except (OSError, ValueError, AttributeError):
                served = None
            name = served or engine.get("served_model_name") or model.get("name") or ""
            url = plan.get("batch_url")
            if url:
                chat = url.endswith("/chat/completions")
            else:
                chat = bool(plan.get("messages_column") or plan.get("turns_column") or engine.get("api") == "chat"
                            or (model.get("prompt") or {}).get("format") == "chat_template")
            self._kind = (name, chat)
        return self._kind

    def lines(self, table: pa.Table) -> bytes:
        """The Batch API output lines of a unit's result rows."""
        model, chat = self._settings()
        created = int(time.time())
        out = []
        for row in table.to_pylist():
            custom = row["id"] if isinstance(row["id"], str) else str(row["id"])
            key = (custom, row.get("rollout"))
            line = {"id": f"batch_req_{_hex('line', *key)}", "custom_id": custom}
            if row["status"] == "ok":
                ptokens, ctokens = row.get("prompt_tokens"), row.get("output_tokens")
                usage = {"prompt_tokens": ptokens, "completion_tokens": ctokens,
                         "total_tokens": ptokens + ctokens if ptokens is not None and ctokens is not None else None}
                choice = {"index": 0, "finish_reason": row.get("finish_reason"), "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": row["response"]}
                    if row.get("reasoning") is not None:
                        choice["message"]["reasoning_content"] = row["reasoning"]
                else:
                    choice["text"] = row["response"]
                body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{_hex('body', *key)}",
                        "object": "chat.completion" if chat else "text_completion", "created": created,
                        "model": model, "choices": [choice], "usage": usage}
                line.update(response={"status_code": 200, "request_id": f"req_{_hex('request', *key)}",
                                      "body": body}, error=None)
            else:
                line.update(response=None, error={"code": "request_failed", "message": row.get("error")})
            out.append(json.dumps(line, ensure_ascii=False, default=_jsonable) + "\n")
        return "".join(out).encode()

    def _write(self, tmp: Path, table: pa.Table, stats: dict) -> tuple[int, tuple[str, int, int]]:
        data = self.lines(table)
        with fsops.open_file(tmp, "wb") as fh:
            fh.write(data)
        return len(data), (_digest(data), table.num_rows, len(data))

    def _before_link(self, unit: int, table: pa.Table, stats: dict, written: tuple[str, int, int]) -> None:
        target = self.table_sidecar(unit, written[0])
        staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        self.sidecars.mkdir(parents=True, exist_ok=True)
        try:
            with fsops.open_file(staged, "wb") as fh:
                pq.write_table(table, fh)
        except OSError:
            staged.unlink(missing_ok=True)
            raise
        fsops.replace(staged, target)
        super()._before_link(unit, table, stats, written)

    def read_file(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        data = fsops.read_bytes(path)
        if data is None:
            raise FileNotFoundError(os.strerror(2), str(path))
        unit = self.unit_of(path.name)
        if unit is None:
            raise FileNotFoundError(os.strerror(2), f"{path} is not a unit's file")
        side = self.table_sidecar(unit, _digest(data))
        if columns is None:
            return pq.read_table(side)
        return pq.ParquetFile(side).read(columns=columns, use_threads=False)

    def check_file(self, path: Path, rows: int | None = None,
                   valid: Callable[[dict], object] | None = None) -> dict | str:
        found = super().check_file(path, rows, valid)
        if isinstance(found, dict):
            data = fsops.read_bytes(path)
            unit = self.unit_of(path.name)
            if data is None or unit is None or not self.table_sidecar(unit, _digest(data)).is_file():
                return f"has no result table in {self.sidecars} for its contents (cut, changed, or not published whole)"
        return found

    def finish(self) -> list[Path]:
        """output.jsonl and errors.jsonl in the run directory, from every committed unit in order."""
        done = sorted(self.done_units())
        targets = [self.root / "output.jsonl", self.root / "errors.jsonl"]
        staged = [t.with_name(f".{t.name}.{uuid.uuid4().hex}.tmp") for t in targets]
        try:
            with open(staged[0], "wb") as ok, open(staged[1], "wb") as failed:
                for unit in done:
                    for line in (fsops.read_bytes(self.file(unit)) or b"").splitlines(keepends=True):
                        (ok if json.loads(line).get("error") is None else failed).write(line)
            for tmp, target in zip(staged, targets):
                os.replace(tmp, target)
        finally:
            for tmp in staged:
                tmp.unlink(missing_ok=True)
        return targets
