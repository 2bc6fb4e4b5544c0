"""The bundle: one directory a device runs without the training code.

``names`` (schema version, file names), ``format`` (manifest, writer, reader),
``summary`` and ``card`` (for people), ``inspect`` (``vlmexport inspect``). This package
imports the standard library and ``vlmexport.core`` only: the exporter writes bundles
with it and every runtime reads them with it, also on a runtime-only install.
"""

from .format import (  # noqa: F401
    VERIFY_MODES,
    Artifact,
    Bundle,
    BundleError,
    BundleWriter,
    TensorSpec,
    file_sha256,
    tool_versions,
)
from .inspect import format_inspection, inspect_bundle  # noqa: F401
from .names import (  # noqa: F401
    KIND,
    MANIFEST,
    PART_PRECISION_FALLBACK,
    README,
    SCHEMA_VERSION,
    SECTIONS,
    artifact_file,
    part_precision,
)
from .summary import format_size, model_facts, validation_summary  # noqa: F401
