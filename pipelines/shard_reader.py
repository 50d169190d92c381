"""Reading one shard: tar members grouped into samples by webdataset's stages, checked for structure.

``iter_piece`` yields the structurally valid samples (an image and an integer label; bytes not yet
decoded) of a sample-index range of one shard, in tar order, and reports every problem to a callback as
``(kind, shard URL, count)``, kind one of BAD_KINDS (``corrupt_image`` is found later, when decoding).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from .redaction import redact_url, scrub
from .storage import open_url

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff")
LABEL_EXTS = ("cls", "label", "cls2")
BAD_KINDS = (
    "missing_shard",
    "unreadable_shard",
    "truncated_tar",
    "non_adjacent",
    "missing_image",
    "missing_label",
    "bad_label",
    "corrupt_image",
)


def tar_samples(fileobj, url: str) -> Iterator[dict[str, Any]]:
    """{"__key__", "__url__", ext: bytes} per run of consecutive members sharing a key, in tar order:
    webdataset's own stages (tar_file_expander, group_by_keys)."""
    members = tar_file_expander([{"url": url, "stream": fileobj}], handler=reraise_exception)
    return group_by_keys(members, handler=_keep_first_copy)


def _keep_first_copy(exc: Exception) -> bool:
    """group_by_keys raises ValueError for a file name repeated inside one sample; keep the first copy and go
    on, so one odd member does not cost the rest of the shard. Anything else is raised (and counted by the
    caller)."""
    if isinstance(exc, ValueError):
        return True
    raise exc


@dataclass
class RawSample:
    """One structurally valid sample: still-encoded image bytes and its label."""

    key: str
    url: str
    image: bytes
    label: int


def iter_piece(
    url: str,
    start: int,
    stop: int,
    opts: Mapping[str, Any],
    on_bad: Callable[[str, str, int], None],
    num_classes: int | None = None,
    open_shard: Callable[[str], Any] | None = None,
    keep: frozenset[str] | None = None,
) -> Iterator[RawSample]:
    """Structurally valid samples with index ``start <= i < stop`` of one shard; problems go to on_bad.

    ``keep``: only the samples with these keys count, in tar order (the shard's part in a key-chosen subset,
    pipelines/subsets.py): the index ``i`` is then the position among them. None: every sample counts.

    ``open_shard(url)`` opens the shard (default: straight from storage; the loader passes its ShardSource,
    which reads through the node-local cache, pipelines/shard_cache.py).
    Transient S3 errors, a body broken off mid-read included, are retried by the client (storage.READ_RETRIES);
    what still fails counts the rest of the piece as unreadable_shard or truncated_tar.
    """
    idx = 0  # next group index to look at
    seen: set[str] = set()
    try:
        f = open_shard(url) if open_shard is not None else open_url(url, "rb", opts)
    except FileNotFoundError:
        on_bad("missing_shard", url, stop - start)
        return
    except Exception as exc:
        log.error("cannot open shard %s: %s", redact_url(url), scrub(str(exc), opts))
        on_bad("unreadable_shard", url, stop - start)
        return
    try:
        with f:
            i = -1
            for files in tar_samples(f, url):
                key = files["__key__"]
                if keep is not None and key not in keep:
                    continue
                i += 1
                idx = i + 1
                if i >= stop:
                    return
                repeated = key in seen
                seen.add(key)
                if i < start:
                    continue
                if repeated:
                    on_bad("non_adjacent", url, 1)
                    continue
                img_ext = next((e for e in IMAGE_EXTS if e in files), None)
                if img_ext is None:
                    on_bad("missing_image", url, 1)
                    continue
                lab_ext = next((e for e in LABEL_EXTS if e in files), None)
                if lab_ext is None:
                    on_bad("missing_label", url, 1)
                    continue
                try:
                    label = int(files[lab_ext].decode().strip())
                    if label < 0 or (num_classes is not None and label >= num_classes):
                        raise ValueError(label)
                except Exception:
                    on_bad("bad_label", url, 1)
                    continue
                yield RawSample(key, url, files[img_ext], label)
        if idx < stop:  # the shard ended before the manifest said it would
            on_bad("truncated_tar", url, stop - max(start, idx))
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as exc:
        kind = "unreadable_shard" if idx == 0 else "truncated_tar"
        log.warning("%s in %s after %d samples: %s", kind, redact_url(url), idx, scrub(str(exc), opts))
        on_bad(kind, url, stop - max(start, idx))
    except Exception as exc:
        log.error("unreadable shard %s: %s", redact_url(url), scrub(str(exc), opts))
        on_bad("unreadable_shard", url, stop - max(start, idx))


def count_samples(url: str, opts: Mapping[str, Any]) -> int:
    """Samples (runs of members sharing a key) in one shard, read once."""
    with open_url(url, "rb", opts) as f:
        return sum(1 for _ in tar_samples(f, url))
