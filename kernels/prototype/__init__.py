"""ProFashion's pose-aware prototype aggregation (PPA)."""
from .reference import prototype_aggregate_reference

__all__ = ["prototype_aggregate_reference"]
