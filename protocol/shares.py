"""The experts' shares of the data: what an island may report, and what a manifest publishes.

A siloed island may opt in (``ddm-client join --share-counts``) to report, in its checkpoint's
metrics header, how many samples it trained on and, for a class-conditional model, how many of
each class: ``{"samples": N, "class_counts": [n_0, ..., n_{C-1}]}`` under the key ``counts``.
The coordinator checks the report here before it signs the checkpoint.

A manifest's ``shares`` object says how likely each expert is, for ancestral routing (one
expert drawn per sample from p(k), or p(k | y) when sampling class y):

    {"source": "clusters" | "islands" | "uniform",
     "clusters": [count per router output, in the manifest's expert order],
     "classes": [[count per class] per expert] or null}

A manifest without it (made before shares existed) means uniform shares.
"""

from __future__ import annotations

COUNTS_KEY = "counts"  # where an island's report sits in its checkpoint's metrics
MAX_SAMPLES = 10**12  # no island reports more samples than this
MAX_CLASSES = 100_000  # as ddm_model.dit.MAX_CLASSES: no model has more classes
SOURCES = ("clusters", "islands", "uniform")


class SharesError(ValueError):
    """Counts or shares that are malformed; the message says which part."""


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAMPLES:
        raise SharesError(f"{what} must be an integer in [0, {MAX_SAMPLES}], got {value!r}"[:200])
    return value


def _counts(values: object, what: str, length: int | None = None) -> list[int]:
    if not isinstance(values, list) or len(values) > MAX_CLASSES:
        raise SharesError(f"{what} must be a list of at most {MAX_CLASSES} counts")
    if length is not None and len(values) != length:
        raise SharesError(f"{what} holds {len(values)} counts, {length} expected")
    return [_count(v, what) for v in values]


def check_counts(report: object, num_classes: int) -> dict:
    """An island's reported counts, checked: non-negative bounded integers, ``class_counts`` (one
    per class of the model; absent for an unconditional model) summing to ``samples``."""
    if not isinstance(report, dict) or not set(report) <= {"samples", "class_counts"} or "samples" not in report:
        raise SharesError("reported counts must be an object with 'samples' (and 'class_counts', given classes)")
    samples = _count(report["samples"], "the reported sample count")
    if samples == 0:
        raise SharesError("an island that reports its counts must report at least one sample")
    classes = report.get("class_counts")
    if num_classes == 0:
        if classes is not None:
            raise SharesError("class counts were reported for a model without classes")
        return {"samples": samples}
    if classes is None:
        raise SharesError(f"the model has {num_classes} classes but no class counts were reported")
    classes = _counts(classes, "the reported class counts", num_classes)
    if sum(classes) != samples:
        raise SharesError(f"the reported class counts sum to {sum(classes)}, not to the {samples} samples reported")
    return {"samples": samples, "class_counts": classes}


def uniform(experts: int) -> dict:
    return {"source": "uniform", "clusters": [1] * experts, "classes": None}


def check_shares(shares: object, experts: int) -> dict:
    """A manifest's ``shares`` (None: uniform), checked against its number of experts."""
    if shares is None:
        return uniform(experts)
    if not isinstance(shares, dict) or set(shares) != {"source", "clusters", "classes"}:
        raise SharesError("the manifest's shares must hold exactly 'source', 'clusters' and 'classes'")
    if shares["source"] not in SOURCES:
        raise SharesError(f"the manifest's shares name an unknown source {str(shares['source'])[:40]!r}")
    clusters = _counts(shares["clusters"], "the manifest's cluster shares", experts)
    if sum(clusters) <= 0:
        raise SharesError("the manifest's cluster shares are all zero")
    classes = shares["classes"]
    if classes is not None:
        if not isinstance(classes, list) or len(classes) != experts or not classes:
            raise SharesError(f"the manifest's class shares must be one list per expert ({experts})")
        width = len(classes[0]) if isinstance(classes[0], list) else -1
        classes = [_counts(row, "the manifest's class shares", width) for row in classes]
    return {"source": shares["source"], "clusters": clusters, "classes": classes}
