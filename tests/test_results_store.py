"""The benchmarks' JSON store: invocations that share it never drop each other's rows."""

import json
import multiprocessing

from hf_rmtkd.reporting import open_store, update_store


def _write_rows(folder: str, prefix: str, count: int) -> None:
    store, _ = open_store(folder)
    for i in range(count):
        update_store(store, {f"{prefix}@{i}": {"accuracy": i / count}})


def test_a_stale_copy_does_not_overwrite_rows_written_since(tmp_path):
    store, _ = open_store(str(tmp_path))
    update_store(store, {"teacher": {"accuracy": 0.9}})
    _, stale = open_store(str(tmp_path))
    update_store(store, {"svd@0": {"accuracy": 0.8}})
    # `stale` is what an invocation holds from its start; before update_store it wrote that dict back whole and
    # dropped svd@0. Its own row now goes through update_store, which merges into the file as it is.
    rows = update_store(store, {"layer_drop@0": {"accuracy": 0.7}, "teacher": {"accuracy": 0.91}}, command="run a")
    assert "svd@0" not in stale
    assert set(rows) == {"teacher", "svd@0", "layer_drop@0", "_runs"}
    assert rows["teacher"] == {"accuracy": 0.91}
    assert json.loads(store.read_text()) == rows
    assert update_store(store, {}, command="run b")["_runs"] == ["run a", "run b"]


def test_two_processes_writing_one_store_keep_every_row(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_rows, args=(str(tmp_path), name, 25)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert sorted(rows) == sorted(f"{name}@{i}" for name in ("a", "b") for i in range(25))
    assert not list(tmp_path.glob("*.tmp"))
