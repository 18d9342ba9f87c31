"""Dataset audit, the near-duplicate findings: which images the perceptual hashes link.

Groups are the connected components of the hash graph (what a phash-grouped split keeps
together); pairs are its edges. Each pair also gets the correlation of the two images' 32x32 grey
thumbnails, and a pair with correlation >= :data:`CONFIRM_CORRELATION` counts as confirmed (the
same picture, not just a similar-looking slice). :func:`near_duplicates` reports them within one
class, across classes (one picture under two labels), across the dataset's own
``Training``/``Testing`` split (leaks) and, for layouts with patient groups, across patients.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import numpy as np

from medseg.data.audit_checks import Record
from medseg.data.dedup import connected_labels, existing_group_links, hamming_pairs
from medseg.data.samples import Sample

MAX_EXAMPLES = 10  # groups listed as examples per finding
MAX_MEMBERS = 8  # paths listed per example group
MAX_LISTED = 200  # problems / non-binary masks / leaks listed in full up to this many
CONFIRM_CORRELATION = 0.95
"""Correlation of 32x32 grey thumbnails above which a hash-linked pair is the same picture.

On the brain-tumour MRI set, pairs with equal hashes correlate at >= 0.996 (5th percentile), while
hash-linked pairs across classes (similar-looking slices of different patients) stay below 0.95.
"""


def _group_summary(members: list[list[int]], samples: list[Sample]) -> dict[str, Any]:
    members = sorted(members, key=lambda m: (-len(m), min(samples[i].id for i in m)))
    return {
        "n_groups": len(members),
        "n_images": int(sum(len(m) for m in members)),
        "examples": [
            sorted(samples[i].id for i in m)[:MAX_MEMBERS] for m in members[:MAX_EXAMPLES]
        ],
    }


def _differs(values: list, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether ``values[rows[k]]`` and ``values[cols[k]]`` are both set and differ, per pair."""
    out = [
        values[a] is not None and values[b] is not None and values[a] != values[b]
        for a, b in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    return np.array(out, dtype=bool)


def _interleave(members: list[int], key, samples: list[Sample]) -> list[int]:
    """``members`` ordered round-robin over ``key`` (e.g. class), each key's members by id."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in sorted(members, key=lambda i: samples[i].id):
        by_key[key(i)].append(i)
    lists = [by_key[k] for k in sorted(by_key)]
    return [i for row in zip_longest(*lists) for i in row if i is not None]


def _by_split(members: list[int], samples: list[Sample]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for i in sorted(members, key=lambda i: samples[i].id):
        out[str(samples[i].split)].append(samples[i].id)
    return {k: out[k] for k in sorted(out, key=split_key)}


def split_key(split: str) -> tuple[int, str]:
    """Training before Testing, then other names alphabetically."""
    order = ("Training", "Testing")
    return (order.index(split) if split in order else len(order), split)


def _pair_summary(
    sel: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    dist: np.ndarray,
    corr: np.ndarray,
    name,
    limit: int = MAX_EXAMPLES,
) -> dict[str, Any]:
    """Counts and the closest examples of the linked pairs ``sel`` (a boolean mask)."""
    order = np.flatnonzero(sel)
    order = order[np.lexsort((dist[order], -corr[order]))]
    return {
        "n_pairs": int(sel.sum()),
        "n_confirmed_pairs": int((sel & (corr >= CONFIRM_CORRELATION)).sum()),
        "closest_pairs": [
            {
                "a": name(int(rows[k])),
                "b": name(int(cols[k])),
                "distance": int(dist[k]),
                "correlation": round(float(corr[k]), 4),
            }
            for k in order[:limit]
        ],
    }


@dataclass
class _Links:
    """The hash graph over the readable samples.

    ``ok`` holds the sample indices of the readable records; ``r``/``c`` are the two ends of each
    linked pair as positions in ``ok``, ``rows``/``cols`` the same ends as sample indices; ``dist``
    is the Hamming distance of each pair and ``corr`` its thumbnail correlation.
    """

    ok: np.ndarray
    r: np.ndarray
    c: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    dist: np.ndarray
    corr: np.ndarray


def _link(records: list[Record], threshold: int) -> _Links:
    ok = np.array([i for i, r in enumerate(records) if r.ok], np.int64)
    hashes = np.array([records[i].hash for i in ok], dtype=np.uint64)
    r, c = hamming_pairs(hashes, threshold)
    dist = np.bitwise_count(hashes[r] ^ hashes[c]).astype(np.int64)
    if len(ok):
        thumbs = np.stack([records[i].thumb for i in ok])
        corr = np.einsum("ij,ij->i", thumbs[r], thumbs[c]) if len(r) else np.zeros(0)
    else:
        corr = np.zeros(0)
    return _Links(ok=ok, r=r, c=c, rows=ok[r], cols=ok[c], dist=dist, corr=corr)


def _components(links: _Links) -> tuple[list[list[int]], int]:
    """Groups of two or more linked samples (sample indices), and the identical-hash groups."""
    ok, r, c = links.ok, links.r, links.c
    labels = connected_labels(len(ok), [(r, c)])
    comps: dict[int, list[int]] = defaultdict(list)
    for pos, label in enumerate(labels.tolist()):
        comps[label].append(int(ok[pos]))
    groups = [m for m in comps.values() if len(m) > 1]
    same = links.dist == 0
    identical = connected_labels(len(ok), [(r[same], c[same])])
    n_identical = int((np.bincount(identical) > 1).sum()) if len(ok) else 0
    return groups, n_identical


def _split_groups(samples: list[Sample], links: _Links) -> int:
    """The groups a split would use: near-duplicates joined with the layout's own groups."""
    ok = links.ok
    group_links = existing_group_links([samples[i].group for i in ok])
    merged = connected_labels(len(ok), [(links.r, links.c), group_links])
    # Unreadable samples keep their layout group; count those groups that no readable sample has.
    unread_groups = {s.group for s in samples} - {samples[i].group for i in ok.tolist()}
    return len(set(merged.tolist())) + len(unread_groups)


@dataclass
class _Kinds:
    """The near-duplicate groups sorted by what they join."""

    within: Counter[str]  # groups inside one class, by class
    across_classes: list[list[int]]
    leaks: list[list[int]]  # across the dataset's own splits
    across_groups: list[list[int]]  # across the layout's groups (patients)


def _sort_groups(
    groups: list[list[int]], samples: list[Sample], label_of, own_groups: bool, classification: bool
) -> _Kinds:
    kinds = _Kinds(within=Counter(), across_classes=[], leaks=[], across_groups=[])
    for m in groups:
        if classification:
            labels_in = {label_of(i) for i in m}
            if len(labels_in) == 1:
                kinds.within[next(iter(labels_in))] += 1
            else:
                kinds.across_classes.append(m)
        if len({samples[i].split for i in m if samples[i].split is not None}) > 1:
            kinds.leaks.append(m)
        if own_groups and len({samples[i].group for i in m}) > 1:
            kinds.across_groups.append(m)
    return kinds


def _leak_summary(
    leaks: list[list[int]], samples: list[Sample], links: _Links, name
) -> dict[str, Any]:
    split_of = [s.split for s in samples]
    sel = _differs(split_of, links.rows, links.cols)
    return {
        "splits": sorted({s for s in split_of if s is not None}, key=split_key),
        **_group_summary(leaks, samples),
        **_pair_summary(sel, links.rows, links.cols, links.dist, links.corr, name),
        "n_images_by_split": dict(
            sorted(
                Counter(str(samples[i].split) for m in leaks for i in m).items(),
                key=lambda kv: split_key(kv[0]),
            )
        ),
        "groups": [_by_split(m, samples) for m in leaks[:MAX_LISTED]],
    }


def near_duplicates(
    samples: list[Sample],
    records: list[Record],
    class_names: list[str],
    threshold: int,
) -> dict[str, Any]:
    """Near-duplicate findings; also the number of groups a phash-grouped split would use.

    Returns:
        ``near_duplicate_groups``, ``cross_class_duplicates`` (None without classes) and
        ``leaks`` (parts of the audit report), and ``n_groups``.
    """
    links = _link(records, threshold)
    rows, cols, dist, corr = links.rows, links.cols, links.dist, links.corr
    groups, n_identical = _components(links)

    def label_of(i: int) -> str:
        t = samples[i].target
        return class_names[t] if isinstance(t, int) and 0 <= t < len(class_names) else ""

    def name(i: int) -> str:
        lab = label_of(i)
        return f"{samples[i].id} ({lab})" if lab else samples[i].id

    classification = bool(class_names)
    own_groups = len({s.group for s in samples}) < len(samples)
    kinds = _sort_groups(groups, samples, label_of, own_groups, classification)

    summary = _group_summary(groups, samples)
    summary["largest"] = sorted((len(m) for m in groups), reverse=True)[:MAX_EXAMPLES]
    summary["identical_hash_groups"] = n_identical
    summary["n_pairs"] = len(rows)
    summary["n_confirmed_pairs"] = int((corr >= CONFIRM_CORRELATION).sum())
    summary["confirm_correlation"] = CONFIRM_CORRELATION
    if classification:
        summary["within_class"] = {cname: kinds.within.get(cname, 0) for cname in class_names}
    if own_groups:
        across = _differs([s.group for s in samples], rows, cols)
        summary["across_groups"] = {
            **_group_summary(kinds.across_groups, samples),
            **_pair_summary(across, rows, cols, dist, corr, name),
        }

    cross = None
    if classification:
        sel = _differs([s.target for s in samples], rows, cols)
        cross = {
            **_group_summary(kinds.across_classes, samples),
            **_pair_summary(sel, rows, cols, dist, corr, name),
        }
        largest_first = sorted(
            kinds.across_classes, key=lambda m: (-len(m), min(samples[i].id for i in m))
        )
        cross["examples"] = [
            [name(i) for i in _interleave(m, label_of, samples)][:MAX_MEMBERS]
            for m in largest_first[:MAX_EXAMPLES]
        ]
    return {
        "near_duplicate_groups": summary,
        "cross_class_duplicates": cross,
        "leaks": _leak_summary(kinds.leaks, samples, links, name),
        "n_groups": _split_groups(samples, links),
    }
