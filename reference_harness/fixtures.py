"""The one format of every fixture file (tests/fixtures/*.npz and
tf1_checkpoints/outputs.npz).

A fixture file holds cases, each a description (a flat dict, see
`cases`), its data (inputs, weights, noise) and its results in groups: the
modes ("train", "infer") or "ref". In the .npz each case is one uint8
member named after it: the bytes of its arrays one after the other (few
zip members keep the file small); `__meta__` is JSON:

    {"format": FORMAT,
     "cases": [description, ...],
     "index": {case: [[key, dtype, offset, shape], ...]},
     ...}              (what made the file: TensorFlow version, ...)

where key is "data/<name>" or "<group>/<name>" and offset counts bytes.
Arrays keep their dtype; descriptions come back with tuples for lists.
"""

import json

import numpy as np

FORMAT = "keras_moe-fixtures-1"
META = "__meta__"


def pack(cases, case_results, extra_meta=None):
    """The arrays for `np.savez_compressed`.

    cases: the descriptions, by name (a dict) or a list; case_results:
    `{name: (data, {group: results})}`, `data` and each `results` a dict
    of arrays; extra_meta: more JSON for `__meta__`."""
    if not isinstance(cases, dict):
        cases = {c["name"]: c for c in cases}
    meta = {"format": FORMAT, "cases": [], "index": {}}
    meta.update(extra_meta or {})
    flat = {}
    for name, (data, results) in case_results.items():
        assert name != META, name
        items = [("data/" + key, val) for key, val in sorted(data.items())]
        for group, res in results.items():
            assert group != "data", group
            items += [("%s/%s" % (group, key), val)
                      for key, val in sorted(res.items())]
        index, parts, offset = [], [], 0
        for key, val in items:
            val = np.asarray(val)
            index.append([key, val.dtype.name, offset, list(val.shape)])
            parts.append(val.tobytes())
            offset += val.nbytes
        flat[name] = np.frombuffer(b"".join(parts), np.uint8)
        meta["cases"].append(cases[name])
        meta["index"][name] = index
    flat[META] = np.array(json.dumps(meta))
    return flat


def read_meta(npz):
    """The `__meta__` of an open .npz; an error for another format."""
    meta = json.loads(str(npz[META]))
    if meta.get("format") != FORMAT:
        raise ValueError("not a %s fixture file (format %r): regenerate it "
                         "with its tools/make_*_fixtures.py"
                         % (FORMAT, meta.get("format")))
    return meta


def _description(case):
    return {key: tuple(val) if isinstance(val, list) else val
            for key, val in case.items()}


def unpack(npz, name, meta=None):
    """`(case, data, {group: results})` of case `name` in an open .npz, or
    None if the file does not hold it."""
    meta = meta if meta is not None else read_meta(npz)
    if name not in meta["index"]:
        return None
    blob = npz[name]
    data, results = {}, {}
    for key, dtype, offset, shape in meta["index"][name]:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        val = blob[offset:offset + size].view(dtype).reshape(shape).copy()
        group, item = key.split("/", 1)
        (data if group == "data" else results.setdefault(group, {}))[
            item] = val
    case = {c["name"]: c for c in meta["cases"]}[name]
    return _description(case), data, results


class FixtureFile(object):
    """A fixture file, opened on first use: `meta`, `names()` and
    `get(name)` (what `unpack` returns)."""

    def __init__(self, path):
        self.path = path
        self._npz = self._meta = None

    def _open(self):
        if self._npz is None:
            self._npz = np.load(self.path)
            self._meta = read_meta(self._npz)

    @property
    def meta(self):
        self._open()
        return self._meta

    def names(self):
        """The cases in the file, in its order."""
        return list(self.meta["index"])

    def get(self, name):
        self._open()
        return unpack(self._npz, name, self._meta)
