"""``alum-prep --format hf-dataset``: datasets ``save_to_disk`` folders (Dataset, DatasetDict) and ``.arrow``
files give the same data-bin bytes as the same text as jsonl; errors name the file (and the row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_prep_formats import databin_bytes, make_docs, run
from test_prep_formats import reference, vocab  # noqa: F401  (pytest fixtures, used by name)

pa = pytest.importorskip("pyarrow")


def write_arrow_stream(path: Path, docs, batch_rows=7, column="text"):
    """An Arrow IPC stream of several record batches, as datasets writes its data-*.arrow files."""
    table = pa.table({"id": list(range(len(docs))), column: docs})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for b in table.to_batches(max_chunksize=batch_rows):
            w.write_batch(b)


def test_save_to_disk_folder_equals_jsonl(tmp_path, vocab, reference):  # noqa: F811
    datasets = pytest.importorskip("datasets", reason="the datasets package (the [hf] extra) is not installed")
    docs, ref = reference
    ds = datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs})
    ds.save_to_disk(str(tmp_path / "ds"), max_shard_size=2000)  # several data-*.arrow shards
    assert len(list((tmp_path / "ds").glob("data-*.arrow"))) > 1
    m = run([tmp_path / "ds"], "hf-dataset", tmp_path / "out", vocab)
    assert databin_bytes(tmp_path / "out") == ref
    assert m["format"] == "hf-dataset" and m["counts"]["documents"] == len(docs)
    # a DatasetDict: every split, in dataset_dict.json's order
    half = len(docs) // 2
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:half]}),
                               "validation": datasets.Dataset.from_dict({"text": docs[half:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    run([tmp_path / "dd"], "hf-dataset", tmp_path / "out-dd", vocab)
    assert databin_bytes(tmp_path / "out-dd") == ref


def test_arrow_files_and_text_column(tmp_path, vocab, reference):  # noqa: F811
    docs, ref = reference
    write_arrow_stream(tmp_path / "a.arrow", docs)
    run([tmp_path / "a.arrow"], "hf-dataset", tmp_path / "out", vocab)
    assert databin_bytes(tmp_path / "out") == ref
    # another column name, and the IPC file format
    table = pa.table({"content": docs})
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=5)
    run([tmp_path / "b.arrow"], "hf-dataset", tmp_path / "out-b", vocab, text_column="content")
    assert databin_bytes(tmp_path / "out-b") == ref


def test_hf_dataset_errors_name_the_file(tmp_path, vocab):  # noqa: F811
    docs = make_docs(5)
    write_arrow_stream(tmp_path / "a.arrow", docs)
    with pytest.raises(ValueError, match=r"a\.arrow.*no column 'body'.*--text-column"):
        run([tmp_path / "a.arrow"], "hf-dataset", tmp_path / "o1", vocab, text_column="body")
    data = (tmp_path / "a.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\.arrow.*(row|truncated|Arrow)"):
        run([tmp_path / "cut.arrow"], "hf-dataset", tmp_path / "o2", vocab)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(ValueError, match=r"state\.json.*data-00000-of-00001\.arrow.*missing"):
        run([tmp_path / "ds"], "hf-dataset", tmp_path / "o3", vocab)
    with pytest.raises(ValueError, match="--text-column/--title-column only apply"):
        run([tmp_path / "a.arrow"], "jsonl", tmp_path / "o4", vocab, text_column="body")


def test_cli_text_field_alias(tmp_path, vocab, reference):  # noqa: F811
    from data_prep.cli import main

    docs, ref = reference
    write_arrow_stream(tmp_path / "a.arrow", docs, column="body")
    rc = main([str(tmp_path / "a.arrow"), "--format", "hf-dataset", "--text-field", "body", "--vocab", str(vocab),
               "--out", str(tmp_path / "out"), "--shards", "2", "--valid-fraction", "0.25", "--min-doc-chars", "10",
               "--no-progress"])
    assert rc == 0 and databin_bytes(tmp_path / "out") == ref
