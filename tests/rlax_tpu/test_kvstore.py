"""The kvstore facade: CAS semantics on memory:// and file://, listing, clear errors."""

import pytest

from rlax_tpu.kvstore import KVStore, StoreError, resolve_url


@pytest.fixture(params=["memory", "file"])
def kv(request, tmp_path):
    url = "memory://" if request.param == "memory" else f"file://{tmp_path}/store"
    return KVStore.open(url)


def test_create_is_exclusive(kv):
    assert kv.create("a/x", b"1")
    assert not kv.create("a/x", b"2")
    assert kv.get("a/x") == b"1"


def test_cas_detects_a_concurrent_writer(kv):
    kv.put("k", b"1")
    entry = kv.read("k")
    kv.put("k", b"2")  # someone else writes in between
    assert not kv.cas("k", b"3", entry.generation)
    assert kv.get("k") == b"2"
    fresh = kv.read("k")
    assert kv.cas("k", b"3", fresh.generation)
    assert kv.cas("k", None, kv.read("k").generation)  # conditional delete
    assert not kv.read("k").exists


def test_empty_generation_is_refused(kv):
    with pytest.raises(StoreError, match="unconditional"):
        kv.cas("k", b"1", b"")


def test_list_and_delete_prefix(kv):
    for key in ("t/1", "t/2", "u/1"):
        kv.put(key, b"x")
    assert kv.list("t/") == ["t/1", "t/2"]
    kv.delete_prefix("t/")
    assert kv.list() == ["u/1"]


def test_url_errors_name_the_url(tmp_path):
    with pytest.raises(StoreError, match="s3://x"):
        KVStore.open("s3://x")
    assert resolve_url("", str(tmp_path)).startswith("file://")
    with pytest.raises(StoreError, match="store.url is empty"):
        resolve_url("")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create directory"):
        KVStore.open(f"file://{blocker}/sub")


def test_fencing_refuses_a_stale_trainer(kv):
    from rlax_tpu.fencing import FencedError, acquire_epoch, check_epoch

    first = acquire_epoch(kv, host="a")
    check_epoch(kv, first)
    second = acquire_epoch(kv, host="b")
    assert second == first + 1
    check_epoch(kv, second)
    with pytest.raises(FencedError, match=f"epoch {first} is fenced out by epoch {second}"):
        check_epoch(kv, first)
