"""Small tensorflow-datasets compatibility shims (no TensorFlow needed).

tfds 4.9.10 resolves ``DatasetBuilder.code_path`` through
``importlib_resources.abc.Traversable`` for builders that live in a package;
that module is only a declared dependency on Python < 3.9, so on newer Pythons
without it ``download_and_prepare`` fails with ``ModuleNotFoundError:
importlib_resources`` (tensorflow/datasets#11212).  ``SourceFileCodePath``
returns the builder's source file directly, which is what tfds would have
computed anyway (it is only used to look for a ``checksums.tsv`` next to it).

The same mixin also skips tfds's look-up of pre-computed metadata on its GCS bucket
(``DatasetInfo.initialize_from_bucket``, run whenever a builder is made for data not yet
prepared): these datasets are local and never there, GCS access is off in this tfds, and the
look-up left an empty ``/tmp/tmp*tfds`` directory behind each time.
"""

from __future__ import annotations

import inspect

from etils import epath
from tensorflow_datasets.core.utils import py_utils


class SourceFileCodePath:
    """Mixin for tfds builders: ``code_path`` = the file defining the class; no bucket look-up."""

    def dataset_info_from_configs(self, **kwargs):
        info = super().dataset_info_from_configs(**kwargs)
        info.initialize_from_bucket = lambda: None  # local data: nothing on the bucket
        return info

    @py_utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None
