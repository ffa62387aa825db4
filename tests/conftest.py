"""Shared test settings: Hypothesis profiles and small helpers."""

import os

from hypothesis import settings

from harness.fuzz.profiles import register_profiles

# The profiles live in harness.fuzz.driver ("ci": bounded and derandomized, "dev", "campaign"), so that the
# test suite and `jagbench fuzz` share them.
register_profiles()
settings.load_profile(os.environ.get("JAGBENCH_HYPOTHESIS_PROFILE", "ci"))
