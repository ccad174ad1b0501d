"""The request contract of ``POST /v1/videos``: OpenAI's fields, then every field of ``engine.request.FIELDS``.

OpenAI's fields: ``prompt``, ``model`` (must be the served model's name when given), ``size`` (``WIDTHxHEIGHT``),
``seconds`` and ``input_reference`` (the first frame). mvgen's own fields are ``engine.request.FIELDS`` under their
own names (``references``, ``steps``, ``seed``, ``ref_size``, ...), read by their kind, so a field added there is
accepted here and appears in ``/openapi.json`` with no other edit. Everything is read when a request arrives (or
the schema is built), never at import.

``seconds`` becomes the 4k+1 frame count nearest to ``seconds x fps`` (Wan's VAE takes one frame, then groups of
4): ``frames = 4 * round((seconds * fps - 1) / 4) + 1``, at least 1; at 16 fps 4 s is 65 frames, 5 s is 81.

Multipart forms carry files as uploads and everything else as text: numbers as decimal text, ``ref_size`` as
``HEIGHTxWIDTH`` (the CLI's spelling), a list as the field repeated (or ``name[]``, as the ``openai`` client
sends a list in ``extra_body``). JSON bodies carry typed values. Images are uploads, or base64 text (plain or a
``data:image/...;base64,`` URL) in either body; remote URLs are never fetched.
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from engine import request as contract

from .errors import bad_request

# OpenAI's own fields; ``input_reference`` is mvgen's ``first_frame``
OPENAI_FIELDS = ("model", "seconds", "size", "input_reference")
FIRST_FRAME = "first_frame"
# a list spelt ``name[]``: how the openai client sends a list of ``extra_body`` in a multipart form
_ARRAY_SUFFIX = "[]"


@dataclass(frozen=True)
class Submission:
    """A parsed ``POST /v1/videos``: mvgen's fields as given (images as encoded bytes) and OpenAI's own."""

    values: dict
    model: str | None = None
    seconds: float | None = None
    size: tuple[int, int] | None = None  # (width, height), OpenAI's order

    def request_values(self, fps: float, temporal_multiple: int) -> dict:
        """``make_request``'s keywords: ``seconds`` and ``size`` turned into ``num_frames``, ``height``, ``width``."""
        values = dict(self.values)
        if self.seconds is not None:
            values["num_frames"] = frames_for_seconds(self.seconds, fps, temporal_multiple)
        if self.size is not None:
            values["width"], values["height"] = self.size
        return values


def frames_for_seconds(seconds: float, fps: float, temporal_multiple: int = 4) -> int:
    """The ``temporal_multiple``k+1 frame count nearest to ``seconds * fps`` (at least 1)."""
    k = max(0, round((seconds * fps - 1) / temporal_multiple))
    return temporal_multiple * k + 1


def field_in(message: str) -> str | None:
    """The field a refusal starts with (``"width must be ..."`` -> ``width``): its ``param``."""
    names = sorted((f.name for f in contract.FIELDS), key=len, reverse=True)
    return next((name for name in names if message.startswith((f"{name} ", f"{name}:"))), None)


def field_names() -> list[str]:
    return ["prompt", *OPENAI_FIELDS, *(f.name for f in contract.FIELDS if f.name != "prompt")]


# ---- multipart forms -----------------------------------------------------------------------------------------
def parse_form(items: list[tuple[str, str | bytes]]) -> Submission:
    """A multipart form's ``(name, value)`` parts in order: text as ``str``, uploaded files as ``bytes``."""
    given: dict[str, list] = {}
    for name, value in items:
        if name.startswith("input_reference[") and name.endswith("]"):  # the openai client's {"image_url": ...}
            value = _reference_object(name[len("input_reference["):-1], value)
            name = "input_reference"
        given.setdefault(name.removesuffix(_ARRAY_SUFFIX), []).append(value)
    _known(given)
    values = {}
    for field in contract.FIELDS:
        if field.name in given:
            values[field.name] = _FORM_READERS[field.kind](field.name, given[field.name])
    openai = {name: _one(name, given[name]) for name in OPENAI_FIELDS if name in given}
    for name in ("model", "seconds", "size"):
        if name in openai:
            openai[name] = _text_part(name, openai[name])
    return _with_openai_fields(values, openai)


def _one(name: str, values: list):
    if len(values) != 1:
        raise bad_request(f"{name} takes one value, got {len(values)}", name)
    return values[0]


def _text_part(name: str, value) -> str:
    if isinstance(value, bytes):
        raise bad_request(f"{name} is a text field, got an uploaded file", name)
    return value


def _form_text(name, values):
    return _text_part(name, _one(name, values))


def _form_integer(name, values):
    text = _form_text(name, values).strip()
    try:
        return int(text)
    except ValueError:
        return text  # refused by the field's rule, in its words


def _form_number(name, values):
    text = _form_text(name, values).strip()
    try:
        return float(text)
    except ValueError:
        return text


def _form_numbers(name, values):
    parts = [p for v in values for p in _text_part(name, v).replace(",", " ").split()]
    return [_form_number(name, [p]) for p in parts]


def _form_size(name, values):
    if len(values) == 2:  # ``ref_size[]=H`` ``ref_size[]=W`` from a list
        return tuple(_form_integer(name, [v]) for v in values)
    text = _form_text(name, values)
    height, sep, width = text.lower().partition("x")
    try:
        return (int(height), int(width)) if sep else text
    except ValueError:
        return text


def _form_image(name, values):
    return image_bytes(name, _one(name, values))


def _form_images(name, values):
    return [image_bytes(name, v) for v in values]


_FORM_READERS = {"text": _form_text, "integer": _form_integer, "number": _form_number, "numbers": _form_numbers,
                 "size": _form_size, "image": _form_image, "images": _form_images, "frames": _form_images}


def _reference_object(key: str, value):
    if key == "image_url":
        return value
    raise bad_request(f"input_reference[{key}] is not supported: upload the first frame, or give "
                      f"input_reference[image_url] as a data: URL", "input_reference")


# ---- JSON bodies ---------------------------------------------------------------------------------------------
def parse_json(body) -> Submission:
    """A JSON object's fields: typed values; images as base64 text (lists of it for several)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    if isinstance(body.get("input_reference"), dict):
        reference = body["input_reference"]
        body = {**body, "input_reference": _reference_object(next(iter(reference), ""), reference.get("image_url"))}
    _known(body)
    values = {}
    for field in contract.FIELDS:
        value = body.get(field.name)
        if value is not None:
            values[field.name] = _json_value(field, value)
    return _with_openai_fields(values, {name: body[name] for name in OPENAI_FIELDS if body.get(name) is not None})


def _json_value(field, value):
    if field.kind == "image":
        return image_bytes(field.name, value)
    if field.kind in ("images", "frames"):
        if not isinstance(value, list):
            raise bad_request(f"{field.name} must be a list of base64 images, got a JSON {type(value).__name__}",
                              field.name)
        return [image_bytes(field.name, v) for v in value]
    if field.kind == "size" and isinstance(value, str):
        return _form_size(field.name, [value])
    if field.kind == "size" and isinstance(value, list):
        return tuple(value)
    return value


# ---- shared --------------------------------------------------------------------------------------------------
def _known(given) -> None:
    names = field_names()
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise bad_request(f"unknown field(s) {unknown}; the fields are {names}", unknown[0])


def _with_openai_fields(values: dict, openai: dict) -> Submission:
    if "input_reference" in openai:
        if FIRST_FRAME in values:
            raise bad_request("give input_reference or first_frame (the same image), not both", "input_reference")
        values[FIRST_FRAME] = image_bytes("input_reference", openai["input_reference"])
    for name in ("model", "seconds", "size"):
        value = openai.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise bad_request(f"{name} must be text, got {value!r}", name)
    seconds = _seconds(openai["seconds"]) if "seconds" in openai else None
    if seconds is not None and values.get("num_frames") is not None:
        raise bad_request("give seconds or num_frames, not both", "seconds")
    size = _size(str(openai["size"])) if "size" in openai else None
    if size is not None and (values.get("height") is not None or values.get("width") is not None):
        raise bad_request("give size or height/width, not both", "size")
    model = str(openai["model"]) if "model" in openai else None
    return Submission(values=values, model=model, seconds=seconds, size=size)


def _seconds(value) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise bad_request(f"seconds must be a number > 0 (the video's length), got {value!r}", "seconds")
    return seconds


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    try:
        if sep:
            return int(width), int(height)
    except ValueError:
        pass
    raise bad_request(f"size must be WIDTHxHEIGHT in pixels (e.g. 832x480), got {text!r}", "size")


def image_bytes(name: str, value) -> bytes:
    """An uploaded file's bytes, or the bytes of base64 text (plain or a ``data:`` URL)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise bad_request(f"{name} must be an uploaded image or base64 text, got {type(value).__name__}", name)
    text = value.strip()
    if text.startswith(("http://", "https://")):
        raise bad_request(f"{name}: remote URLs are not fetched; upload the image, or send it as base64 or a "
                          f"data: URL", name)
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request(f"{name}: a data: URL must be base64 (data:image/png;base64,...)", name)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{name}: neither an uploaded file nor base64 image data (upload it with "
                          f"multipart/form-data, or send base64 or a data: URL)", name) from None


# ---- the OpenAPI description ---------------------------------------------------------------------------------
def _image_schema(form: bool) -> dict:
    if form:
        return {"type": "string", "format": "binary"}
    return {"type": "string", "description": "base64 image data or a data:image/...;base64, URL"}


def _kind_schema(kind: str, form: bool) -> dict:
    if kind == "image":
        return _image_schema(form)
    if kind in ("images", "frames"):
        return {"type": "array", "items": _image_schema(form)}
    if kind == "size":
        if form:
            return {"type": "string", "pattern": r"^\d+x\d+$", "description": "HEIGHTxWIDTH"}
        return {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
    return {"text": {"type": "string"}, "integer": {"type": "integer"}, "number": {"type": "number"},
            "numbers": {"type": "array", "items": {"type": "number"}}}[kind]


def request_schema(form: bool, fps_words: str) -> dict:
    """The JSON schema of ``POST /v1/videos``'s body, as a multipart form (``form``) or a JSON object."""
    properties = {
        "model": {"type": "string", "description": "the served model's name (GET /health names it); optional"},
        "seconds": {"type": "string", "description": f"length in seconds: frames = the 4k+1 count nearest to "
                                                     f"seconds x fps ({fps_words}); or give num_frames"},
        "size": {"type": "string", "description": "WIDTHxHEIGHT in pixels (OpenAI's order), each a multiple of 16; "
                                                  "or give width and height"},
        "input_reference": {**_image_schema(form), "description": "the first frame (mvgen's first_frame)"},
    }
    for field in contract.FIELDS:
        properties[field.name] = {**_kind_schema(field.kind, form), "description": field.describe()}
    properties = {"prompt": properties.pop("prompt"), **properties}
    return {"type": "object", "properties": properties,
            "required": [f.name for f in contract.FIELDS if f.required]}


def request_body(fps_words: str) -> dict:
    """``openapi_extra`` of the create route: both bodies it reads."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": request_schema(True, fps_words)},
        "application/json": {"schema": request_schema(False, fps_words)},
    }}}


def wire_values(request, given: dict) -> dict:
    """What a job sends Triton (``server.client.GenerationInputs``' keywords): the validated ``request``'s values,
    the model's defaults filled in, except images, which travel as the encoded bytes they arrived as."""
    out = {}
    for field in contract.FIELDS:
        if field.kind in contract.IMAGE_KINDS:
            if given.get(field.name) not in (None, [], b""):
                out[field.name] = given[field.name]
            continue
        value = getattr(request, field.name)
        if value is not None and value != ():
            out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


# how each kind of field is spelt in a multipart form and in a JSON body (the README's table)
_SPELLING = {
    "text": ("text", "string"),
    "integer": ("decimal text", "integer"),
    "number": ("decimal text", "number"),
    "numbers": ("the field repeated, or `a,b,c`", "array of numbers"),
    "size": ("`HEIGHTxWIDTH`", "`[height, width]`"),
    "image": ("a file, or base64 text", "base64 text or `data:` URL"),
    "images": ("files (the field repeated), or base64 texts", "array of base64 texts"),
    "frames": ("files (the field repeated), or base64 texts", "array of base64 texts"),
}
_OPENAI_ROWS = (
    ("model", "text", "string", "the served model's name (`GET /health` says it); optional"),
    ("size", "`WIDTHxHEIGHT`", "string", "video size in pixels, OpenAI's order (width first); or `width` + `height`"),
    ("seconds", "decimal text", "string", "length: the 4k+1 frame count nearest to seconds x fps (16 fps: 4 s = 65 "
                                          "frames); or `num_frames`"),
    ("input_reference", "a file, or base64 text", "base64 text or `data:` URL", "the first frame (`first_frame`)"),
)


def markdown_table() -> str:
    """``POST /v1/videos``'s fields as the Markdown table of ``README.md``: OpenAI's, then ``engine.request.FIELDS``."""
    lines = ["| field | multipart form | JSON | meaning |", "|---|---|---|---|"]
    prompt = next(f for f in contract.FIELDS if f.name == "prompt")
    rows = [(prompt.name, *_SPELLING[prompt.kind], prompt.describe()), *_OPENAI_ROWS]
    rows += [(f.name, *_SPELLING[f.kind], f.describe()) for f in contract.FIELDS if f.name != "prompt"]
    lines += [f"| `{name}` | {form} | {body} | {meaning} |" for name, form, body, meaning in rows]
    return "\n".join(lines)
