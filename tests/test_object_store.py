"""run.output_dir as an object-store URI: the working copies and the store (rlhf_ray/storage.py), against a real
S3 server on 127.0.0.1. The stages writing into it from several nodes: tests/test_multinode.py."""

import os
import time

import pytest

from rlhf_ray import storage
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.storage import RunStore, StoreUnreachable
from tests.s3_server import bucket_uri, stored_files

pytestmark = pytest.mark.component


def store_at(uri: str, copy) -> RunStore:
    return load_config(None, [f"run.output_dir={uri}", f"run.local_copy_dir={copy}", "run.name=r"]).run.store


def test_a_run_sent_from_one_copy_is_fetched_whole_into_another(s3_endpoint, tmp_path):
    uri = bucket_uri(s3_endpoint, "round-trip")
    mine, theirs = store_at(uri, tmp_path / "a"), store_at(uri, tmp_path / "b")
    assert mine.local == str(tmp_path / "a" / "s3" / "round-trip" / "runs" / "r")
    model = mine.local_path("sft/model")
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(3 << 20))  # several multipart chunks
    (model / "config.json").write_text("{}")
    mine.local_path("sft/.export-tmp").mkdir()
    (mine.local_path("sft/.export-tmp") / "partial").write_text("x")  # staging stays local
    assert mine.push() == 2 and mine.push() == 0  # nothing newer the second time
    assert stored_files(s3_endpoint, "round-trip/runs/r") == {
        "sft/model/model.safetensors": 3 << 20,
        "sft/model/config.json": 2,
    }
    assert theirs.pull() == 2 and theirs.pull() == 0
    fetched = theirs.local_path("sft/model/model.safetensors")
    assert fetched.read_bytes() == (model / "model.safetensors").read_bytes()
    assert not theirs.local_path("sft/.export-tmp").exists()


def test_a_file_rewritten_at_the_same_size_goes_both_ways_and_a_folder_sent_with_delete_is_replaced(
    s3_endpoint, tmp_path
):
    uri = bucket_uri(s3_endpoint, "rewrite")
    mine, theirs = store_at(uri, tmp_path / "a"), store_at(uri, tmp_path / "b")
    state = mine.local_path("ppo/state.json")
    state.parent.mkdir(parents=True)
    state.write_text('{"iteration": 1}')
    mine.push("ppo")
    theirs.pull("ppo")
    time.sleep(1.1)  # (S3 keeps whole seconds)
    state.write_text('{"iteration": 2}')  # same size, written after the upload
    assert mine.push("ppo") == 1
    assert theirs.pull("ppo") == 1 and theirs.local_path("ppo/state.json").read_text() == '{"iteration": 2}'

    staging = theirs.local_path("ppo/.tmp-export")
    staging.mkdir()
    (staging / "adapter.safetensors").write_bytes(b"new")
    theirs.send("ppo/.tmp-export", "ppo", delete_missing=True)  # the store's ppo is now exactly the staging folder
    assert stored_files(s3_endpoint, "rewrite/runs/r/ppo") == {"adapter.safetensors": 3}
    assert mine.pull_paths(mine.local_path("ppo"), "/somewhere/else") == 1  # paths outside the run: ignored


def test_the_uri_is_shown_without_credentials_and_a_malformed_one_is_refused(s3_endpoint, tmp_path):
    store = store_at(bucket_uri(s3_endpoint, "shown"), tmp_path)
    assert store.shown == "s3://shown/runs/r"
    marker = store.check()
    assert store.read_marker(marker) == marker
    store.delete(marker)
    assert store.read_marker(marker) is None
    with pytest.raises(ConfigError, match="neither a folder nor a URI"):
        load_config(None, ["run.output_dir=3s://bucket/runs"])


def test_a_store_that_cannot_be_reached_stops_the_stage_in_one_line(tmp_path, capsys):
    from rlhf_ray.cli import main

    closed = "s3://k:s@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    code = main(["sft", "configs/tiny.yaml", f"run.output_dir={closed}", f"run.local_copy_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rlhf-ray: error: run.output_dir s3://bucket/runs/tiny: cannot read the store (")
    assert "k:s@" not in err and "Traceback" not in err
    with pytest.raises(StoreUnreachable):
        store_at(closed, tmp_path).check()


def test_a_stage_fetches_the_run_but_the_ray_train_checkpoints_of_other_stages(s3_endpoint, tmp_path, capsys):
    uri = bucket_uri(s3_endpoint, "fetch")
    mine, theirs = store_at(uri, tmp_path / "a"), store_at(uri, tmp_path / "b")
    for relative in ("sft/model/model.safetensors", "sft/ray/sft/checkpoint_1/a.pt", "rm/ray/rm/checkpoint_1/b.pt"):
        mine.local_path(relative).parent.mkdir(parents=True, exist_ok=True)
        mine.local_path(relative).write_text(relative)
    mine.push()
    theirs.fetch("rm", "rm")
    fetched = sorted(p.relative_to(theirs.local).as_posix() for p in theirs.local_path().rglob("*") if p.is_file())
    assert fetched == ["rm/ray/rm/checkpoint_1/b.pt", "sft/model/model.safetensors"]
    assert f"[rm] run folder s3://fetch/runs/r: 2 files fetched into {theirs.local}" in capsys.readouterr().out


def test_the_file_that_marks_a_folder_complete_reaches_the_store_last(s3_endpoint, tmp_path):
    store = store_at(bucket_uri(s3_endpoint, "order"), tmp_path)
    model = store.local_path("sft/model")
    model.mkdir(parents=True)
    for name in ("config.json", "export.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(name)
    sent = []
    store_upload = storage._upload
    try:
        storage._upload = lambda fs, source, target: (sent.append(source.name), store_upload(fs, source, target))
        store.push("sft/model")
    finally:
        storage._upload = store_upload
    assert sent[-1] == "export.json" and len(sent) == 4


def test_ray_storage_finds_a_stage_folder_through_a_linked_working_copy(s3_endpoint, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    store = RunStore(bucket_uri(s3_endpoint, "linked"), "r", str(tmp_path / "linked" / "r"))
    resolved_stage = (tmp_path / "linked" / "r" / "sft").resolve()  # the form train/launch.py passes
    assert store.relative(resolved_stage / "ray") == "sft/ray"
    assert store.relative(tmp_path / "linked" / "r" / "sft") == "sft"
    assert store.relative(tmp_path / "elsewhere") is None
    assert storage.ray_storage(store, resolved_stage / "ray")["storage_path"] == "linked/runs/r/sft/ray"
