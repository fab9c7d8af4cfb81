"""Where text comes from: every input lmloop can read, as one stream of document strings.

`iter_documents(source)` yields raw document texts, one at a time (never the whole corpus), from
local or fsspec-URL files, folders and globs (txt/md, jsonl/json, csv/parquet, any gzipped),
WikiText raw files (split into articles as lm-eval's document-level WikiText does), Hugging Face
datasets, a prepared `lmloop data` folder, and feedback exports (docs/data.md lists the forms).
`iter_pairs(source, input_field, target_field)` yields (input, target) pairs for seq2seq data.

A `SourceSpec` names one input plus how to read it: `PATH[::key=value,...]`, e.g.
`data/*.jsonl::field=body,weight=2`. Invalid UTF-8 is replaced and counted, or fails with the
file and byte offset under `strict_utf8=True`. This module never imports torch and never runs a
model: a `synthetic:TEACHER` source is written by the caller's `teacher`
(`lmloop.data.synthetic.teacher_documents`, passed by the stages that may run one)."""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from lmloop.artifacts import peek_schema, read_meta, sha256_file, sha256_json, sha256_tree
from lmloop.config import build, param
from lmloop.data.shards import open_split
from lmloop.errors import UserError, did_you_mean
from lmloop.tokenizer import IM_END, IM_START, Tokenizer

log = logging.getLogger(__name__)

Kind = Literal[
    "auto",
    "text",
    "jsonl",
    "json",
    "csv",
    "parquet",
    "wikitext",
    "hf",
    "hf_disk",
    "feedback",
    "data",
    "synthetic",
]
TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".tsv")
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")  # level-1 heading; ` = = Sub = = ` is level 2


@dataclass(frozen=True)
class SourceSpec:
    """One input of the data stage: a path (or `hf:NAME`) and how to read it."""

    path: str = param("", "file, folder, glob, `hf:NAME[/CONFIG]`, or a save_to_disk folder")
    kind: Kind = param("auto", "how to read it; auto guesses from the suffix or folder")
    field: str = param("text", "JSON field / CSV or parquet column / dataset column to read")
    split: Literal["file", "blank", "line", "regex"] = param(
        "file",
        "text files: one document per file, per blank-line paragraph, per line, or per regex",
    )
    pattern: str = param("", "the separator regex when split=regex (e.g. '<\\|endoftext\\|>')")
    hf_config: str = param("", "Hugging Face dataset config (e.g. wikitext-103-raw-v1)")
    hf_split: str = param("train", "Hugging Face dataset split")
    weight: float = param(1.0, "times each training document of this source is used (mixing)")
    count: int = param(200, "synthetic: how many documents the teacher model writes")
    tokens: int = param(160, "synthetic: most tokens per document the teacher writes")

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("a source needs a path", hint="e.g. --source data/*.txt")
        # `hf:NAME/CONFIG` and `feedback:PATH` select their kind, from YAML as from the CLI
        if self.path.startswith("hf:") and self.kind == "auto":
            object.__setattr__(self, "kind", "hf")
            if not self.hf_config:
                object.__setattr__(self, "hf_config", self.path[3:].partition("/")[2])
        elif self.kind == "auto" and self.path.startswith(("synthetic:", "feedback:")):
            kind, _, path = self.path.partition(":")
            object.__setattr__(self, "path", path)
            object.__setattr__(self, "kind", kind)
        if not (self.weight >= 0):
            raise UserError(f"source weight must be >= 0, got {self.weight} for {self.path}")
        if self.split == "regex":
            if not self.pattern:
                raise UserError(f"source {self.path}: split=regex needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise UserError(f"source {self.path}: bad regex '{self.pattern}': {e}") from None

    @classmethod
    def from_string(cls, s: str) -> SourceSpec:
        """`PATH[::key=value,key=value]` -> SourceSpec (`hf:NAME/CONFIG` selects kind=hf)."""
        path, _, opts = str(s).partition("::")
        kw: dict[str, Any] = {}
        names = [f.name for f in fields(cls)]
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in names:
                raise UserError(
                    f"bad source option '{item}' in '{s}'{did_you_mean(key, names)}",
                    hint=f"use PATH::key=value,... with keys {', '.join(names[1:])}",
                )
            kw[key] = value.strip()
        return build(cls, {"path": path.strip(), **kw})

    @property
    def hf_name(self) -> str:
        return self.path[3:].partition("/")[0] if self.path.startswith("hf:") else self.path


def as_spec(source: str | SourceSpec) -> SourceSpec:
    return source if isinstance(source, SourceSpec) else SourceSpec.from_string(source)


# ---- resolving paths ------------------------------------------------------------------------
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemoteFile(str):
    """A file behind an fsspec URL, with the `name` readers ask a `Path` for."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rpartition("/")[2]

    def fs(self) -> tuple[Any, str]:
        """(fsspec filesystem, path inside it); a UserError when its package is missing."""
        import fsspec  # lazy: ~45 ms, only URL sources need it (and their filesystem package)

        try:
            return fsspec.core.url_to_fs(str(self))
        except (ImportError, ValueError) as e:
            raise UserError(
                f"cannot open {self}: {e}",
                hint="install the filesystem's package (s3fs, gcsfs, ...) or pass a local path",
            ) from None


def _resolve_url(spec: SourceSpec) -> list[Path]:
    fs, root = RemoteFile(spec.path).fs()
    if any(ch in root for ch in "*?["):
        found = sorted(f for f in fs.glob(root) if fs.isfile(f))
    elif not fs.exists(root):
        raise UserError(f"source not found: {spec.path}", hint="check the URL")
    elif fs.isfile(root):
        found = [root]
    else:
        wanted = TEXT_SUFFIXES + DATA_SUFFIXES
        found = sorted(f for f in fs.find(root) if _base_suffix(RemoteFile(f)) in wanted)
    if not found:
        raise UserError(f"source matched no readable files: {spec.path}")
    return [RemoteFile(fs.unstrip_protocol(f)) for f in found]  # type: ignore[misc]


def _base_suffix(p: Path) -> str:
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    return Path(name).suffix.lower()


def is_hf_disk(p: Path) -> bool:
    """A `datasets` `save_to_disk` folder (a Dataset or a DatasetDict)."""
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file()
        or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def resolve_files(spec: SourceSpec) -> list[Path]:
    """The files a local source covers, sorted (so every run reads them in the same order)."""
    raw = spec.path
    if _URL.match(raw):
        return _resolve_url(spec)
    p = Path(raw).expanduser()
    if any(ch in raw for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"source glob matched no files: {raw}", hint="check the pattern")
        return files
    if not p.exists():
        raise UserError(
            f"source not found: {raw}", hint="pass an existing file, folder or glob, or hf:NAME"
        )
    if p.is_file():
        return [p]
    wanted = TEXT_SUFFIXES + DATA_SUFFIXES
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
        and _base_suffix(f) in wanted
    )
    if not files:
        raise UserError(
            f"source folder {raw} holds no readable files",
            hint=f"expected files ending in {', '.join(wanted)} (optionally .gz)",
        )
    return files


def file_kind(spec: SourceSpec, f: Path) -> str:
    if spec.kind not in ("auto", "hf_disk", "hf"):
        return spec.kind
    suffix = _base_suffix(f)
    if suffix in (".jsonl", ".json", ".csv", ".parquet"):
        return suffix[1:]
    if suffix == ".tsv":
        return "csv"
    if suffix == ".raw" or f.name.startswith("wiki."):
        return "wikitext"
    return "text"


def source_kind(spec: SourceSpec) -> str:
    """`hf`, `hf_disk`, `data` or `files` (a local path whose files each get their own kind)."""
    if spec.kind in ("hf", "hf_disk", "data", "synthetic"):
        return spec.kind
    p = Path(spec.path).expanduser()
    if spec.kind == "auto" and is_hf_disk(p):
        return "hf_disk"
    if spec.kind == "auto" and p.is_dir() and peek_schema(p) == "lmloop.data":
        return "data"  # a folder `lmloop data` prepared: its train split read back as text
    return "files"


def fingerprint(spec: SourceSpec) -> str:
    """A content hash of what the source would yield (for reuse checks and lineage)."""
    kind = source_kind(spec)
    if kind == "hf":
        return sha256_json(["hf", spec.hf_name, spec.hf_config, spec.hf_split, spec.field])
    if kind == "synthetic":
        return sha256_json(["synthetic", spec.path, spec.count, spec.tokens])
    if kind in ("hf_disk", "data"):
        return sha256_json([sha256_tree(Path(spec.path).expanduser()), spec.hf_split, spec.field])
    files = resolve_files(spec)
    return sha256_json([[f.name, _file_hash(f)] for f in files])


def _file_hash(f: Path) -> str:
    """sha256 of a local file; for a URL, its filesystem's version tag (e.g. an S3 ETag), so
    the reuse check doesn't read a remote corpus twice."""
    if isinstance(f, RemoteFile):
        fs, path = f.fs()
        return str(fs.checksum(path))
    return sha256_file(f)


def source_files(spec: SourceSpec) -> list[Path] | None:
    """The files of a file source, in reading order (each can be read on its own with
    `iter_documents(spec, files=[f])`); None for sources read as a whole (hf, data, synthetic)."""
    return resolve_files(spec) if source_kind(spec) == "files" else None


# ---- decoding -------------------------------------------------------------------------------
def _open_binary(f: Path) -> BinaryIO:
    if isinstance(f, RemoteFile):
        import fsspec  # lazy: ~45 ms, only URL sources need it (and their filesystem package)

        gz = "gzip" if f.name.endswith(".gz") else None
        try:
            return fsspec.open(str(f), "rb", compression=gz).open()
        except (OSError, ImportError, ValueError) as e:
            raise UserError(f"cannot read source file {f}: {e}") from None
    try:
        if f.name.endswith(".gz"):
            fh: BinaryIO = gzip.open(f, "rb")  # type: ignore[assignment]
            fh.peek(1)  # type: ignore[attr-defined]  # fail now on a file that isn't gzip
            return fh
        return open(f, "rb")  # noqa: SIM115
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read source file {f}: {e.strerror or e}") from None


Counts = dict[str, int] | None  # replaced invalid-UTF-8 bytes, when the caller counts


def decode_bytes(data: bytes, *, where: str, offset: int = 0, strict: bool, stats: Counts) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD (counted) or, when strict, a UserError."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise UserError(
                f"invalid UTF-8 in {where} at byte offset {offset + e.start}",
                hint="fix the file, or drop strict_utf8 to replace bad bytes (counted)",
            ) from None
        text = data.decode("utf-8", errors="replace")
        if stats is not None:
            # replacements = U+FFFD in the output that weren't already valid U+FFFD in the input
            bad = text.count("\ufffd") - data.count("\ufffd".encode())
            stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + bad
        return text


BLOCK_BYTES = 1 << 20


def _iter_blocks(f: Path, *, strict: bool, stats: Counts) -> Iterator[str]:
    """The file decoded in ~1 MB blocks, each ending at a newline: streamed, flat memory."""
    offset, carry = 0, b""
    with _open_binary(f) as fh:
        try:
            while chunk := fh.read(BLOCK_BYTES):
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a line longer than a block: keep reading
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
                yield decode_bytes(block, where=str(f), offset=offset, strict=strict, stats=stats)
                offset += len(block)
        except (OSError, EOFError) as e:  # e.g. a truncated .gz
            raise UserError(f"cannot read source file {f}: {e}") from None
    if carry:
        yield decode_bytes(carry, where=str(f), offset=offset, strict=strict, stats=stats)


def _iter_lines(f: Path, *, strict: bool, stats: Counts) -> Iterator[str]:
    """Lines with their \\n (only \\n ends a line: JSON strings may hold U+2028), streamed."""
    for block in _iter_blocks(f, strict=strict, stats=stats):
        lines = block.split("\n")
        for line in lines[:-1]:
            yield line + "\n"
        if lines[-1]:
            yield lines[-1]


_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_LEADING_BLANK = re.compile(r"\A(?:[ \t]*\n)+")  # blank lines a block boundary cut off


def _read_all(f: Path, *, strict: bool, stats: Counts) -> str:
    with _open_binary(f) as fh:
        try:
            data = fh.read()
        except (OSError, EOFError) as e:
            raise UserError(f"cannot read source file {f}: {e}") from None
    return decode_bytes(data, where=str(f), strict=strict, stats=stats)


# ---- readers (one per kind) ------------------------------------------------------------------
def _text_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    if spec.split == "file":
        yield _read_all(f, strict=strict, stats=stats)
    elif spec.split == "regex":
        text = _read_all(f, strict=strict, stats=stats)
        yield from re.split(spec.pattern, text)
    elif spec.split == "line":
        yield from _iter_lines(f, strict=strict, stats=stats)
    else:  # blank: paragraphs separated by empty lines, streamed block by block
        carry = ""
        for block in _iter_blocks(f, strict=strict, stats=stats):
            parts = _BLANK_LINES.split(carry + block)
            carry = parts.pop()  # may continue in the next block
            yield from (_LEADING_BLANK.sub("", p, count=1) for p in parts if p.strip())
        if carry.strip():
            yield _LEADING_BLANK.sub("", carry, count=1).rstrip("\n")


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles: a new one starts at each ` = Title = ` heading."""
    buf: list[str] = []
    for line in lines:
        if _WIKI_TITLE.match(line.rstrip("\n")) and any(s.strip() for s in buf):
            yield "".join(buf)
            buf = []
        buf.append(line if line.endswith("\n") else line + "\n")
    if any(s.strip() for s in buf):
        yield "".join(buf)


def _missing_field(where: str, field: str, record: Any) -> UserError:
    if isinstance(record, dict):
        have = ", ".join(map(str, record)) or "none"
        return UserError(
            f"{where}: field '{field}' not found{did_you_mean(field, list(map(str, record)))}; "
            f"fields present: {have}",
            hint=f"pass the right field, e.g. --source '{where.split(':')[0]}::field=NAME'",
        )
    return UserError(
        f"{where}: expected a JSON object with field '{field}', got {type(record).__name__}"
    )


def _field_text(record: Any, field: str, where: str) -> str | None:
    if isinstance(record, str) and field == "text":
        return record
    if not isinstance(record, dict) or field not in record:
        raise _missing_field(where, field, record)
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field '{field}' holds a {type(value).__name__}, expected a string"
        )
    return value


def _jsonl_records(
    f: Path, strict: bool, stats: Counts, lines: Iterable[str] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line of a JSONL file (or of its `lines`,
    when the caller has read it already)."""
    lines = _iter_lines(f, strict=strict, stats=stats) if lines is None else lines
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{f}:{lineno}: not valid JSON ({e.msg})", hint="one JSON object per line"
            ) from None


def _jsonl_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    for lineno, record in _jsonl_records(f, strict, stats):
        if (
            spec.kind == "auto"
            and spec.field == "text"
            and isinstance(record, dict)
            and "text" not in record
            and ("messages" in record or "prompt" in record)
        ):  # a feedback export passed without the feedback: prefix
            text = feedback_text(record, f"{f}:{lineno}")
        else:
            text = _field_text(record, spec.field, f"{f}:{lineno}")
        if text:
            yield text


def _json_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    text = _read_all(f, strict=strict, stats=stats)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # a .json file that is really JSON Lines
        if text.lstrip().startswith("{") and "\n" in text.strip():
            yield from _jsonl_docs(f, spec, strict, None)
            return
        raise UserError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if spec.field in data and not isinstance(data[spec.field], list):
            data = [data]
        elif len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise UserError(f"{f}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        value = _field_text(record, spec.field, f"{f}[{i}]")
        if value is not None:
            yield value


def _require_columns(where: Any, names: list[str], columns: list[str]) -> None:
    for name in names:
        if name not in columns:
            raise UserError(
                f"{where}: column '{name}' not found{did_you_mean(name, columns)}; "
                f"columns present: {', '.join(columns) or 'none'}",
                hint=f"pass the right column, e.g. --source '{where}::field=NAME'"
                if len(names) == 1
                else "pass the right --input-field/--target-field",
            )


def _csv_reader(f: Path, strict: bool, stats: Counts) -> csv.DictReader:
    csv.field_size_limit(1 << 30)  # documents are long; the default 128 KB limit is for tables
    text = _read_all(f, strict=strict, stats=stats)
    delimiter = "\t" if _base_suffix(f) == ".tsv" else ","
    return csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)


def _parquet_file(f: Path) -> Any:
    import pyarrow.parquet as pq  # lazy: ~40 ms, only parquet files need it

    try:
        return pq.ParquetFile(_open_binary(f) if isinstance(f, RemoteFile) else f)
    except Exception as e:  # noqa: BLE001 - any arrow failure means an unreadable file
        raise UserError(f"cannot read parquet file {f}: {e}") from None


def _csv_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    reader = _csv_reader(f, strict, stats)
    _require_columns(f, [spec.field], reader.fieldnames or [])
    yield from filter(None, (row.get(spec.field) for row in reader))


def _parquet_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    pf = _parquet_file(f)
    _require_columns(f, [spec.field], pf.schema_arrow.names)
    for batch in pf.iter_batches(batch_size=1024, columns=[spec.field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value:
                yield value


def _render_messages(messages: Any, where: str) -> str:
    """Chat turns joined as ChatML text: the markup lmloop's chat template and SmolLM2 speak."""
    if not isinstance(messages, list):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: each message needs 'role' and 'content', got {m!r:.80}")
        content = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
        parts.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
    return "".join(parts)


def feedback_text(record: Any, where: str) -> str | None:
    """One feedback-export record as training text (None when it should not be trained on)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _render_messages(record["messages"], where)
    if "text" in record:
        return record["text"] if isinstance(record["text"], str) else None
    if "prompt" in record and ("completion" in record or "chosen" in record):
        if record.get("label") is False:  # KTO: a disliked answer is not training text
            return None
        answer = record["completion"] if "completion" in record else record["chosen"]
        prompt = record["prompt"]
        if isinstance(prompt, list):  # conversational TRL records
            answer_msgs = (
                answer
                if isinstance(answer, list)
                else [{"role": "assistant", "content": str(answer)}]
            )
            return _render_messages(prompt + answer_msgs, where)
        return f"{prompt}{answer}"
    raise UserError(
        f"{where}: not a feedback export record; keys present: {', '.join(map(str, record))}",
        hint="expected {messages}, {text}, {prompt, completion} or {prompt, chosen} records "
        "from `lmloop feedback export`",
    )


def _feedback_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    records = _jsonl_records(f, strict, stats)
    yield from filter(None, (feedback_text(r, f"{f}:{n}") for n, r in records))


def _wikitext_docs(f: Path, spec: SourceSpec, strict: bool, stats: Counts) -> Iterator[str]:
    yield from wikitext_articles(_iter_lines(f, strict=strict, stats=stats))


_READERS = {
    "text": _text_docs,
    "jsonl": _jsonl_docs,
    "json": _json_docs,
    "csv": _csv_docs,
    "parquet": _parquet_docs,
    "feedback": _feedback_docs,
    "wikitext": _wikitext_docs,
}


def _hf_docs(spec: SourceSpec) -> Iterator[str]:
    ds = _hf_dataset(spec)
    columns = list(ds.column_names or [])  # a streamed hub dataset may not know them yet
    if columns:
        _require_columns(spec.path, [spec.field], columns)
        ds = ds.select_columns([spec.field])
    texts = (
        value
        for batch in ds.iter(batch_size=1024)
        for value in batch.get(spec.field, [])
        if isinstance(value, str)
    )
    if "wikitext" in spec.path.lower():
        # WikiText on the hub is one record per line: regroup the lines into articles
        yield from wikitext_articles(texts)
    else:
        yield from (t for t in texts if t)


def _hf_dataset(spec: SourceSpec) -> Any:
    """The dataset split a hub or save_to_disk source names (hub ones streamed)."""
    import datasets  # lazy: ~0.95 s, only hub and save_to_disk sources need it

    if source_kind(spec) == "hf_disk":
        try:
            ds = datasets.load_from_disk(str(Path(spec.path).expanduser()))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot load the saved dataset at {spec.path}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.hf_split not in ds:
                raise UserError(
                    f"{spec.path}: split '{spec.hf_split}' not found; splits: {', '.join(ds)}",
                    hint=f"pass --source '{spec.path}::hf_split=NAME'",
                )
            ds = ds[spec.hf_split]
    else:
        try:
            ds = datasets.load_dataset(
                spec.hf_name, spec.hf_config or None, split=spec.hf_split, streaming=True
            )
        except Exception as e:  # noqa: BLE001 - no network, unknown name, bad config ...
            raise UserError(
                f"cannot load Hugging Face dataset {spec.hf_name} "
                f"(config {spec.hf_config or 'default'}, split {spec.hf_split}): "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                hint="check the name, or save it with datasets' save_to_disk and pass that folder",
            ) from None
        ds = ds if hasattr(ds, "column_names") and ds.column_names else ds._resolve_features()
    return ds


def _data_dir_docs(spec: SourceSpec) -> Iterator[str]:
    """Documents of a prepared data folder's split, decoded from its token shards.

    `hf_split` names the split (train when it isn't val or test).
    """
    d = Path(spec.path).expanduser()
    meta = read_meta(d, "lmloop.data", rebuild="lmloop data ...")
    split = spec.hf_split if spec.hf_split in ("val", "test") else "train"
    arr = open_split(d, split)
    tok = Tokenizer.load(d)
    eos = int(meta["tokenizer"]["eos_id"])
    start, step = 0, 1 << 20
    while start < len(arr):
        block = np.asarray(arr[start : start + step])
        ends = np.nonzero(block == eos)[0]
        if not len(ends):  # one document longer than the block: read on
            step *= 2
            continue
        prev = 0
        for e in ends:
            yield tok.decode(block[prev:e].tolist())
            prev = int(e) + 1
        start += prev


def iter_documents(
    source: str | SourceSpec,
    *,
    strict_utf8: bool = False,
    stats: Counts = None,
    files: list[Path] | None = None,
    teacher: Callable[[SourceSpec], Iterable[str]] | None = None,
) -> Iterator[str]:
    """Raw document texts from one source, streamed in a fixed order (see the module doc).

    `files`: read only these of a file source's files (a slice of `source_files(spec)`).
    `teacher`: writes a `synthetic:` source's documents (a model runs there, not here).
    """
    spec = as_spec(source)
    kind = source_kind(spec)
    if kind in ("hf", "hf_disk"):
        yield from _hf_docs(spec)
        return
    if kind == "data":
        yield from _data_dir_docs(spec)
        return
    if kind == "synthetic":
        if teacher is None:
            raise UserError(
                f"synthetic:{spec.path} is written by a teacher model, which this command does "
                "not run", hint="write it with `lmloop data --source synthetic:...` first",
            )  # fmt: skip
        yield from teacher(spec)
        return
    for f in resolve_files(spec) if files is None else files:
        yield from _READERS[file_kind(spec, f)](f, spec, strict_utf8, stats)


# ---- input/target pairs (sequence-to-sequence data) ------------------------------------------
def _pair_records(spec: SourceSpec, f: Path, strict: bool, stats: Counts):
    """(where, record as a dict) from one JSONL/JSON/CSV/TSV/parquet file."""
    kind = file_kind(spec, f)
    if kind in ("jsonl", "json"):
        text = _read_all(f, strict=strict, stats=stats)
        stripped = text.lstrip()
        if kind == "json" and stripped.startswith("["):
            for i, record in enumerate(json.loads(text)):
                yield f"{f}[{i}]", record
            return
        for lineno, record in _jsonl_records(f, strict, stats, text.split("\n")):
            yield f"{f}:{lineno}", record
    elif kind == "csv":
        for i, row in enumerate(_csv_reader(f, strict, stats)):
            yield f"{f}:{i + 2}", row
    elif kind == "parquet":
        i = 0
        for batch in _parquet_file(f).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                i += 1
                yield f"{f}[row {i}]", record
    else:
        raise UserError(
            f"{f}: input/target pairs are read from .jsonl, .json, .csv, .tsv or .parquet files "
            f"(or a Hugging Face dataset), not '{kind}'"
        )


def iter_pairs(
    source: str | SourceSpec,
    input_field: str,
    target_field: str,
    *,
    strict_utf8: bool = False,
    stats: Counts = None,
) -> Iterator[tuple[str, str] | None]:
    """(input, target) per record of a source, in a fixed order; None for a record with a side
    missing (null or empty), so the caller counts it. A field absent from a record is an error
    naming the fields present."""
    spec = as_spec(source)
    kind = source_kind(spec)
    if kind in ("hf", "hf_disk"):
        ds = _hf_dataset(spec)
        if ds.column_names:
            _require_columns(spec.path, [input_field, target_field], list(ds.column_names))
        for batch in ds.select_columns([input_field, target_field]).iter(batch_size=1024):
            for a, b in zip(batch[input_field], batch[target_field]):
                ok = isinstance(a, str) and isinstance(b, str) and a and b
                yield (a, b) if ok else None
        return
    if kind != "files":
        raise UserError(f"source {spec.path}: pairs come from files or Hugging Face datasets")
    for f in resolve_files(spec):
        for where, record in _pair_records(spec, f, strict_utf8, stats):
            if not isinstance(record, dict):
                raise _missing_field(where, input_field, record)
            a = _field_text(record, input_field, where)
            b = _field_text(record, target_field, where)
            yield (a, b) if a and b else None
