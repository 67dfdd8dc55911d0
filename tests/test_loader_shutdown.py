"""The trainer's DataLoader stops its reader when the training loop stops consuming it.

paddle stops an iterator's reader thread (0 workers) or worker processes in the iterator's
`__del__`; the training loop leaves the loader in the middle of a pass at --max_steps, and an
iterator that lives on to the interpreter's exit can abort the process there (a rank of a
finished 2-rank run exited with -6 now and then). `TimedDataLoader` stops it when its consumer
stops (the generator closes)."""
import numpy as np
import pytest
from paddle.io import IterableDataset

from ldm.data import collate
from ldm.train.trainer import TimedDataLoader


class _Endless(IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield {"pixel_values": np.full((4, 4, 3), i % 256, np.uint8), "caption": f"c{i}"}
            i += 1


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_stops_when_the_consumer_stops(workers):
    loader = TimedDataLoader(_Endless(), batch_size=2, num_workers=workers, collate_fn=collate)
    batches = iter(loader)
    first = next(batches)
    assert len(first["caption"]) == 2
    inner = batches.gi_frame.f_locals["it"]  # paddle's iterator, kept alive here on purpose
    assert not inner._shutdown
    batches.close()  # what happens when the training loop breaks out at --max_steps
    assert inner._shutdown
    if workers == 0:
        assert inner._thread is None
    else:
        assert not any(w.is_alive() for w in inner._workers)
