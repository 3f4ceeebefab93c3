"""The result columns every run writes (plan.result_schema types them): names no input column kept in the
results (data.keep_columns, data.sampling_columns) and no structured answer's column may take."""
from __future__ import annotations

RESULT_COLUMNS = ("id", "response", "responses", "status", "error", "finish_reason", "stop", "prompt_tokens",
                  "reasoning", "output_tokens", "latency_s", "attempts", "token_logprobs", "top_logprobs")
# the result columns a scoring run does not write (it generates nothing): its input's may be kept in their place,
# e.g. the response it scored and the generation's finish_reason (orchestrator.scoring)
NOT_SCORED = ("response", "finish_reason", "stop", "prompt_tokens", "reasoning", "output_tokens")
