"""HTTP routers of the gateway: operations (/healthz, /readyz, /metrics), models (/v1/models),
synchronous segmentation (/v1/segment) and asynchronous jobs (/v1/jobs).

Every error body has one shape, :class:`ErrorBody`: ``{"error": {"code", "message", "detail"?,
"request_id"?}}``.

The upload of ``/v1/segment`` and ``/v1/jobs`` is read here, once for both: ``multipart/form-data``
with ``file`` parts and the segmentation options as query parameters or form fields. The query
parameters (:func:`option_query`), the form fields and the OpenAPI request body
(:func:`upload_request_body`) are generated from :class:`~sfpc.inference.options.SegmentOptions`,
the one declaration of the options.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from fastapi import Query, Request
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from sfpc.errors import OptionError, ServiceError
from sfpc.inference.options import (
    OptionField,
    SegmentOptions,
    option_fields,
    option_names,
    parse_options,
)

FILE_FIELD = "file"


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable slug, e.g. 'invalid_image'.")
    message: str = Field(description="What is wrong, in words, and what to do instead.")
    detail: Any = Field(None, description="Structured detail (e.g. the invalid fields).")
    request_id: str | None = Field(None, description="Quote it when reporting a problem.")


class ErrorBody(BaseModel):
    error: ErrorInfo


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the JSON error body for ``statuses``."""
    words = {400: "Malformed request or upload", 401: "Missing or invalid API key",
             404: "Not found", 413: "Upload over a size limit", 415: "Unsupported media type "
             "or file format", 422: "Readable but unusable input or options",
             500: "Server bug (quote the request id)", 502: "Inference backend failed",
             503: "Not ready or overloaded", 504: "Timed out"}
    return {status: {"model": ErrorBody, "description": words.get(status, "Error")}
            for status in statuses}


# ----------------------------------------------------------------------------------------------
# The options as query parameters
# ----------------------------------------------------------------------------------------------


def _query_parameter(field: OptionField) -> inspect.Parameter:
    # Loose types on purpose: FastAPI checks only the shape (a boolean, a length), and
    # parse_options checks the values, so that a bad value answers 422 invalid_option with the
    # field named, whether it came as a query parameter or a form field.
    annotation: Any = {"bool": bool | None, "list": list[str] | None}.get(field.kind, str | None)
    default = Query(None, description=field.description, max_length=field.max_length)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def _option_query(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


# FastAPI reads a dependency's parameters from its signature: one query parameter per field.
_option_query.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_query_parameter(field) for field in option_fields()], return_annotation=dict[str, Any])


def option_query() -> Any:
    """The FastAPI dependency ``Depends(option_query())``: the options given as query parameters
    (those present, as FastAPI typed them), for :func:`build_options`."""
    return _option_query


# ----------------------------------------------------------------------------------------------
# The multipart body
# ----------------------------------------------------------------------------------------------


def _form_property(schema: dict[str, Any]) -> dict[str, Any]:
    """A SegmentOptions property as a form field: a field is sent or not, never null."""
    schema = copy.deepcopy(schema)
    branches = schema.pop("anyOf", None)
    if branches is not None:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept
    if schema.get("default", 0) is None:
        del schema["default"]
    schema.pop("title", None)
    return schema


def upload_request_body(file_description: str) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of an upload: ``file`` parts and the SegmentOptions fields
    (from ``SegmentOptions.model_json_schema()``)."""
    options = SegmentOptions.model_json_schema()
    properties: dict[str, Any] = {
        FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                     "minItems": 1, "description": file_description}}
    properties.update({name: _form_property(schema)
                       for name, schema in options["properties"].items()})
    return {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [FILE_FIELD], "additionalProperties": False,
                   "properties": properties}}}}


async def read_multipart(request: Request, max_files: int) -> FormData:
    """The upload form, with bad bodies as 4xx ServiceErrors."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ServiceError(
            "send the image as multipart/form-data (curl -F file=@image.nii.gz), got "
            f"Content-Type {content_type.split(';')[0] or 'none'}", status=415,
            code="unsupported_media_type")
    try:
        return await request.form(max_files=max_files, max_fields=64, max_part_size=64 << 10)
    except StarletteHTTPException as exc:
        raise ServiceError(f"malformed multipart body: {exc.detail}", status=400,
                           code="malformed_multipart") from None


def check_fields(form: FormData) -> list[tuple[str, UploadFile]]:
    """The uploaded files; refuses text where a file belongs, unknown fields, and no file."""
    names = option_names()
    uploads: list[tuple[str, UploadFile]] = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            uploads.append((key, value))
        elif key == FILE_FIELD or key == "files":
            raise ServiceError(
                f"form field {key!r} holds text, not a file: send the file's content (curl: "
                f"-F {key}=@path/to/image.nii.gz)", status=400, code="missing_file")
        elif key not in names:
            raise OptionError(f"unknown form field {key!r}; the options are "
                              f"{', '.join(names)} and files go in {FILE_FIELD!r}",
                              code="unknown_field")
    if not uploads:
        raise ServiceError(f"no file was uploaded: send the image as multipart/form-data in a "
                           f"{FILE_FIELD!r} part (curl: -F {FILE_FIELD}=@image.nii.gz)",
                           status=400, code="missing_file")
    return uploads


def build_options(query: dict[str, Any], form: FormData) -> SegmentOptions:
    """SegmentOptions from query parameters and non-file form fields (a form field wins over
    the query parameter of the same name)."""
    raw: dict[str, Any] = dict(query)
    for name in option_names():
        values = [v for v in form.getlist(name) if isinstance(v, str)]
        if values:
            raw[name] = values
    return parse_options(raw)
