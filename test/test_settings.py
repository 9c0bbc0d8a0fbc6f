"""The single definition of every setting (reg2d3d_ros.settings) and what is derived from it."""

from dataclasses import fields

import pytest

from reg2d3d_ros.errors import ConfigError
from reg2d3d_ros.pipeline import PipelineConfig, RegistrationPipeline
from reg2d3d_ros.settings import BY_NAME, SETTINGS, pipeline_settings, setting, validate


def test_pipeline_config_is_derived_from_the_settings():
    names = [f.name for f in fields(PipelineConfig)]
    assert names == [s.name for s in pipeline_settings()]
    cfg = PipelineConfig()
    for s in pipeline_settings():
        assert getattr(cfg, s.name) == s.default and type(getattr(cfg, s.name)) is type(s.default)
        assert s.name in PipelineConfig.__doc__
    assert {s.name for s in SETTINGS} - set(names) == {s.name for s in SETTINGS if s.node_only}
    assert len(BY_NAME) == len(SETTINGS)  # no name defined twice


def test_every_default_passes_its_own_check_and_has_a_description():
    for s in SETTINGS:
        assert s.check(s.default) == s.default, s.name
        assert len(s.description) > 10, s.name
        if s.range is not None:
            assert s.range[0] <= s.default <= s.range[1], s.name
        if s.choices is not None:
            assert s.default in s.choices, s.name


def test_check_converts_what_a_user_types_and_words_what_is_wrong():
    assert setting("search_range_mm").check(20) == 20.0 and isinstance(setting("search_range_mm").check(20), float)
    assert setting("target").check(29) == "29"  # a label id typed as an integer
    assert setting("min_correspondences").check(12.0) == 12
    with pytest.raises(ConfigError, match=r"search_range_mm must be a number in \[0, 100\] \(unit: mm\); got 150"):
        setting("search_range_mm").check(150)
    with pytest.raises(ConfigError, match="tracker must be one of ppc"):
        setting("tracker").check("magic")
    with pytest.raises(ConfigError, match="polish must be true or false"):
        setting("polish").check("yes")
    with pytest.raises(ConfigError, match="unknown setting 'serch_range_mm'"):
        setting("serch_range_mm")


def test_validate_reports_every_problem_at_once_and_the_pipeline_uses_it():
    with pytest.raises(ConfigError) as exc:
        validate({"search_range_mm": -1.0, "track_dof": "all", "motion_prediction": 0.5})
    assert "search_range_mm" in str(exc.value) and "track_dof" in str(exc.value) and "motion_prediction" not in str(exc.value)
    with pytest.raises(ConfigError, match="max_peak_offset_mm"):
        RegistrationPipeline(PipelineConfig(max_peak_offset_mm=80.0))
