"""Triton's tensors: the simulated model's inputs and outputs and how JSON data reads into them."""
from __future__ import annotations

from dataclasses import dataclass

from .model import EngineSettings
from .validation import _is_bool, _is_int, _is_num


@dataclass(frozen=True)
class _Tensor:
    name: str
    datatype: str
    dims: tuple[int, ...]        # without the batch dimension (the models batch: max_batch_size > 0)
    optional: bool = True
    role: str | None = None      # prompt, max_tokens, seed, stop: what the simulation reads from it


@dataclass(frozen=True)
class _TritonModel:
    platform: str
    backend: str
    inputs: tuple[_Tensor, ...]
    output: _Tensor
    first_value: bool        # NeMo's @first_value: sampling inputs are read from the first row only
    default_max_tokens: int


def _triton_model(s: EngineSettings) -> _TritonModel:
    if s.triton_model == "nemo":
        # nemo/export/tensorrt_llm.py get_triton_input: Tensor(shape=(-1,)), np.int_ (INT64), np.single
        # (FP32), bytes (BYTES), all optional but the prompts; PyTriton's python backend.
        inputs = (
            _Tensor("prompts", "BYTES", (-1,), False, "prompt"),
            _Tensor(s.triton_max_len_input, "INT64", (-1,), role="max_tokens"),
            _Tensor("top_k", "INT64", (-1,)),
            _Tensor("top_p", "FP32", (-1,)),
            _Tensor("temperature", "FP32", (-1,)),
            _Tensor("random_seed", "INT64", (-1,), role="seed"),
            _Tensor("stop_words_list", "BYTES", (-1,), role="stop"),
            _Tensor("bad_words_list", "BYTES", (-1,)),
            _Tensor("no_repeat_ngram_size", "FP32", (-1,)),
            _Tensor("task_id", "BYTES", (-1,)),
            _Tensor("lora_uids", "BYTES", (-1,)),
        )
        return _TritonModel("python", "python", inputs, _Tensor("outputs", "BYTES", (-1,)), True, 64)
    if s.triton_model == "trtllm":
        # tensorrtllm_backend's inflight_batcher_llm ensemble (text in, text out).
        inputs = (
            _Tensor("text_input", "BYTES", (1,), False, "prompt"),
            _Tensor("max_tokens", "INT32", (1,), False, "max_tokens"),
            _Tensor("bad_words", "BYTES", (-1,)),
            _Tensor("stop_words", "BYTES", (-1,), role="stop"),
            _Tensor("end_id", "INT32", (1,)),
            _Tensor("pad_id", "INT32", (1,)),
            _Tensor("top_k", "INT32", (1,)),
            _Tensor("top_p", "FP32", (1,)),
            _Tensor("temperature", "FP32", (1,)),
            _Tensor("length_penalty", "FP32", (1,)),
            _Tensor("repetition_penalty", "FP32", (1,)),
            _Tensor("min_length", "INT32", (1,)),
            _Tensor("presence_penalty", "FP32", (1,)),
            _Tensor("frequency_penalty", "FP32", (1,)),
            _Tensor("random_seed", "UINT64", (1,), role="seed"),
            _Tensor("return_log_probs", "BOOL", (1,)),
            _Tensor("beam_width", "INT32", (1,)),
            _Tensor("stream", "BOOL", (1,)),
        )
        return _TritonModel("ensemble", "", inputs, _Tensor("text_output", "BYTES", (-1,)), False, 16)
    raise ValueError(f"triton_model must be 'nemo' or 'trtllm', not {s.triton_model!r}")


_INT_RANGES = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}
_UINT_RANGES = {"UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64}
_TRITON_JSON_TYPES = {"BOOL", "FP32", "FP64", "BYTES", *_INT_RANGES, *_UINT_RANGES}
_BYTE_SIZES = {"BOOL": 1, "FP32": 4, "FP64": 8, **{t: bits // 8 for t, bits in {**_INT_RANGES, **_UINT_RANGES}.items()}}
_BATCH_NOTE = ("NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be "
               "prepended to each input shape. If you want to specify the full shape including the batch dim "
               "in your input dims config, try setting max_batch_size to zero. See the model configuration "
               "docs for more info on max_batch_size.")


class _TritonError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _TritonModelError(_TritonError):
    """The model's execute raising (PyTriton's traceback, shortened to its last line): Triton answers it
    500 on infer, its JSON body sent as text/plain, and 400 on generate."""

    def __init__(self, model: str, error: str):
        super().__init__(500, f"Failed to process the request(s) for model '{model}_0_0', message: "
                              f"TritonModelException: Model execute error: Traceback (most recent call last):\n"
                              f"  File \"model.py\", line 492, in execute\n    raise triton_responses_or_error\n"
                              f"{error}\n\n\n\nAt:\n  model.py(501): execute\n")


def _dims(dims) -> str:
    return "[" + ",".join(map(str, dims)) + "]"


def _flatten(data) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _read_json_data(name: str, datatype: str, data, count: int) -> list:
    """Triton's HTTP front end reading one JSON input's 'data' (http_server.cc ReadDataFromJson)."""
    values = _flatten(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _TritonError(500, "Unable to parse JSON bytes array: attempt to access JSON non-string as string")
        return values  # the element count is checked later, by the core
    if datatype in ("FP16", "BF16"):
        raise _TritonError(400, f"receiving {datatype} data via JSON is not supported. Please use the binary "
                                f"data format for input {name}")
    if datatype not in _TRITON_JSON_TYPES:
        raise _TritonError(400, f"invalid datatype for input {name}")
    for i, v in enumerate(values):
        if i >= count:
            raise _TritonError(500, "Unable to parse 'data': Shape does not match true shape of 'data' field")
        if datatype == "BOOL":
            ok, what = _is_bool(v), "boolean as boolean"
        elif datatype in _INT_RANGES:
            ok, what = _is_int(v) and -(2 ** 63) <= v < 2 ** 63, "signed-integer as signed-integer"
        elif datatype in _UINT_RANGES:
            ok, what = _is_int(v) and 0 <= v < 2 ** 64, "unsigned-integer as unsigned-integer"
        else:
            ok, what = _is_num(v), "number as double"
        if not ok:
            raise _TritonError(500, f"Unable to parse 'data': attempt to access JSON non-{what}")
    if len(values) != count:
        raise _TritonError(500, "Unable to parse 'data': Shape does not match true shape of 'data' field")
    return values

