"""Prepared datasets: TFDS builders that write ArrayRecord shards, and Grain sources over them.

Why shards: a million small media files on a network disk are slow to list and open; a few
large ArrayRecord files read by index are not, and they are ordinary TFDS datasets
(`tfds.builder_from_directory(dir).as_data_source(split)`), written and read without
TensorFlow (`file_format="array_record"`).

What a record holds: the reader's `Example` (JSON) and each media file's own bytes (JPEG, MP4,
FLAC, NPZ, ...), not decoded arrays. Decoding stays in the pipeline, so that
- batches equal those read from the raw files, random train transforms included (crops,
  frame choice, flips, FPS start): decoded arrays would freeze one draw of them;
- `MediaOptions` (image size, frames, clips, points) can change without preparing again;
- shards stay the size of the originals (a 224 px float32 image is 600 KB, its JPEG ~20 KB).
Preparation decodes every record once with the eval transforms and leaves out, and counts per
reason, those the pipeline would skip.

Modules: `records` (Example <-> record), `builders` (one builder per family), `staging`
(media bytes -> short-lived local files for the decoders), `source` (Grain `MapDataset` of
`Example`s, `DatasetSpec` from shards), `prepare` (the CLI).
"""
