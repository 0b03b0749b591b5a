"""NPM/OPM: mappings between architectures as tables of rules (docs/kept.md)."""

from kept_jax.mapping.calibration import SiteStats, calibrate
from kept_jax.mapping.opm import STRATEGIES, build_mapping, outer_sites, target_config
from kept_jax.mapping.rules import Mapping, MappingError, Rule, copy_mapping, format_table

__all__ = [
    "STRATEGIES", "Mapping", "MappingError", "Rule", "SiteStats", "build_mapping", "calibrate", "copy_mapping",
    "format_table",
    "outer_sites", "target_config",
]
