"""Bad samples: each bad file is logged once per run (across dataloader workers and epochs) and counted
under the right kind."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import Counter
from pathlib import Path

import simla
from simla.data.pretrain_data import AnnotationData, CaptionBatches, EpochBatchPlan, SampleBuilder
from simla.data.readers import read_records
from simla.data.transforms import PretrainViewConfig, PretrainViews
from simla.masking import BlockMaskGenerator

from datasets import make_pairs, salt_with_bad_input, write_json

# The kind each salted bad record must be counted under (see tests/datasets.py).
EXPECTED_KIND = {"corrupt.jpg": "corrupt", "truncated.jpg": "truncated", "empty.png": "truncated",
                 "missing.jpg": "missing", "pairs.json[20]": "empty_caption"}
LINE = re.compile(r"skipping bad sample \((\w+)\) (\S+): ")


@contextlib.contextmanager
def warnings_to_fd2():
    """Send simla's warnings to file descriptor 2, where forked dataloader workers write too.

    Entered inside the test: capfd redirects fd 2 only once the test body runs.
    """
    stream = os.fdopen(os.dup(2), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("simla")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        stream.close()


def test_each_bad_file_is_logged_once_across_workers_and_epochs_and_counted_by_kind(tmp_path, minilm_dir, capfd):
    records = salt_with_bad_input(tmp_path, make_pairs(tmp_path, 16))
    write_json(tmp_path / "pairs.json", records)
    records = read_records(tmp_path / "pairs.json", tmp_path)
    builder = SampleBuilder(PretrainViews(PretrainViewConfig(image_size=32, tokenizer_size=16)),
                            BlockMaskGenerator(8, 12, 4))
    dataset = CaptionBatches(records, builder, simla.get_tokenizer(minilm_dir), 16, seed=5)
    data = AnnotationData(dataset, EpochBatchPlan(len(records), 4, seed=5), num_workers=2)
    counted: Counter[str] = Counter()
    met: Counter[str] = Counter()
    with warnings_to_fd2():
        for epoch in range(3):  # workers are recreated every epoch
            for batch, meta in data.batches(epoch):
                data.consumed(epoch, meta)
                counted.update(meta["skipped"])
                met.update(Path(source).name for source, _, _ in meta["bad"])
    lines = LINE.findall(capfd.readouterr().err)
    logged = Counter(Path(source).name for _, source in lines)
    assert set(logged) == set(EXPECTED_KIND) and max(met.values()) > 1  # met again and again ...
    assert all(count == 1 for count in logged.values()), logged  # ... logged once
    for kind, source in lines:
        assert kind == EXPECTED_KIND[Path(source).name], source
    expected_counts = Counter()
    for name, times in met.items():
        expected_counts[EXPECTED_KIND[name]] += times
    assert counted == expected_counts
