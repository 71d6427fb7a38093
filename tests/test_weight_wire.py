from __future__ import annotations

import torch

from personadual.weight_wire import TensorMeta, bucket_nbytes, pack, plan_buckets, unpack


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
