"""The simulator's guided decoding, as vLLM serves it: `structured_outputs` ({"json": schema} or
{"choice": [...]}) on both OpenAI routes, and `response_format` ({"type": "json_schema", "json_schema":
{"name", "schema"}} or {"type": "json_object"}). The answer is a small JSON instance of the schema, a pure
function of the prompt and the seed; a malformed field is refused with vLLM's 400. With
--invalid-json-rate a share of the guided answers (deterministic from prompt and seed) breaks the schema, for
tests of the client's re-asks."""
from __future__ import annotations

import json
import math
import random
import zlib

from .model import _TOKEN_RE, VOCABULARY, _Generation, token_id

# vLLM's StructuredOutputsParams: the constraints, of which one only may be given, and its other fields
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
            "_backend", "_backend_was_auto")
_FORMATS = ("text", "json_object", "json_schema", "structural_tag")  # response_format.type


class Guide:
    """What a request asks its answer to be: a JSON schema (None: any JSON object) or one of some choices."""

    def __init__(self, schema: dict | None = None, choices: list | None = None):
        self.schema, self.choices = schema, choices


def read_guide(body: dict) -> tuple[Guide | None, tuple[str, str] | None]:
    """(the request's guide or None, or the (message, param) of vLLM's 400)."""
    so, rf = body.get("structured_outputs"), body.get("response_format")
    if so is not None:
        if not isinstance(so, dict):
            return None, ("structured_outputs: Input should be a valid dictionary", "structured_outputs")
        unknown = [k for k in so if k not in _CONSTRAINTS + _OPTIONS]
        if unknown:
            return None, (f"structured_outputs: Unexpected keyword argument {unknown[0]!r}", "structured_outputs")
        given = {k: so[k] for k in _CONSTRAINTS if so.get(k) not in (None, False)}
        if len(given) > 1:
            return None, ("You can only use one kind of structured outputs constraint but multiple are specified: "
                          f"{so}", "structured_outputs")
        if "json" in given:
            return _schema(given["json"], "structured_outputs")
        if "json_object" in given:
            return Guide(), None
        if "choice" in given:
            choice = given["choice"]
            if not isinstance(choice, list) or not choice or not all(isinstance(c, str) for c in choice):
                return None, ("structured_outputs.choice: Input should be a valid list of strings",
                              "structured_outputs")
            return Guide(choices=choice), None
        if given:
            return None, (f"structured_outputs.{next(iter(given))} is not served by the embedded engine (it answers "
                          f"json, json_object and choice)", "structured_outputs")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in _FORMATS:
            return None, ("response_format.type: Input should be 'text', 'json_object', 'json_schema' or "
                          "'structural_tag'", "response_format")
        if rf["type"] == "json_object":
            return Guide(), None
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str):
                return None, ("response_format.json_schema: Field required (an object with a name and a schema)",
                              "response_format")
            return _schema(js.get("schema", {}), "response_format")
        if rf["type"] == "structural_tag":
            return None, ("response_format structural_tag is not served by the embedded engine", "response_format")
    return None, None


def _schema(schema, param: str) -> tuple[Guide | None, tuple[str, str] | None]:
    """vLLM takes the schema as an object or as its JSON text; one its grammar compiler cannot read is a 400."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            return None, (f"Error in structured outputs: the JSON schema is not JSON ({exc})", param)
    if not isinstance(schema, dict):
        return None, ("Error in structured outputs: the JSON schema must be an object", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return None, (f"Error in structured outputs: invalid JSON schema: {exc.message}", param)
    return Guide(schema=schema), None


def instance(schema, rng: random.Random, depth: int = 0):
    """A small value valid for `schema` (the keywords of everyday schemas: type, properties, required, items,
    enum, const, anyOf/oneOf, lengths and bounds)."""
    if not isinstance(schema, dict) or depth > 8:
        return None if schema is False else 0
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return instance(schema[key][0], rng, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "string":
        low, high = int(schema.get("minLength", 1)), int(schema.get("maxLength", 24))
        text = ""
        while len(text) < low or not text:
            text = (text + " " + rng.choice(VOCABULARY)).strip()
        return text[:max(high, low)] if len(text) > high else text
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is None:
            low = math.floor(schema["exclusiveMinimum"]) + 1 if "exclusiveMinimum" in schema else 0
        if high is None:
            high = math.ceil(schema["exclusiveMaximum"]) - 1 if "exclusiveMaximum" in schema else low + 100
        low, high = math.ceil(low), math.floor(high)
        value = rng.randint(low, max(low, high))
        return value if kind == "integer" else value + (0.5 if value + 0.5 <= high else 0.0)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "array":
        low = int(schema.get("minItems", 1))
        count = rng.randint(low, max(low, min(int(schema.get("maxItems", low + 2)), low + 2)))
        return [instance(schema.get("items", {"type": "string"}), rng, depth + 1) for _ in range(count)]
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    value = {name: instance(sub, rng, depth + 1) for name, sub in props.items()}
    for name in schema.get("required") or []:
        value.setdefault(name, rng.choice(VOCABULARY))
    return value


def _rng(prompt: str, seed: int, salt: str) -> random.Random:
    return random.Random(zlib.crc32(f"{salt}\0{seed}\0{prompt}".encode()))


def guided_text(guide: Guide, prompt: str, seed: int, invalid_rate: float = 0.0) -> str:
    """The answer text: an instance of the schema (or one of the choices); one that breaks it with
    probability invalid_rate (not JSON, or JSON the schema refuses)."""
    if guide.choices is not None:
        return _rng(prompt, seed, "choice").choice(guide.choices)
    schema = guide.schema if guide.schema is not None else {"type": "object"}
    if invalid_rate > 0 and _rng(prompt, seed, "invalid").random() < invalid_rate:
        from jsonschema import Draft202012Validator

        broken = [] if schema.get("type") != "array" else {}
        return json.dumps(broken) if not Draft202012Validator(schema).is_valid(broken) else "{\"cut"
    return json.dumps(instance(schema, _rng(prompt, seed, "json")))


def guided_generation(guide: Guide, prompt: str, seed: int, budget: int, invalid_rate: float) -> _Generation:
    """The answer as a generation: its tokens, cut at the budget (finish_reason length, as vLLM's cut JSON)."""
    tokens = _TOKEN_RE.findall(guided_text(guide, prompt, seed, invalid_rate))
    cut = tokens[:budget]
    return _Generation("".join(cut), len(cut), "length" if len(tokens) > budget else "stop", None, len(cut),
                       tuple(map(token_id, cut)), tuple(cut))
