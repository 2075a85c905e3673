"""The page's model metadata: references resolved under the web policy (bundled models, allowed
folders, Hub ids; never a visitor's path), cached per reference because the preview re-plans on
every edit."""

from __future__ import annotations

import functools

from merger.catalog import LocalPolicy, ModelInfo, resolve
from merger.plan import Plan, make_plan
from merger.recipe import recipe_from_yaml

POLICY = LocalPolicy.for_web()


@functools.lru_cache(maxsize=64)
def model_info(ref: str) -> ModelInfo:
    return resolve(ref, POLICY)


def plan_for(recipe_yaml: str) -> Plan:
    return make_plan(recipe_from_yaml(recipe_yaml), model_info)
