"""The stages' webdataset grouping (jobs.wds.tar_samples) against webdataset's own
tariterators and reshard's reader, on one shard of 10,000 samples.

    .venv/bin/python benchmarks/bench_wds.py [--samples 10000] [--image-bytes 4096] [--repeats 3]

Each reader reads every member's bytes (tario's: `Sample.load()`) from a local file; the best
of `repeats` runs is printed with its ratio to the layer's time (> 1: slower than the layer).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.reshard.tario import TarSampleReader, _MappedSource  # noqa: E402
from jobs.wds import tar_samples  # noqa: E402


def write_shard(path: str, samples: int, image_bytes: int) -> None:
    rnd = os.urandom(image_bytes)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            for ext, data in (("jpg", rnd), ("txt", b"a caption of some words %d" % i),
                              ("json", json.dumps({"uid": "%032x" % i, "key": "%09d" % i}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def layer(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in tar_samples(f, path))


def webdataset_tariterators(path: str) -> int:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        files = ({**member, "__url__": path} for member in tar_file_iterator(f))
        return sum(1 for _ in group_by_keys(files))


def tario_mapped(path: str) -> int:
    with TarSampleReader(None, source=_MappedSource(path)) as reader:
        n = 0
        for sample in reader:
            for m in sample.load():
                bytes(m.data)
            n += 1
        return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--image-bytes", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import webdataset.tariterators  # noqa: F401 - its import time (torch) is not the reader's

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "00000000.tar")
        write_shard(path, args.samples, args.image_bytes)
        print(f"shard: {args.samples} samples x 3 members, {os.path.getsize(path) / 1e6:.1f} MB")
        best = {}
        for name, read in (("jobs.wds.tar_samples", layer), ("webdataset tariterators", webdataset_tariterators),
                           ("tario (reshard, mmap)", tario_mapped)):
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                assert read(path) == args.samples
                times.append(time.perf_counter() - started)
            best[name] = min(times)
        base = best["jobs.wds.tar_samples"]
        for name, seconds in best.items():
            print(f"{name:26s} {seconds:7.3f} s  {args.samples / seconds:9.0f} samples/s  "
                  f"ratio to the layer {seconds / base:5.2f}")


if __name__ == "__main__":
    main()
