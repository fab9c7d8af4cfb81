"""Sources: every input kind read offline from tiny files built here."""

from __future__ import annotations

import gzip
import json

import pytest

from lmloop.data.sources import SourceSpec, iter_documents, wikitext_articles
from lmloop.errors import UserError


def test_text_file_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\nthree\n<SEP>four\n")
    assert list(iter_documents(str(f))) == ["one\ntwo\n\nthree\n<SEP>four\n"]
    assert list(iter_documents(f"{f}::split=blank")) == ["one\ntwo", "three\n<SEP>four"]
    assert list(iter_documents(f"{f}::split=line"))[:2] == ["one\n", "two\n"]
    assert list(iter_documents(f"{f}::split=regex,pattern=<SEP>")) == [
        "one\ntwo\n\nthree\n",
        "four\n",
    ]


def test_folder_glob_and_gzip_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("ay")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as fh:
        fh.write("sea")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert list(iter_documents(str(tmp_path))) == ["ay", "bee", "sea"]
    assert list(iter_documents(str(tmp_path / "*.txt*"))) == ["bee", "sea"]


def test_jsonl_json_csv_parquet(tmp_path):
    rows = [{"body": "first doc", "id": 1}, {"body": "second doc", "id": 2}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "r.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "r.csv").write_text('body,id\n"first doc",1\n"second, doc",2\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1", "p2"]}), tmp_path / "r.parquet")
    want = ["first doc", "second doc"]
    assert list(iter_documents(f"{tmp_path / 'r.jsonl'}::field=body")) == want
    assert list(iter_documents(f"{tmp_path / 'r.json'}::field=body")) == want
    assert list(iter_documents(f"{tmp_path / 'r.csv'}::field=body")) == ["first doc", "second, doc"]
    assert list(iter_documents(f"{tmp_path / 'r.parquet'}::field=body")) == ["p1", "p2"]


def test_missing_field_lists_fields_present(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"body": "x", "title": "t"}\n')
    with pytest.raises(UserError, match=r"field 'text' not found.*body, title"):
        list(iter_documents(str(f)))
    c = tmp_path / "r.csv"
    c.write_text("body\nx\n")
    with pytest.raises(
        UserError, match="column 'bdy' not found.*did you mean 'body'.*columns present: body"
    ):
        list(iter_documents(f"{c}::field=bdy"))


def test_wikitext_articles_split_at_level_one_headings():
    lines = [
        " \n",
        " = Alpha = \n",
        " \n",
        " = = Sub = = \n",
        " a text \n",
        " = Beta = \n",
        " b \n",
    ]
    arts = list(wikitext_articles(lines))
    assert len(arts) == 2
    assert arts[0].startswith(" \n = Alpha = ") and " = = Sub = = " in arts[0]
    assert arts[1] == " = Beta = \n b \n"


def test_invalid_utf8_replaced_and_counted_or_strict(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good \xef\xbf\xbd kept\nbad \xff\xfe here\n")
    stats: dict[str, int] = {}
    (doc,) = iter_documents(str(f), stats=stats)
    assert stats["invalid_utf8"] == 2 and doc.count("\ufffd") == 3
    with pytest.raises(UserError, match=r"bad\.txt at byte offset 18"):
        list(iter_documents(str(f), strict_utf8=True))
    # line-streamed readers report the offset in the file, not in the line
    with pytest.raises(UserError, match="byte offset 18"):
        list(iter_documents(f"{f}::split=line", strict_utf8=True))


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["alpha doc", "", "beta doc"]}),
            "test": datasets.Dataset.from_dict({"text": ["gamma"]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"))) == ["alpha doc", "beta doc"]
    assert list(iter_documents(f"{tmp_path / 'ds'}::hf_split=test")) == ["gamma"]
    with pytest.raises(UserError, match="split 'valid' not found"):
        list(iter_documents(f"{tmp_path / 'ds'}::hf_split=valid"))


def test_feedback_export_records(tmp_path):
    f = tmp_path / "fb.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
        {"text": "plain text"},
        {"prompt": "Q: 2+2?", "completion": " 4", "label": True},
        {"prompt": "Q: bad", "completion": " no", "label": False},
        {"prompt": "P", "chosen": " good", "rejected": " bad"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in records))
    docs = list(iter_documents(f"feedback:{f}"))
    assert docs == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
        "plain text",
        "Q: 2+2? 4",
        "P good",
    ]
    assert list(iter_documents(str(f))) == docs  # auto-detected without the prefix


def test_spec_parsing_and_bad_inputs(tmp_path):
    s = SourceSpec.from_string("data/*.jsonl::field=body,weight=2.5")
    assert (s.path, s.field, s.weight) == ("data/*.jsonl", "body", 2.5)
    h = SourceSpec.from_string("hf:wikitext/wikitext-103-raw-v1")
    assert (h.kind, h.hf_name, h.hf_config) == ("hf", "wikitext", "wikitext-103-raw-v1")
    with pytest.raises(UserError, match="did you mean 'field'"):
        SourceSpec.from_string("x.txt::feild=a")
    with pytest.raises(UserError, match="source not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(UserError, match="matched no files"):
        list(iter_documents(str(tmp_path / "*.txt")))
    (tmp_path / "x.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read source file"):
        list(iter_documents(str(tmp_path / "x.txt.gz")))


def test_streaming_blocks_give_the_same_documents(tmp_path, monkeypatch):
    import lmloop.data.sources as sources

    f = tmp_path / "p.txt"
    paras = [f"para {i} line one\nline two of {i}" for i in range(30)]
    f.write_bytes(("\n\n  \n".join(paras) + "\n").encode() + b"tail \xff end\n")
    want_blank = list(iter_documents(f"{f}::split=blank"))
    want_lines = list(iter_documents(f"{f}::split=line"))
    monkeypatch.setattr(sources, "BLOCK_BYTES", 7)  # blocks end mid-paragraph and mid-line
    assert list(iter_documents(f"{f}::split=blank")) == want_blank
    assert list(iter_documents(f"{f}::split=line")) == want_lines
    assert want_blank[:2] == ["para 0 line one\nline two of 0", "para 1 line one\nline two of 1"]
    offset = f.read_bytes().index(b"\xff")
    with pytest.raises(UserError, match=f"byte offset {offset}"):
        list(iter_documents(f"{f}::split=blank", strict_utf8=True))
