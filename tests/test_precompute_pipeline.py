"""precompute/pipeline.py: decoding, encoding and writing overlap without changing a byte of the cache.

No GPU here: the GPU path (page-locked batches, non-blocking copies, a CUDA event the packer waits
on) is checked through the contracts the CPU can exercise: outputs are read only after `wait()`,
device copies convert like the sequential code did, and errors in any thread stop the job.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import plain_shards, run_precompute

from precompute import encode as enc
from precompute import format as fmt
from precompute.pipeline import Encoded, Packer, per_sample, threaded, to_host


class LateCopy:
    """Stands for the CUDA event: the outputs land in the host tensors only when it is waited on."""

    def __init__(self, pending: list[tuple[torch.Tensor, torch.Tensor]]):
        self.pending, self.waited = pending, False

    def synchronize(self) -> None:
        for host, values in self.pending:
            host.copy_(values)
        self.waited = True


class Sample:
    def __init__(self, captions: list[str]):
        self.captions = captions


def test_outputs_are_read_only_once_their_copy_is_complete():
    image, hidden = torch.randn(2, 4), torch.randn(3, 5, 4)  # 2 samples, 3 captions of 5 tokens
    text, mask = torch.randn(3, 4), torch.arange(5).expand(3, 5) < torch.tensor([[2], [5], [3]])
    host = [torch.zeros_like(t) for t in (image, text, hidden)]
    encoded = Encoded(host[0], None, host[1], host[2], mask, ready=LateCopy(list(zip(host, (image, text, hidden)))))
    arrays = per_sample(encoded, [Sample(["a", "b"]), Sample(["c"])])
    assert encoded.ready.waited
    np.testing.assert_array_equal(arrays[1][fmt.IMAGE_EMBEDS], image[1].numpy())
    np.testing.assert_array_equal(arrays[0][fmt.TEXT_HIDDEN], torch.cat([hidden[0, :2], hidden[1, :5]]).numpy())
    assert arrays[0][fmt.TEXT_LENGTHS].tolist() == [2, 5] and arrays[1][fmt.TEXT_EMBEDS].shape == (1, 4)


def test_device_copies_convert_as_before():
    values = torch.randn(3, 8)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        like = torch.zeros(1, dtype=dtype)
        assert torch.equal(enc.to_device(values, like), values.to(dtype=dtype))  # copied, then converted
    assert to_host(values.bfloat16()).dtype == torch.float32 and to_host(values) is values


def test_reader_thread_yields_in_order_and_raises_where_its_input_failed():
    def items():
        yield from range(5)
        raise OSError("tar cut off")

    seen = []
    with pytest.raises(OSError, match="tar cut off"):
        for item in threaded(items()):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


class FailingWriter:
    def put(self, unit, split, record, bucket=None):
        raise RuntimeError("writing shards failed: disk full")


def test_a_failing_writer_stops_the_main_thread():
    packer = Packer({}, np.float16, FailingWriter(), type("Bar", (), {"update": lambda self, n: None})(),
                    lambda unit, done: {})
    from precompute.units import Batch

    sample = type("S", (), {"copied": {"json": b"{}"}, "unit": "u", "split": "train", "sid": "a", "fp": "f",
                            "image_sha256": None, "meta": {}})()
    packer.put(Batch([sample], None, None, [], [], []), None)
    with pytest.raises(RuntimeError, match="disk full"):
        packer.close()


@pytest.mark.slow
def test_decoding_workers_and_the_reader_thread_write_the_same_bytes(tiny_models, sample_data, tmp_path):
    """--num_workers 2 (DataLoader processes) and 0 (the reader thread): the same shards, byte for byte."""
    flags = ("--max_samples", "24", "--batch_size", "4", "--samples_per_shard", "8")
    source = ["--train_data_dir", str(sample_data["imagefolder"])]
    assert run_precompute(tiny_models, tmp_path / "thread", *flags, source=source) == 0
    assert run_precompute(tiny_models, tmp_path / "workers", *flags, "--num_workers", "2", source=source) == 0
    shards = plain_shards(tmp_path / "thread")
    assert len(shards) >= 2 and shards == plain_shards(tmp_path / "workers")  # names, counts, sizes, sha256
    totals = [json.loads((tmp_path / run / fmt.MANIFEST_NAME).read_text())["totals"] for run in ("thread", "workers")]
    assert totals[0] == totals[1] and totals[0]["samples"] == 24
