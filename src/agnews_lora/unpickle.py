"""A restricted unpickler for data files: only the globals the supported shapes need.

Plain `pickle.load` runs whatever callable a pickle names (`os.system`, `subprocess.Popen`, ...),
so a pickle from the internet could run any command. This one resolves only an allow-list of
(module, name) pairs, taken from what real pickles of the supported shapes reference
(checked with a recording `find_class` over pickle protocols 2-5):

- a `datasets.Dataset` held in memory (its Arrow table),
- a pandas `DataFrame` or `Series` (numpy or Arrow-backed string columns),
- numpy arrays (strings, integers, objects),
- plain dicts and lists of str / int (no globals at all).

Anything else is refused with an error naming the forbidden global.
"""

from __future__ import annotations

import pickle
from typing import BinaryIO

_NUMPY = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
}
_ARROW = {
    ("pyarrow.lib", name) for name in ("_reconstruct_table", "_restore_array", "chunked_array", "field",
                                       "py_buffer", "schema", "type_for_alias", "table", "array")
}
_PANDAS = {
    ("pandas", "DataFrame"), ("pandas", "Series"), ("pandas", "Index"), ("pandas", "RangeIndex"),
    ("pandas", "StringDtype"), ("pandas.arrays", "ArrowStringArray"), ("pandas.arrays", "StringArray"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.managers", "SingleBlockManager"), ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.internals.blocks", "new_block"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.string_arrow", "ArrowStringArray"), ("pandas.core.arrays.string_", "StringArray"),
}
_DATASETS = {
    ("datasets.arrow_dataset", "Dataset"), ("datasets.table", "InMemoryTable"),
    ("datasets.info", "DatasetInfo"), ("datasets.features.features", "Features"),
    ("datasets.features.features", "Value"), ("datasets.features.features", "ClassLabel"),
    ("datasets.splits", "NamedSplit"),
}
_BUILTINS = {
    ("builtins", "bytearray"), ("builtins", "slice"), ("__builtin__", "bytearray"), ("__builtin__", "slice"),
    ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(str, "latin1")
}
ALLOWED = frozenset(_NUMPY | _ARROW | _PANDAS | _DATASETS | _BUILTINS)


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it names was called."""

    def __init__(self, module: str, name: str):
        super().__init__(f"it references {module}.{name}, which a data file never needs "
                         "(refused: unpickling it could run code)")
        self.module, self.name = module, name


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the (module, name) pairs in ALLOWED."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise ForbiddenGlobal(module, name)
        return super().find_class(module, name)


def safe_load(fh: BinaryIO):
    """Unpickle a data file without running anything outside the allow-list.

    Args:
        fh: the open binary file.

    Returns:
        The unpickled object.

    Raises:
        ForbiddenGlobal: the pickle references a global outside ALLOWED.
    """
    return RestrictedUnpickler(fh).load()
