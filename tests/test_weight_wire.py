from __future__ import annotations

import torch

from personadual.weight_buckets import TensorMeta, bucket_nbytes, plan_buckets
from personadual.weight_wire import pack, unpack


def test_pack_unpack_round_trips_mixed_dtypes():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.randn(4, 3).t()}
    metas = [TensorMeta.of(n, t) for n, t in tensors.items()]
    out = dict(unpack(pack(tensors.values()), metas))
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)


def test_bucket_plan_respects_the_size_and_keeps_order():
    metas = [TensorMeta(f"p{i}", "float32", (n,)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = plan_buckets(metas, bucket_bytes=80)
    assert [i for b in buckets for i in b] == list(range(len(metas)))
    for bucket in buckets:
        assert bucket_nbytes(metas, bucket) <= 80 or len(bucket) == 1
    assert [4] in buckets  # 400 bytes: larger than a bucket, travels alone


def test_a_full_bucket_ends_where_a_layer_starts_not_inside_one():
    shapes = [("embed", 100)] + [(f"model.layers.{layer}.{part}", size) for layer in range(3)
                                 for part, size in (("attn", 30), ("mlp", 50))] + [("norm", 10)]
    metas = [TensorMeta(name, "float32", (size,)) for name, size in shapes]

    def names(bucket_bytes):
        return [[metas[i].name.removeprefix("model.layers.") for i in b] for b in plan_buckets(metas, bucket_bytes)]

    # 400 + 320 + 320 bytes: a layer would be split at 800, so its whole self moves on
    assert names(800) == [["embed", "0.attn", "0.mlp"], ["1.attn", "1.mlp", "2.attn", "2.mlp", "norm"]]
    assert names(1100) == [["embed", "0.attn", "0.mlp", "1.attn", "1.mlp"], ["2.attn", "2.mlp", "norm"]]
    # a layer larger than a bucket is split by size, as any tensor run
    assert names(200) == [["embed"], ["0.attn"], ["0.mlp"], ["1.attn"], ["1.mlp"], ["2.attn"], ["2.mlp"], ["norm"]]


def _two_rank_groups():
    """Rank 0 and rank 1 of one gloo transfer group, both in this process (one thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    from personadual.weight_wire import open_transfer_group
    from tests.helpers import free_port

    port = free_port()
    with ThreadPoolExecutor(max_workers=2) as pool:
        groups = [pool.submit(open_transfer_group, "127.0.0.1", port, rank, 2, 30.0) for rank in (0, 1)]
        return [group.result() for group in groups]


def test_updates_through_reused_bucket_buffers_arrive_intact_with_matching_checksums_each_time():
    from concurrent.futures import ThreadPoolExecutor

    from personadual.weight_buckets import BucketBuffers
    from personadual.weight_wire import ReceivedUpdate, receive_buckets, send_buckets

    sender_group, receiver_group = _two_rank_groups()
    shapes = {"embed": (50, 8), "norm": (8,), "proj": (8, 24), "head": (50, 8)}
    metas = [TensorMeta(name, "float32", shape) for name, shape in shapes.items()]
    send_buffers, receive_buffers, record = BucketBuffers(), BucketBuffers(), ReceivedUpdate()
    for update in range(2):
        torch.manual_seed(update)
        tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
        sent_checksums: list[int | None] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            received = pool.submit(lambda: {name: tensor.clone() for bucket in receive_buckets(
                receiver_group, metas, 1024, record, receive_buffers) for name, tensor in bucket})
            sent, via_memory = send_buckets(sender_group, metas, iter(tensors.values()), 1024,
                                            checksums=sent_checksums, buffers=send_buffers)
            arrived = received.result(timeout=30)
        assert sent == sum(m.nbytes for m in metas) and not via_memory
        assert len(sent_checksums) == len(plan_buckets(metas, 1024)) > 1
        assert record.mismatch(sent_checksums) is None
        for name, tensor in tensors.items():
            assert torch.equal(arrived[name], tensor), (update, name)
        if update == 0:
            first_buffers = [buffer.data_ptr() for _, buffer in receive_buffers.plan(metas, 1024)]
    assert [buffer.data_ptr() for _, buffer in receive_buffers.plan(metas, 1024)] == first_buffers


def test_a_flipped_byte_changes_a_buckets_checksum():
    from personadual.weight_wire import bucket_checksum

    bucket = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    flipped = bucket.clone()
    flipped[2048] ^= 1
    assert bucket_checksum(bucket) == bucket_checksum(bucket.clone()) != bucket_checksum(flipped)


def test_parameters_laid_out_in_flat_buffers_travel_from_there_uncopied_and_arrive_intact():
    """As a ZeRO-1/2 rank holds them: matrices as views of one flat buffer, norms of another,
    a tied head aliasing the embedding, one tensor of its own; listed as a state dict lists
    them (interleaved). In memory order every bucket but the tied head's goes uncopied."""
    from concurrent.futures import ThreadPoolExecutor

    from personadual.weight_buckets import BucketBuffers
    from personadual.weight_wire import ReceivedUpdate, memory_order, receive_buckets, send_buckets

    matrices, norms = torch.randn(50 * 8 + 8 * 24 + 24 * 8), torch.randn(8 + 8)
    embed = matrices[:400].view(50, 8)
    named = {"embed": embed, "up": matrices[400:592].view(8, 24), "norm1": norms[:8],
             "down": matrices[592:].view(24, 8), "norm2": norms[8:], "head": embed, "own": torch.randn(3, 5)}
    names, tensors = list(named), list(named.values())
    order, breaks = memory_order(tensors)
    ordered = [names[i] for i in order]
    assert ordered.index("embed") + 1 == ordered.index("up") and ordered.index("up") + 1 == ordered.index("down")
    assert ordered.index("norm1") + 1 == ordered.index("norm2") and ordered[-1] == "head"  # the alias goes last
    assert len(breaks) == 3  # matrices | norms | own | head, in some order of the storages

    metas = [TensorMeta.of(names[i], tensors[i]) for i in order]
    sender_group, receiver_group = _two_rank_groups()
    record, direct = ReceivedUpdate(), []
    with ThreadPoolExecutor(max_workers=1) as pool:
        received = pool.submit(lambda: {name: tensor.clone() for bucket in receive_buckets(
            receiver_group, metas, 1 << 20, record, BucketBuffers(), breaks=breaks) for name, tensor in bucket})
        sent_checksums: list[int | None] = []
        send_buckets(sender_group, metas, iter([tensors[i] for i in order]), 1 << 20, checksums=sent_checksums,
                     buffers=BucketBuffers(), breaks=breaks, direct=direct)
        arrived = received.result(timeout=30)
    assert record.mismatch(sent_checksums) is None
    for name, tensor in named.items():
        assert torch.equal(arrived[name], tensor), name
    # Four buckets, one per run of memory, each sent straight from it; the bucket packing
    # the state dict's order would have made mixes the storages and is copied.
    assert len(direct) == 4 and sum(direct) == sum(m.nbytes for m in metas)
    interleaved, direct = [TensorMeta.of(n, t) for n, t in named.items()], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        received = pool.submit(lambda: {name: tensor.clone() for bucket in receive_buckets(
            receiver_group, interleaved, 1 << 20) for name, tensor in bucket})
        send_buckets(sender_group, interleaved, iter(tensors), 1 << 20, direct=direct)
        assert all(torch.equal(received.result(timeout=30)[n], t) for n, t in named.items())
    assert direct == [0]


def _shared_update(sender_group, receiver_group, metas, tensors, sender, receiver, path, *, corrupt_path=False):
    """One update offered through ``sender``'s file; the receiver maps ``path`` (or cannot)."""
    from concurrent.futures import ThreadPoolExecutor

    from personadual.weight_buckets import BucketBuffers
    from personadual.weight_wire import ReceivedUpdate, receive_buckets, send_buckets

    record, sent_checksums, storages = ReceivedUpdate(), [], set()

    def receive():
        arrived = {}
        for bucket in receive_buckets(receiver_group, metas, 1024, record, BucketBuffers(),
                                      shared_path=path + ("-elsewhere" if corrupt_path else ""), shared=receiver):
            for name, tensor in bucket:
                storages.add(tensor.untyped_storage().data_ptr())
                arrived[name] = tensor.clone()
        return arrived

    with ThreadPoolExecutor(max_workers=1) as pool:
        received = pool.submit(receive)
        sent, via_memory = send_buckets(sender_group, metas, iter(tensors.values()), 1024, checksums=sent_checksums,
                                        buffers=BucketBuffers(), shared=sender)
        arrived = received.result(timeout=30)
    assert sent == sum(m.nbytes for m in metas)
    assert record.mismatch(sent_checksums) is None
    for name, tensor in tensors.items():
        assert torch.equal(arrived[name], tensor), name
    return via_memory, storages


def test_an_engine_on_the_senders_host_loads_the_buckets_from_the_shared_file_without_the_wire(tmp_path):
    from personadual.weight_buckets import SharedBuckets

    sender_group, receiver_group = _two_rank_groups()
    shapes = {"embed": (50, 8), "norm": (8,), "proj": (8, 24), "head": (50, 8)}
    metas = [TensorMeta(name, "float32", shape) for name, shape in shapes.items()]
    sender, receiver = SharedBuckets(tmp_path), SharedBuckets(tmp_path)
    for update in range(2):
        torch.manual_seed(update)
        tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
        assert sender.plan_shared(metas, 1024) is not None
        path = str(sender.path)
        via_memory, storages = _shared_update(sender_group, receiver_group, metas, tensors, sender, receiver, path)
        assert via_memory
        # every tensor handed to the loader is a view of the one mapped file
        assert storages == {receiver.plan(metas, 1024)[0][1].untyped_storage().data_ptr()}
        assert [p.name for p in tmp_path.iterdir()] == [sender.path.name]  # one file, kept between updates
    # A receiver that cannot map the file (another host): both ends fall back to the wire.
    via_memory, _ = _shared_update(sender_group, receiver_group, metas, tensors, sender, SharedBuckets(tmp_path),
                                   path, corrupt_path=True)
    assert not via_memory
    sender.close()
    assert list(tmp_path.iterdir()) == []


def test_a_shared_bucket_file_is_made_only_with_room_for_it_and_orphans_are_removed(tmp_path):
    import subprocess
    import sys

    from personadual.weight_buckets import SHARED_PREFIX, SharedBuckets

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{SHARED_PREFIX}{int(dead.stdout)}-0123456789ab"
    orphan.write_bytes(b"x")
    metas = [TensorMeta("w", "float32", (1024,))]
    sender = SharedBuckets(tmp_path)
    assert sender.plan_shared(metas, 1 << 20) is not None
    assert not orphan.exists() and sender.path.stat().st_size == 4096
    # no room: a directory that cannot hold the file gives None (the update goes over the wire)
    assert SharedBuckets(tmp_path / "missing").plan_shared(metas, 1 << 20) is None
