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


_AFTER_OPENCV = r"""
import numpy as np, cv2
from paddle.io import Dataset
from ldm.data import collate
from ldm.train.trainer import TimedDataLoader

class Images(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        img = cv2.resize(np.full((480, 640, 3), i, np.uint8), (256, 192), interpolation=cv2.INTER_LINEAR)
        return {"pixel_values": img, "caption": str(i)}

# this process's OpenCV thread pool runs before the workers fork (as the trainer's own transforms do)
cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000), interpolation=cv2.INTER_AREA)
seen = []
for batch in TimedDataLoader(Images(), batch_size=2, num_workers=2, collate_fn=collate):
    seen += list(batch["caption"])
print(sorted(seen, key=int))
"""


def test_workers_forked_after_opencv_ran_deliver_every_batch(tmp_path):
    """Workers forked from a process whose OpenCV thread pool has run must not call into OpenCV's
    pool set-up (cv2.setNumThreads there deadlocked every worker: the trainer hung at its first batch)."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _AFTER_OPENCV], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == str([str(i) for i in range(8)])
