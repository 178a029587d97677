"""Datasets as they are published: parquet uploads, and parquet files or
``datasets.save_to_disk`` folders named by path, in the s1K, s1K-1.1 and LIMO schemas."""

from __future__ import annotations

import pytest

from tests.platform.conftest import Api
from tests.platform.data import LIMO_ROW, S1K11_ROW, S1K_ROW, jsonl, parquet, save_to_disk
from tests.platform.test_api_files import assert_error, stored_files, upload
from tests.platform.test_api_jobs import create, reconcile
from thinkforge.jobs.config import DatasetFormat, iter_records


@pytest.mark.parametrize(("row", "fmt"), [(S1K_ROW, "s1k"), (S1K11_ROW, "s1k"), (LIMO_ROW, "limo")])
def test_parquet_upload_in_each_published_schema(api: Api, row: dict, fmt: str) -> None:
    resp = upload(api, parquet(row, row, row), name="train.parquet")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["format"] == fmt and body["num_records"] == 3
    assert body["filename"] == "train.parquet"
    [stored] = stored_files(api)
    assert stored.name == f"{body['id']}.parquet"
    job = create(api, body["id"])
    assert job.status_code == 200, job.text
    reconcile(api)
    got = api.client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()
    assert got["status"] == "queued", got


@pytest.mark.parametrize(
    ("rows", "needle", "param"),
    [
        # a column missing from the table: every row names it
        ([{"question": "q", "solution": "s"}] * 2, "row 1, column 'answer'", "answer"),
        ([LIMO_ROW, {**LIMO_ROW, "answer": None}], "row 2, column 'answer'", "answer"),
        (
            [S1K_ROW, {**S1K_ROW, "thinking_trajectories": []}],
            "row 2, column 'thinking_trajectories'",
            "thinking_trajectories",
        ),
        (
            [{k: v for k, v in S1K11_ROW.items() if not k.endswith("attempt")}],
            "row 1, column 'attempt'",
            "attempt",
        ),
        ([{"prompt": "p", "completion": "c"}], "row 1: cannot tell the format", "file"),
        ([S1K_ROW, LIMO_ROW], "row 2", None),
    ],
)
def test_bad_parquet_names_row_and_column_and_writes_nothing(
    api: Api, rows: list[dict], needle: str, param: str | None
) -> None:
    err = assert_error(upload(api, parquet(*rows), name="t.parquet"), 400, param)
    assert needle in err["message"], err["message"]
    assert err["code"] == "invalid_file"
    assert api.client.get("/v1/files").json()["data"] == []
    assert stored_files(api) == []


def test_upload_content_must_match_its_name(api: Api) -> None:
    err = assert_error(upload(api, jsonl(LIMO_ROW), name="t.parquet"), 400, "file")
    assert "not a parquet file" in err["message"]
    err = assert_error(upload(api, parquet(LIMO_ROW), name="t.jsonl"), 400, "file")
    assert "not a jsonl file" in err["message"]
    assert stored_files(api) == []


def test_job_datasets_by_path_parquet_and_save_to_disk_folders(api: Api) -> None:
    root = api.settings.dataset_roots[0]
    root.mkdir(parents=True)
    (root / "s1k.parquet").write_bytes(parquet(S1K_ROW, S1K_ROW))
    save_to_disk(root / "s1k-1.1", S1K11_ROW, S1K11_ROW, S1K11_ROW)
    save_to_disk(root / "limo", LIMO_ROW, LIMO_ROW, split="train")
    save_to_disk(root / "broken", LIMO_ROW, {"question": "q", "solution": "s"})
    (root / "plain-folder").mkdir()
    ids = {}
    for name in ("s1k.parquet", "s1k-1.1", "limo", "broken"):
        resp = create(api, "", training_file=str(root / name))
        assert resp.status_code == 200, resp.text
        ids[name] = resp.json()["id"]
    reconcile(api)
    jobs = {n: api.client.get(f"/v1/fine_tuning/jobs/{i}").json() for n, i in ids.items()}
    assert [jobs[n]["status"] for n in ("s1k.parquet", "s1k-1.1", "limo")] == ["queued"] * 3
    assert jobs["broken"]["status"] == "failed"
    assert "row 2, column 'answer'" in jobs["broken"]["error"]["message"]
    events = api.client.get(f"/v1/fine_tuning/jobs/{ids['s1k-1.1']}/events").json()["data"]
    assert any("3 s1k records" in e["message"] for e in events)
    # a folder that save_to_disk did not write, and a DatasetDict split by its own path
    assert_error(create(api, "", training_file=str(root / "plain-folder")), 400, "training_file")
    assert create(api, "", training_file=str(root / "limo" / "train")).status_code == 200


def test_the_job_reads_tables_as_the_upload_check_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.parquet").write_bytes(parquet(S1K_ROW, S1K_ROW))
    (tmp_path / "b.parquet").write_bytes(parquet(S1K11_ROW))
    folder = save_to_disk(tmp_path / "d", LIMO_ROW, LIMO_ROW, LIMO_ROW, split="train")
    [(_, s1k), _] = iter_records(tmp_path / "a.parquet")
    [(_, s1k11)] = iter_records(tmp_path / "b.parquet")
    assert (s1k.thinking, s1k.answer) == ("1+2=3\nso 3", "Answer: 3")
    assert (s1k11.thinking, s1k11.answer) == ("2+2=4", "Answer: 4")  # deepseek's, not gemini's
    assert [n for n, _ in iter_records(folder)] == [1, 2, 3]
    with pytest.raises(ValueError, match="row 1, column 'answer'"):
        list(iter_records(tmp_path / "a.parquet", DatasetFormat.LIMO))
