"""The simulator's Triton routes (KServe v2): health, server and model metadata, model config, infer and
the generate extension, for a PyTriton NeMo model or a TensorRT-LLM ensemble (``triton_tensors``)."""
from __future__ import annotations

import json
import math

from aiohttp import web

from .model import _dumps, _logprob, generate_text
from .triton_tensors import (
    _BATCH_NOTE,
    _BYTE_SIZES,
    _dims,
    _read_json_data,
    _Tensor,
    _TritonError,
    _TritonModelError,
)
from .validation import _is_int, _json


class _TritonRequests:
    """How Triton's HTTP front end and core read a request: the model lookup, the JSON body, the infer
    request's tensors and their checks against the model's inputs."""

    def _triton_lookup(self, request: web.Request) -> str:
        """The model name, or _TritonError(404) like Triton's model repository."""
        name, version = request.match_info["name"], request.match_info.get("version")
        if name != self.s.model_name:
            raise _TritonError(404, f"Request for unknown model: '{name}' is not found")
        if version is not None and int(version) != 1:
            raise _TritonError(404, f"Request for unknown model: '{name}' version {int(version)} is not found")
        return name

    @staticmethod
    def _triton_error(exc: _TritonError) -> web.Response:
        if isinstance(exc, _TritonModelError):  # Triton sends the model's error as text/plain
            return web.Response(body=_dumps({"error": exc.message}).encode(), status=exc.status,
                                content_type="text/plain")
        return _json({"error": exc.message}, exc.status)

    def _triton_parse_infer(self, body) -> tuple[list[tuple[str, str, list[int], list]], list[str], str]:
        """The HTTP front end's reading of an infer request: (inputs, requested outputs, request id)."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            reason = ("attempt to access JSON non-array as array" if isinstance(body, dict) and "inputs" in body
                      else "attempt to access non-existing object member 'inputs'")
            raise _TritonError(500, f"Unable to parse 'inputs': {reason}")
        request_id = body.get("id") if isinstance(body.get("id"), str) else ""
        prefix = f"[request id: {request_id or '<id_unknown>'}] "
        tensors, seen = [], set()
        for item in body["inputs"]:
            for key in ("name", "datatype"):
                if not isinstance(item, dict) or not isinstance(item.get(key), str):
                    raise _TritonError(500, f"Unable to parse '{key}': attempt to access JSON non-string as string")
            name, datatype = item["name"], item["datatype"]
            shape = item.get("shape")
            if not isinstance(shape, list):
                raise _TritonError(500, "Unable to parse 'shape': attempt to access JSON non-array as array")
            if not all(_is_int(d) and d >= 0 for d in shape):
                raise _TritonError(500, "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as "
                                        "unsigned-integer")
            if name in seen:
                raise _TritonError(400, f"{prefix}input '{name}' already exists in request")
            seen.add(name)
            if "data" not in item:
                raise _TritonError(400, "Input must set only one of the following fields: 'data', 'binary_data_size' "
                                        "in 'parameters', 'shared_memory_region' in 'parameters'. But no field is set")
            count = math.prod(shape)
            if count == 0:
                values = []
            elif not isinstance(item["data"], list):
                raise _TritonError(500, "Unable to parse 'data': attempt to access JSON non-array as array")
            else:
                values = _read_json_data(name, datatype, item["data"], count)
            tensors.append((name, datatype, shape, values))
        outputs = []
        for item in body.get("outputs") or []:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _TritonError(500, "Unable to parse 'name': attempt to access JSON non-string as string")
            if item["name"] != self.triton.output.name:
                raise _TritonError(400, f"unexpected inference output '{item['name']}' for model "
                                        f"'{self.s.model_name}'")
            outputs.append(item["name"])
        return tensors, outputs, request_id

    def _triton_validate(self, tensors, request_id: str) -> int:
        """Triton core's InferenceRequest::Normalize for a batching model; returns the batch size. It
        counts the inputs against the required and the total, and does not check that each required
        one is there: a request without one reaches the model. Its map of the inputs goes newest first
        (mostly: inputs sharing a hash bucket keep their order), so a check names the last bad input."""
        model, m = self.s.model_name, self.triton
        prefix = f"[request id: {request_id or '<id_unknown>'}] "
        tensors = tensors[::-1]
        names = [t[0] for t in tensors]
        required = [t.name for t in m.inputs if not t.optional]
        missing = [r for r in required if r not in names]
        if len(tensors) > len(m.inputs) or len(tensors) < len(required):
            got = "[" + ",".join(f"'{n}'" for n in names) + "]" if names else "[]"
            lacking = "[" + ",".join(f"'{n}'" for n in missing) + "]" if missing else "]"
            expected = (f"expected {len(m.inputs)} inputs" if len(required) == len(m.inputs)
                        else f"expected number of inputs between {len(required)} and {len(m.inputs)}")
            raise _TritonError(400, f"{prefix}{expected} but got {len(tensors)} inputs for model '{model}'. Got "
                                    f"input(s) {got}, but missing required input(s) {lacking}. Please provide all "
                                    f"required input(s).")
        specs = {t.name: t for t in m.inputs}
        batch = 0
        for name, _, shape, _ in tensors:
            if name not in specs:
                raise _TritonError(400, f"unexpected inference input '{name}' for model '{model}'")
            if not shape:
                raise _TritonError(400, f"{prefix}input '{name}' has no shape but model requires batch dimension "
                                        f"for '{model}'")
            if batch == 0:
                batch = shape[0]
            elif shape[0] != batch:
                raise _TritonError(400, f"{prefix}input '{name}' batch size does not match other inputs for "
                                        f"'{model}'")
        if batch > self.s.triton_max_batch_size:
            raise _TritonError(400, f"{prefix}inference request batch-size must be <= "
                                    f"{self.s.triton_max_batch_size} for '{model}'")
        for name, datatype, shape, values in tensors:
            spec = specs[name]
            if datatype != spec.datatype:
                raise _TritonError(400, f"{prefix}inference input '{name}' data-type is '{datatype}', but model "
                                        f"'{model}' expects '{spec.datatype}'")
            dims = shape[1:]
            if len(dims) != len(spec.dims) or any(c not in (-1, d) for c, d in zip(spec.dims, dims)):
                raise _TritonError(400, f"{prefix}unexpected shape for input '{name}' for model '{model}'. "
                                        f"Expected {_dims([-1, *spec.dims])}, got {_dims(shape)}. {_BATCH_NOTE}")
            count = max(1, shape[0]) * math.prod(dims)  # a batch of 0 is read as 1
            if datatype != "BYTES" and len(values) != count:
                size = _BYTE_SIZES[datatype]
                raise _TritonError(400, f"{prefix}input byte size mismatch for input '{name}' for model '{model}'. "
                                        f"Expected {count * size}, got {len(values) * size}")
            if datatype == "BYTES" and len(values) > count:
                raise _TritonError(400, f"{prefix}unexpected number of string elements {count + 1} for inference "
                                        f"input '{name}' for model '{model}', expecting {count}")
            if datatype == "BYTES" and len(values) < count:
                raise _TritonError(400, f"{prefix}expected {count} string elements for inference input '{name}' "
                                        f"for model '{model}', got {len(values)}")
        return batch

    @staticmethod
    async def _triton_body(request: web.Request, empty_error: str | None = None):
        """The HTTP front end's parse of a JSON body: a NUL ends the text, a UTF-8 BOM is skipped, NaN and
        Infinity are numbers, and a body it cannot parse is a 500 "failed to parse the request JSON buffer"
        (Triton's text after that is rapidjson's; this one's is Python's json's). empty_error: the 400 of a
        body with no bytes at all (infer reads it as the raw data of a lone input)."""
        raw = await request.read()
        if not raw and empty_error:
            raise _TritonError(400, empty_error)
        raw = raw.split(b"\0", 1)[0].removeprefix(b"\xef\xbb\xbf")
        if not raw.strip():
            raise _TritonError(500, f"failed to parse the request JSON buffer: The document is empty. at {len(raw)}")
        try:
            return json.loads(raw.decode("utf-8", "replace"))
        except ValueError as exc:
            raise _TritonError(500, f"failed to parse the request JSON buffer: {getattr(exc, 'msg', exc)}. at "
                                    f"{getattr(exc, 'pos', 0)}") from None


class _TritonRoutes(_TritonRequests):
    """Triton's KServe v2 routes, served one batch at a time like a PyTriton model instance."""

    async def triton_health(self, request: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="text/plain")  # 200, empty body: live and ready

    async def triton_server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": "triton", "version": "2.51.0", "extensions": [
            "classification", "sequence", "model_repository", "model_repository(unload_dependents)",
            "schedule_policy", "model_configuration", "system_shared_memory", "cuda_shared_memory",
            "binary_tensor_data", "parameters", "statistics", "trace", "logging"]})

    async def triton_model_ready(self, request: web.Request) -> web.Response:
        """200 when ready; an unknown model or version (or one still loading) is 400, not 404, on this route."""
        try:
            self._triton_lookup(request)
        except _TritonError:
            return _json({"error": "Model version not ready"}, 400)
        return web.Response(body=b"", content_type="text/plain")

    async def triton_metadata(self, request: web.Request) -> web.Response:
        try:
            name = self._triton_lookup(request)
        except _TritonError as exc:
            return self._triton_error(exc)
        m = self.triton
        io = [{"name": t.name, "datatype": t.datatype, "shape": [-1, *t.dims]} for t in m.inputs]
        return _json({"name": name, "versions": ["1"], "platform": m.platform or m.backend, "inputs": io,
                      "outputs": [{"name": m.output.name, "datatype": m.output.datatype,
                                   "shape": [-1, *m.output.dims]}]})

    async def triton_config(self, request: web.Request) -> web.Response:
        try:
            name = self._triton_lookup(request)
        except _TritonError as exc:
            return self._triton_error(exc)
        m = self.triton
        kind = {"BYTES": "TYPE_STRING"}

        def io(t: _Tensor, output: bool = False) -> dict:
            entry = {"name": t.name, "data_type": kind.get(t.datatype, "TYPE_" + t.datatype)}
            if output:
                return {**entry, "dims": list(t.dims), "label_filename": "", "is_shape_tensor": False,
                        "is_non_linear_format_io": False}
            return {**entry, "format": "FORMAT_NONE", "dims": list(t.dims), "is_shape_tensor": False,
                    "allow_ragged_batch": False, "optional": t.optional, "is_non_linear_format_io": False}

        # the keys and order of tritonserver 2.51's answer for a PyTriton model (an ensemble has no
        # dynamic batcher or instance group of its own)
        config = {"name": name, "platform": m.platform if m.platform == "ensemble" else "",
                  "backend": m.backend, "runtime": "", "version_policy": {"latest": {"num_versions": 1}},
                  "max_batch_size": self.s.triton_max_batch_size,
                  "input": [io(t) for t in m.inputs], "output": [io(m.output, True)],
                  "batch_input": [], "batch_output": [],
                  "optimization": {"priority": "PRIORITY_DEFAULT", "input_pinned_memory": {"enable": True},
                                   "output_pinned_memory": {"enable": True}, "gather_kernel_buffer_threshold": 0,
                                   "eager_batching": False}}
        if m.platform != "ensemble":
            config["dynamic_batching"] = {
                "preferred_batch_size": [self.s.triton_max_batch_size], "max_queue_delay_microseconds": 0,
                "preserve_ordering": False, "priority_levels": 0, "default_priority_level": 0,
                "priority_queue_policy": {}}
            config["instance_group"] = [{"name": f"{name}_0", "kind": "KIND_CPU", "count": 1, "gpus": [],
                                         "secondary_devices": [], "profile": [], "passive": False,
                                         "host_policy": ""}]
            config["default_model_filename"] = "model.py"
        config.update({"cc_model_filenames": {}, "metric_tags": {}, "parameters": {}, "model_warmup": []})
        return _json(config)

    def _nemo_answer(self, tensors, batch: int) -> list[str] | None:
        """What PyTriton and NeMo's triton_infer_fn do before generating: PyTriton cannot hand the model
        a tensor without elements; the function pops "prompts" (a KeyError without it) and squeezes its
        last axis (raising for rows of several strings); then, inside its try, it squeezes
        stop_words_list's, and answers that error as one row "An error occurred: ...", which PyTriton
        refuses for a batch of more than one. None: the model generates."""
        model, shapes = self.s.model_name, {name: shape for name, _, shape, _ in tensors}
        squeeze = "cannot select an axis to squeeze out which has size not equal to one"
        for _, datatype, shape, _ in tensors:
            if 0 in shape:
                raise _TritonModelError(model, "ValueError: Iteration of zero-sized operands is not enabled"
                                        if datatype == "BYTES" else
                                        "TypeError: memoryview: cannot cast view with zeros in shape or strides")
        if "prompts" not in shapes:
            raise _TritonModelError(model, "KeyError: 'prompts'")
        if shapes["prompts"][-1] != 1:
            raise _TritonModelError(model, f"ValueError: {squeeze}")
        if shapes.get("stop_words_list", [1])[-1] == 1:
            return None
        if batch > 1:
            raise _TritonModelError(model, f"ValueError: Received output tensors with different batch sizes: "
                                           f"outputs: (1, 1). Expected batch size: {batch}. ")
        return [f"An error occurred: {squeeze}"]

    async def _triton_run(self, tensors, batch: int, logprobs: list | None = None) -> list[str]:
        """The model: one generation per row, no prompt echo, special tokens kept in the text, the stop
        word kept at the end (TensorRT-LLM stops after it), EOS dropped. NeMo's model reads its sampling
        inputs from the first row, a row's stop word from its own row (``_nemo_answer`` for its errors)."""
        m, s = self.triton, self.s
        answer = self._nemo_answer(tensors, batch) if m.first_value else None
        if answer is not None:
            self._count("prompts", batch)
            return answer
        by_role = {spec.role: spec.name for spec in m.inputs if spec.role}
        rows = {name: shape for name, _, shape, _ in tensors}
        data = {name: values for name, _, _, values in tensors}
        if by_role["prompt"] not in data:  # the count check let it through; the model needs it
            raise _TritonModelError(s.model_name, f"KeyError: '{by_role['prompt']}'")

        def row_values(role: str, row: int) -> list:
            name = by_role[role]
            if name not in data or not data[name]:
                return []
            width = len(data[name]) // max(1, rows[name][0])
            row = 0 if m.first_value and role != "stop" else row
            return data[name][row * width:(row + 1) * width]

        outputs, longest = [], 0
        for row in range(batch):
            width = len(data[by_role["prompt"]]) // batch
            prompt = "".join(data[by_role["prompt"]][row * width:(row + 1) * width])
            max_tokens = (row_values("max_tokens", row) or [m.default_max_tokens])[0]
            seed = (row_values("seed", row) or [s.seed])[0]
            stop = [w for w in row_values("stop", row) if w]
            g = generate_text(prompt, max(0, int(max_tokens)), stop, int(seed), s.max_natural_tokens,
                              skip_special_tokens=False, include_stop_str=True)
            outputs.append(g.text)
            if logprobs is not None:  # the ensemble's output_log_probs: each generated token's
                logprobs.append([_logprob(t) for t in g.tokens])
            longest = max(longest, g.generated)
            self.counters["generated_tokens"] += g.generated
        await self._serialised(longest)
        self._count("prompts", batch)
        return outputs

    async def triton_infer(self, request: web.Request) -> web.Response:
        self._count("requests")
        try:
            name = self._triton_lookup(request)
            body = await self._triton_body(request, f"[request id: <id_unknown>] Raw request must only have 1 input "
                                                    f"(found 1) to be deduced but got {len(self.triton.inputs)} "
                                                    f"inputs in '{name}' model configuration")
            tensors, _, request_id = self._triton_parse_infer(body)
            batch = self._triton_validate(tensors, request_id)
        except _TritonError as exc:
            self._count("bad_requests")
            return self._triton_error(exc)
        await self._maybe_stall()
        if self._fail():
            return _json({"error": "simulated engine failure"}, 500)
        try:
            texts = await self._triton_run(tensors, batch)
        except _TritonModelError as exc:
            self._count("bad_requests")
            return self._triton_error(exc)
        out = {"model_name": name, "model_version": "1", "outputs": [{
            "name": self.triton.output.name, "datatype": "BYTES", "shape": [batch, 1], "data": texts}]}
        return _json({"id": request_id, **out} if request_id else out)

    async def triton_generate(self, request: web.Request) -> web.Response:
        """Triton's generate extension: top-level JSON keys (and those under "parameters") that name a
        model input become a tensor (a list: one row of a (-1,) input, a row an element of a (1,) one),
        the others request parameters; the response maps each output to a key (a lone element
        unwrapped)."""
        self._count("requests")
        try:
            name = self._triton_lookup(request)
            body = await self._triton_body(request)
            if not isinstance(body, dict):
                raise _TritonError(500, "attempt to get members for non-object")
            fields_ = dict(body)
            nested = fields_.pop("parameters", None)
            if nested is not None:
                if not isinstance(nested, dict):
                    raise _TritonError(500, "Expected JSON object for keyword: 'parameters': attempt to access "
                                            "JSON non-object as object")
                fields_.update(nested)
            specs = {t.name: t for t in self.triton.inputs}
            tensors = []
            for key, value in fields_.items():
                spec = specs.get(key)
                if spec is None:
                    if not isinstance(value, (str, int, float, bool)):
                        raise _TritonError(400, f"parameter '{key}' has invalid type. It should be either 'int', "
                                                f"'bool', or 'string'.")
                    continue  # a request parameter: the model ignores it
                # a list is one row of a (-1,) input, and one row each element of a (1,) input
                length = len(value) if isinstance(value, list) else 1
                shape = [1, length] if spec.dims == (-1,) else [length, *spec.dims]
                values = _read_json_data(key, spec.datatype, value, math.prod(shape))
                tensors.append((key, spec.datatype, shape, values))
            batch = self._triton_validate(tensors, "")
        except _TritonError as exc:
            self._count("bad_requests")
            return self._triton_error(exc)
        await self._maybe_stall()
        if self._fail():
            return _json({"error": "simulated engine failure"}, 500)
        # tensorrtllm_backend's ensemble outputs cum_log_probs and output_log_probs beside text_output; with
        # return_log_probs they hold the generated tokens' logprobs (a lone element unwrapped, as any output)
        logprobs = [] if self.triton.platform == "ensemble" and fields_.get("return_log_probs") is True else None
        try:
            texts = await self._triton_run(tensors, batch, logprobs)
        except _TritonModelError as exc:  # generate answers the model's error 400
            self._count("bad_requests")
            return _json({"error": exc.message}, 400)
        out = {"model_name": name, "model_version": "1",
               self.triton.output.name: texts[0] if len(texts) == 1 else texts}
        if logprobs:
            chosen = logprobs[0]
            out.update(cum_log_probs=sum(chosen), output_log_probs=chosen[0] if len(chosen) == 1 else chosen)
        return _json(out)
