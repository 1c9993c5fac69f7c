"""The input file (CSV or JSONL) read into rows, each checked before anything is spent."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicate_generation.cli.batch.errors import UsageError
from replicate_generation.errors import (
    InvalidName,
    InvalidRequest,
    SchemaUnavailable,
    TokenRejected,
)
from replicate_generation.models.catalogue import MODELS, ModelSpec
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.schemas import parameter_types
from replicate_generation.outputs import default_stem, safe_filename
from replicate_generation.request_parsing import parse_batch

# A model's parameter types by name (None: not known here), for a CSV's text cells.
Types = Callable[[str], Mapping[str, str] | None]
# Checks one chunk as the job would be parsed: InvalidRequest, InvalidName, SchemaUnavailable...
Check = Callable[[dict[str, Any], int], None]

RESERVED_COLUMNS = frozenset({"prompt", "model_name", "model", "custom_filename", "output",
                              "output_filepath", "params"})


@dataclass(frozen=True)
class Row:
    """One request of the input file."""

    index: int
    where: str  # "line 3" / "row 3", for messages
    task: dict[str, Any]  # as sent: model_name, prompt, custom_filename and the parameters
    output: Path | None

    @property
    def model(self) -> str:
        return str(self.task.get("model_name"))

    @property
    def prompt(self) -> str | None:
        prompt = self.task.get("prompt")
        return None if prompt is None else str(prompt)


def curated(model: str) -> ModelSpec | None:
    """The curated model a name means (its id or `owner/name`), else None."""
    return next((s for s in MODELS.values() if model in (s.id, s.ref)), None)


def curated_types(model: str) -> Mapping[str, str] | None:
    spec = curated(model)
    return None if spec is None else parameter_types(spec)


def read_rows(path: Path, data: bytes, default_model: str | None, fmt: str | None,
              types: Types = curated_types) -> list[Row]:
    """Parse the input into rows; every problem is a UsageError naming its line. `types` says
    a model's parameter types, so CSV cells become numbers, booleans and lists."""
    kind = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{path}: cannot tell the format from the extension; use --format")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    records = _jsonl_records(text) if kind == "jsonl" else _csv_records(text)
    known: dict[str, Mapping[str, str] | None] = {}

    def types_of(model: str) -> Mapping[str, str] | None:
        if model not in known:
            known[model] = types(model)
        return known[model]

    rows = [_row(i, where, record, default_model, types_of if kind == "csv" else None)
            for i, (where, record) in enumerate(records)]
    if not rows:
        raise UsageError(f"{path}: no requests in the file")
    return rows


def _jsonl_records(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"line {number}: each line must be a JSON object")
        params = record.pop("params", None)
        if params is not None:
            if not isinstance(params, dict):
                raise UsageError(f"line {number}: params must be a JSON object")
            record = {**params, **record}
        yield f"line {number}", record


def _csv_records(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise UsageError("the CSV needs a header row (prompt, model_name, parameters...)")
    for raw in reader:
        where = f"line {reader.line_num}"
        if None in raw:
            raise UsageError(f"{where}: more cells than header columns")
        cells = {k: v for k, v in raw.items() if k is not None and v not in (None, "")}
        if not cells:
            continue
        params_cell = cells.pop("params", None)
        record: dict[str, Any] = {}
        if params_cell is not None:
            record.update(_params_cell(where, params_cell))
        record.update(cells)
        yield where, record


def _params_cell(where: str, cell: str) -> dict[str, Any]:
    try:
        params = json.loads(cell)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: the params cell is not valid JSON ({exc.msg})") from None
    if not isinstance(params, dict):
        raise UsageError(f"{where}: the params cell must hold a JSON object")
    return params


def _row(index: int, where: str, record: dict[str, Any], default_model: str | None,
         types: Types | None) -> Row:
    """One request; `types` (CSV only) turns text cells into the parameters' types."""
    model = record.get("model_name", record.get("model", default_model))
    if not isinstance(model, str) or not model:
        raise UsageError(f"{where}: model_name is missing (give the column or --model)")
    spec = curated(model)
    prompt = record.get("prompt")
    # A curated model needs a prompt; another model's own schema says whether it takes one.
    if (prompt is None and spec is not None) or (
            prompt is not None and (not isinstance(prompt, str) or not prompt.strip())):
        raise UsageError(f"{where}: prompt is required")
    params = {k: v for k, v in record.items() if k not in RESERVED_COLUMNS}
    kinds = types(model) if types is not None else None
    if kinds is not None:
        params = {k: _cell(kinds.get(k, "string"), v) if isinstance(v, str) else v
                  for k, v in params.items()}
    output_value = record.get("output", record.get("output_filepath"))
    if output_value is not None and not isinstance(output_value, str):
        raise UsageError(f"{where}: output must be a path")
    name = record.get("custom_filename")
    if name is None:
        name = default_stem(spec.id if spec else model, index)
    task = {"model_name": model, **({} if prompt is None else {"prompt": prompt}),
            "custom_filename": name, **params}
    return Row(index=index, where=where, task=task,
               output=Path(output_value) if output_value else None)


def _cell(kind: str, raw: str) -> object:
    """A CSV cell as the parameter's type; text that does not convert is left for the validator."""
    text = raw.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return raw
    if kind == "boolean":
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return raw
    if kind in ("uri_list", "array", "object"):
        if text.startswith(("[", "{")):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return raw
        return text.split() if kind != "object" else raw
    return raw


def local_check(chains: FallbackChains) -> Check:
    """The service's own parser, here (curated models; others where a resolver is set)."""
    def check(body: dict[str, Any], max_items: int) -> None:
        parse_batch(body, max_items, chains)
    return check


def validate(rows: list[Row], chunk_size: int, options: dict[str, bool], check: Check) -> None:
    """Check every request with the service's own parser before anything is spent."""
    _check_unique_names(rows)
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        body = {"tasks": [r.task for r in chunk], **options}
        try:
            check(body, chunk_size)
        except (InvalidRequest, InvalidName) as exc:
            raise UsageError(_where(exc, chunk)) from None
        except (SchemaUnavailable, TokenRejected) as exc:
            raise UsageError(f"a model's schema could not be checked: {exc}") from None


def _check_unique_names(rows: list[Row]) -> None:
    """No two rows may share a custom_filename or an output path (case-insensitively)."""
    names: dict[str, Row] = {}
    outputs: dict[Path, Row] = {}
    for row in rows:
        name = row.task.get("custom_filename")
        if isinstance(name, str):
            stem = _safe(row, name, "custom_filename")  # as the job names the file
            other = names.setdefault(stem.casefold(), row)
            if other is not row:
                raise UsageError(f"{row.where}: custom_filename {name!r} is also used on "
                                 f"{other.where}; every item needs its own name")
        if row.output is not None:
            stem = _safe(row, row.output.name, "output")
            key = (row.output.parent.absolute() / stem.casefold())
            taken = outputs.setdefault(key, row)
            if taken is not row:
                raise UsageError(f"{row.where}: output {row.output} is also used on "
                                 f"{taken.where}")


def _safe(row: Row, name: str, field_name: str) -> str:
    try:
        return safe_filename(name, field_name)
    except InvalidName as exc:
        raise UsageError(f"{row.where}: {exc}") from None


def _where(exc: InvalidRequest | InvalidName, chunk: list[Row]) -> str:
    """Name the input line of a validation error instead of the job's tasks[i]."""
    message = str(exc)
    field_name = exc.field
    if field_name.startswith("tasks["):
        position = int(field_name[6:field_name.index("]")])
        row = chunk[position]
        return f"{row.where}: {message.replace(f'tasks[{position}].', '')}"
    return message
