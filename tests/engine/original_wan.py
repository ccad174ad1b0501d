"""Test-data generation only: a diffusers ``WanTransformer3DModel`` state dict under the original Wan key names.
The table lives in ``engine.backbones.wan.original_names`` (the embedded ``tiny-phantom`` writes those names too);
``test_single_file`` checks it by round trip through diffusers' converter, which is the oracle.
"""
from engine.backbones.wan.original_names import to_original_wan  # noqa: F401 (the tests' import)
