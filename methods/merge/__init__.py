"""Model merging methods (registered under the "merge" family).

Importing this package registers every method; ``methods.merge.apply.merge_state_dicts`` merges
whole state dicts (tensor selection, vocabulary alignment, dtypes) and documents how the methods
differ from mergekit.
"""

from methods.merge import (  # noqa: F401  (imported to register the methods)
    dare_merge,
    delta_fusion,
    slerp,
    soups,
    task_arithmetic,
    ties,
)
