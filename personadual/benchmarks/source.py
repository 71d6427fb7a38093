"""Reading a dataset's rows by HF hub id or local path, with one-line errors for bad layouts.

Everything goes through ``datasets.load_dataset``: hub ids as published, local files by
their suffix (json/jsonl, parquet, csv), local folders by ``datasets``' own inference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field as dataclass_field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import datasets

from personadual.data import DataError

_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
T = TypeVar("T")


class RowError(DataError):
    """One row that cannot become a record: the field and why. The loop over a file's rows
    adds where the row is (``Rows.where``), or skips and counts it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Rows:
    """A dataset's rows and where they came from (for error messages)."""

    data: datasets.Dataset
    origin: str
    # Where the rows were read from, in load order: a local file's path, or a hub id's
    # "HUB_ID (subset, split)"; resolved on the first error only.
    files: Callable[[], list[str]] = dataclass_field(default=lambda: [], compare=False)

    def __len__(self) -> int:
        return len(self.data)

    def where(self, index: int) -> str:
        """The row at ``index`` as a person finds it: ``FILE:LINE`` (1-based) in a JSONL file;
        in a parquet (or CSV, or JSON array) file, which has no lines for rows, the file and the
        row's 0-based index in it, saying so; for a hub id, the split's 0-based row index."""
        files = self.files()
        if not files:
            return f"{self.origin}: row {index} (0-based, as load_dataset(...)[split][{index}])"
        offset = 0
        for path in files:
            count = _row_count(path)
            if count is None:
                break  # a file read differently than counted: name the row by the whole source
            if index < offset + count:
                local = index - offset
                lines = _jsonl_lines(path)
                if lines is not None:
                    return f"{path}:{lines[local]}"
                kind = Path(path).suffix.lstrip(".") or "this"
                return f"{path}: row {local} (0-based; a {kind} file has no line numbers)"
            offset += count
        return f"{self.origin}: row {index} (0-based, over its files in load order)"


@lru_cache(maxsize=64)
def _jsonl_lines(path: str) -> tuple[int, ...] | None:
    """1-based numbers of a JSON-lines file's non-blank lines (the rows ``datasets`` reads);
    None for a file that is not one object per line (a JSON array, parquet, CSV)."""
    if Path(path).suffix.lower() not in (".jsonl", ".json"):
        return None
    numbers = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            if not stripped.startswith("{"):
                return None
            numbers.append(number)
    return tuple(numbers)


@lru_cache(maxsize=64)
def _row_count(path: str) -> int | None:
    lines = _jsonl_lines(path)
    if lines is not None:
        return len(lines)
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def map_rows(rows: Rows, make: Callable[[dict[str, Any], int], T], skipped: Counter[str] | None,
             *, label: str = "") -> list[T]:
    """``make(row, index)`` for every row. A ``RowError`` ends the load naming the row's file,
    line (or row) and field; with ``skipped``, the row is left out and counted by reason."""
    made: list[T] = []
    for index, row in enumerate(rows.data):
        try:
            made.append(make(row, index))
        except RowError as error:
            if skipped is None:
                raise DataError(f"{rows.where(index)}: {error}") from None
            skipped[f"{label}invalid row: {error}"] += 1
    return made


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~"))


def load_rows(source: str, *, split: str, subset: str | None = None,
              data_files: str | Sequence[str] | None = None, limit: int | None = None,
              required: Sequence[str] = (), cache_dir: str | None = None,
              benchmark: str = "dataset") -> Rows:
    """Rows of ``source`` (a hub id, a local file or a local folder).

    ``subset`` names the hub config; a local snapshot folder is read by the same name (its
    dataset card's ``configs:``), a single local file is that one config whatever the name.
    ``data_files`` selects files inside a hub repo or a local folder (e.g. one FLAN task).
    A file that lacks one of ``required`` columns fails with a one-line ``DataError``.
    """
    try:
        data = _load(source, split=split, subset=subset, data_files=data_files, cache_dir=cache_dir)
    except DataError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        # Missing files, no network for a hub id, malformed JSON/parquet: one line, not a trace.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{source}: cannot load {benchmark} ({first_line})") from None
    origin = str(Path(source).expanduser()) if is_local(source) else source
    files = (lambda: _local_files(source, split=split, subset=subset, data_files=data_files)) if is_local(source) \
        else (lambda: [])
    missing = [name for name in required if name not in data.column_names]
    if missing:
        raise DataError(f"{origin}: missing column {missing[0]!r} for {benchmark} "
                        f"(columns: {', '.join(data.column_names)})")
    if limit is not None:
        if limit < 1:
            raise DataError(f"{benchmark}.limit: expected a positive count, got {limit}")
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise DataError(f"{origin}: no rows for {benchmark} (split {split!r})")
    return Rows(data, origin, files)


def _load(source: str, *, split: str, subset: str | None, data_files: str | Sequence[str] | None,
          cache_dir: str | None) -> datasets.Dataset:
    if not is_local(source):
        return _single(datasets.load_dataset(source, subset, split=split, data_files=data_files,
                                             cache_dir=cache_dir))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_file():
        builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r} "
                            f"(expected one of {sorted(_BUILDER_BY_SUFFIX)})")
        # A single local file is one split whatever its name; ``split`` names the hub's split.
        return _single(datasets.load_dataset(builder, data_files=str(path), split="train",
                                             cache_dir=cache_dir))
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        resolved = [str(path / name) for name in files]
        for name in resolved:
            if not Path(name).is_file():
                raise DataError(f"{name}: data file not found")
        builder = _BUILDER_BY_SUFFIX.get(Path(resolved[0]).suffix.lower())
        if builder is None:
            raise DataError(f"{resolved[0]}: unknown data format")
        return _single(datasets.load_dataset(builder, data_files=resolved, split="train",
                                             cache_dir=cache_dir))
    return _single(datasets.load_dataset(str(path), _local_config(path, subset), split=split,
                                         cache_dir=cache_dir))


def _local_files(source: str, *, split: str, subset: str | None,
                 data_files: str | Sequence[str] | None) -> list[str]:
    """The local files behind a load, in the order ``datasets`` read them."""
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if data_files is not None:
        return [str(path / name) for name in ([data_files] if isinstance(data_files, str) else data_files)]
    builder = datasets.load_dataset_builder(str(path), _local_config(path, subset))
    return [str(f) for f in (builder.config.data_files or {}).get(split, [])]


def _local_config(folder: Path, subset: str | None) -> str | None:
    """The config to read from a local snapshot folder, as ``datasets`` would from the hub.

    A folder whose dataset card lists several configs (PubMedQA, TriviaQA, PersonaHub) needs
    one named; a folder without a card, or with one config, is read whole. A subset the folder
    does not have fails naming the ones it has, unless the folder has only its default config
    (then the subset is a hub config name that a plain copy of the files need not carry).
    """
    names = datasets.get_dataset_config_names(str(folder))
    if subset is None or subset in names:
        return subset
    if names == ["default"]:
        return None
    raise DataError(f"{folder}: no subset {subset!r} (its dataset card lists: {', '.join(names)})")


def _single(loaded: Any) -> datasets.Dataset:
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"expected one split, got {type(loaded).__name__}")
    return loaded


def field(row: dict[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; a missing or null part is a ``RowError`` naming the field."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise RowError(dotted, "missing")
        value = value[part]
    return value


def text(row: dict[str, Any], dotted: str) -> str:
    value = field(row, dotted)
    if not isinstance(value, str) or not value.strip():
        raise RowError(dotted, "must be a non-empty string")
    return value.strip()
